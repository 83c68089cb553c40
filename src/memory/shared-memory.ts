// Guest RAM another process can take over (kiln upgrade): one memfd holding every RAM
// region back to back (the memory file's layout), mapped MAP_SHARED, sealed so that
// nobody can shrink or grow it under a mapping. The daemon finds it among the old VMM's
// open files, opens it again and hands it to the new VMM as an inherited fd; the new VMM
// checks it is the very file the old one maps (device and inode, which the old VMM sends
// in the migration's configuration) before mapping it. No byte of guest memory is copied.
import { closeSync, fstatSync, ftruncateSync, openSync, readdirSync, readlinkSync } from 'node:fs';
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';

/** The memfd's name: the old VMM's is found by it (/proc/PID/fd/N reads "/memfd:NAME (deleted)"). */
export const GUEST_MEMORY_FILE_NAME = 'kiln-guest-ram';

/** The seals every guest memory file carries (a file without them is not one). */
const SEALS = libc.F_SEAL_SHRINK | libc.F_SEAL_GROW;

/** Which file a guest memory file is, as the kernel knows it in every namespace. */
export interface MemoryFileIdentity {
  readonly dev: string;
  readonly ino: string;
  readonly bytes: number;
}

export class SharedMemoryError extends KilnError {
  override readonly name: string = 'SharedMemoryError';
}

/**
 * A new guest memory file of `size` bytes (2 MiB pages from the hugetlb pool with
 * `hugetlb`), sealed against shrinking and growing. Returns its fd (close-on-exec).
 */
export function createGuestMemoryFile(size: number, hugetlb: boolean): number {
  const flags = libc.MFD_CLOEXEC | libc.MFD_ALLOW_SEALING | (hugetlb ? libc.MFD_HUGETLB | libc.MFD_HUGE_2MB : 0);
  const fd = libc.memfdCreate(GUEST_MEMORY_FILE_NAME, flags);
  if (fd < 0)
    throw new SharedMemoryError(
      `cannot create the shared guest memory file (memfd_create): ${libc.errnoName(libc.errno())}`,
    );
  try {
    ftruncateSync(fd, size);
    if (libc.fcntlInt(fd, libc.F_ADD_SEALS, SEALS | libc.F_SEAL_SEAL) < 0)
      throw new SharedMemoryError(`cannot seal the shared guest memory file: ${libc.errnoName(libc.errno())}`);
  } catch (err) {
    closeSync(fd);
    if (err instanceof SharedMemoryError) throw err;
    throw new SharedMemoryError(
      `cannot size the shared guest memory file to ${size} bytes: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
  return fd;
}

/** The identity of open guest memory file `fd`. */
export function memoryFileIdentity(fd: number): MemoryFileIdentity {
  const st = fstatSync(fd, { bigint: true });
  return { dev: String(st.dev), ino: String(st.ino), bytes: Number(st.size) };
}

/**
 * Checks that `fd` (what `what` calls it) is a guest memory file: open, a regular file no
 * directory links to, carrying a guest memory file's seals, of `bytes` bytes when given.
 * Throws one line saying what it is instead.
 */
export function checkGuestMemoryFile(fd: number, what: string, bytes?: number): MemoryFileIdentity {
  let st;
  try {
    st = fstatSync(fd, { bigint: true });
  } catch (err) {
    throw new SharedMemoryError(`${what} is not an open file (${(err as NodeJS.ErrnoException).code})`);
  }
  if (!st.isFile() || st.nlink !== 0n)
    throw new SharedMemoryError(`${what} is not a guest memory file (it is not an unlinked memfd)`);
  const seals = libc.fcntlInt(fd, libc.F_GET_SEALS, 0);
  if (seals < 0 || (seals & SEALS) !== SEALS)
    throw new SharedMemoryError(`${what} is not a guest memory file (it is not sealed against resizing)`);
  if (bytes !== undefined && st.size !== BigInt(bytes))
    throw new SharedMemoryError(`${what} holds ${st.size} bytes of memory; the VM has ${bytes}`);
  return { dev: String(st.dev), ino: String(st.ino), bytes: Number(st.size) };
}

/** Whether `fd` is the file `expected` names (the source's guest memory); throws why not. */
export function checkSameMemoryFile(fd: number, what: string, expected: MemoryFileIdentity): void {
  const mine = checkGuestMemoryFile(fd, what, expected.bytes);
  if (mine.dev !== expected.dev || mine.ino !== expected.ino)
    throw new SharedMemoryError(`${what} is another file than the source's guest memory`);
}

/**
 * Opens process `pid`'s guest memory file again (through /proc/PID/fd, which needs the
 * right to trace it: the daemon's root), checked as checkGuestMemoryFile does, with
 * `bytes` bytes. Returns the new fd (the caller closes it), or null when the process maps
 * no such file (its RAM is private: a VM restored from a snapshot's memory file, or one
 * defined with sharedMemory off).
 */
export function openGuestMemoryOf(pid: number, bytes: number): number | null {
  const dir = `/proc/${pid}/fd`;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (err) {
    throw new SharedMemoryError(`cannot read the open files of process ${pid}: ${(err as NodeJS.ErrnoException).code}`);
  }
  const wanted = `/memfd:${GUEST_MEMORY_FILE_NAME} (deleted)`;
  for (const n of names) {
    let target: string;
    try {
      target = readlinkSync(`${dir}/${n}`);
    } catch {
      continue; // closed meanwhile
    }
    if (target !== wanted) continue;
    const fd = openSync(`${dir}/${n}`, 'r+');
    try {
      checkGuestMemoryFile(fd, `the guest memory of process ${pid}`, bytes);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
    return fd;
  }
  return null;
}

/**
 * The data ranges (not holes) of open file `fd` within [from, to), by SEEK_DATA and
 * SEEK_HOLE (a memfd has them too: its holes are pages never touched, or punched out).
 * Offsets are the file's.
 */
export function fileDataRanges(fd: number, from: number, to: number): Array<{ offset: number; length: number }> {
  const out: Array<{ offset: number; length: number }> = [];
  for (let at = from; at < to;) {
    const data = libc.lseek(fd, at, libc.SEEK_DATA);
    if (data < 0) {
      if (libc.errno() === libc.ENXIO) break;
      throw new SharedMemoryError(`lseek(SEEK_DATA): ${libc.errnoName(libc.errno())}`);
    }
    if (data >= to) break;
    let hole = libc.lseek(fd, data, libc.SEEK_HOLE);
    if (hole < 0) hole = to;
    out.push({ offset: data, length: Math.min(hole, to) - data });
    at = hole;
  }
  return out;
}
