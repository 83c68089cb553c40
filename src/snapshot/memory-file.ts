// The snapshot memory file: guest RAM regions back to back, as Firecracker writes it,
// but sparse: a page of zeros is a hole (never written), so a guest that touched little
// of its RAM gives a small file. A restore maps it MAP_PRIVATE (guest-memory.ts): pages
// come in as the guest touches them and its writes never reach the file.
import { closeSync, fstatSync, fsyncSync, ftruncateSync, openSync, readSync, constants as fsConstants } from 'node:fs';
import { writeAll, writeFileAtomically } from '../atomic-file.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { fileDataRanges } from '../memory/shared-memory.js';
import { PAGE_SIZE } from '../layout.js';
import { SnapshotError } from './format.js';

const CHUNK = 1024 * 1024;
const ZERO_PAGE = new Uint8Array(PAGE_SIZE);

/**
 * Writes every region of `memory` to `path` (a new file renamed into place: a memory file
 * a running restored VM maps is never rewritten under it). Returns the bytes of guest RAM
 * and the bytes written (the rest are holes).
 */
export function writeMemoryFile(path: string, memory: GuestMemory): { bytes: number; written: number } {
  let offset = 0;
  let written = 0;
  writeFileAtomically(path, (fd) => {
    memory.descriptor.regions.forEach((region, i) => {
      const bytes = memory.regionBytes(i);
      // A shared memory file's holes are skipped unread: reading one would allocate it.
      for (const span of memory.allocatedRanges(i) ?? [{ offset: 0, length: region.size }])
        for (let chunk = span.offset; chunk < span.offset + span.length; chunk += CHUNK) {
          const end = Math.min(span.offset + span.length, chunk + CHUNK);
          // Runs of non-zero pages, each written at its place in the file.
          let run = -1;
          for (let page = chunk; page <= end; page += PAGE_SIZE) {
            const zero = page === end || Buffer.compare(bytes.subarray(page, page + PAGE_SIZE), ZERO_PAGE) === 0;
            if (!zero && run < 0) run = page;
            else if (zero && run >= 0) {
              writeAll(fd, bytes.subarray(run, page), offset + run);
              written += page - run;
              run = -1;
            }
          }
        }
      offset += region.size;
    });
    ftruncateSync(fd, offset);
  });
  return { bytes: offset, written };
}

/** Opens a memory file for a restore, checking it is a regular file of exactly `bytes` bytes. */
export function openMemoryFile(path: string, bytes: number): number {
  const fd = openRegular(path, fsConstants.O_RDONLY, 'memory file');
  const size = fstatSync(fd).size;
  if (size !== bytes) {
    closeSync(fd);
    throw new SnapshotError(`the memory file ${path} is ${size} bytes; the snapshot's guest has ${bytes} bytes of RAM`);
  }
  return fd;
}

/**
 * Writes a Diff memory file: a file of the guest's RAM size holding only the pages
 * `dirty` marks (per region, one bit per page, least significant bit first; from
 * Vm.takeDirtyPages), each at its place, zero pages included; every other page is a hole.
 * As Firecracker's: the data in it is what changed, found with SEEK_DATA/SEEK_HOLE, and
 * rebaseMemoryFile lays it over the memory file it was taken after. Refused on a file
 * system that does not keep holes (the diff would read as all data).
 */
export function writeDiffMemoryFile(
  path: string,
  memory: GuestMemory,
  dirty: readonly Uint8Array[],
): { bytes: number; written: number } {
  let offset = 0;
  let written = 0;
  writeFileAtomically(path, (fd) => {
    memory.descriptor.regions.forEach((region, i) => {
      const bits = dirty[i]!;
      const bytes = memory.regionBytes(i);
      const pages = region.size / PAGE_SIZE;
      const isDirty = (p: number) => p < pages && (bits[p >>> 3]! & (1 << (p & 7))) !== 0;
      for (let p = 0; p < pages; p++) {
        if (!isDirty(p)) continue;
        let end = p + 1;
        while (end - p < CHUNK / PAGE_SIZE && isDirty(end)) end++;
        writeAll(fd, bytes.subarray(p * PAGE_SIZE, end * PAGE_SIZE), offset + p * PAGE_SIZE);
        written += (end - p) * PAGE_SIZE;
        p = end - 1;
      }
      offset += region.size;
    });
    ftruncateSync(fd, offset);
    if (written < offset && dataRanges(fd, offset).reduce((n, r) => n + r.length, 0) > written)
      throw new SnapshotError(
        `the file system of ${path} does not keep holes in files; a Diff snapshot needs one that does (ext4, xfs, btrfs, tmpfs)`,
      );
  });
  return { bytes: offset, written };
}

/** The data ranges (not holes) of the open file `fd` of `size` bytes, by SEEK_DATA/SEEK_HOLE. */
export function dataRanges(fd: number, size: number): Array<{ offset: number; length: number }> {
  try {
    return fileDataRanges(fd, 0, size);
  } catch (err) {
    throw new SnapshotError(`cannot find the data in a memory file: ${(err as Error).message}`);
  }
}

/**
 * Lays a Diff memory file over the memory file it was taken after (Firecracker's
 * `snapshot-editor edit-memory rebase`): the diff's data ranges are copied into `basePath`
 * in place; the result is the memory file a Full snapshot would have written at the diff's
 * time. Both must be regular files of the same size; nothing is written otherwise.
 * Returns the bytes copied.
 */
export function rebaseMemoryFile(basePath: string, diffPath: string): number {
  const diff = openRegular(diffPath, fsConstants.O_RDONLY, 'diff memory file');
  try {
    const base = openRegular(basePath, fsConstants.O_RDWR, 'base memory file');
    try {
      const size = fstatSync(diff).size;
      const baseSize = fstatSync(base).size;
      if (size !== baseSize)
        throw new SnapshotError(
          `the diff ${diffPath} is ${size} bytes and the base ${basePath} ${baseSize}: they are not of one VM`,
        );
      const buf = Buffer.alloc(CHUNK);
      let copied = 0;
      for (const range of dataRanges(diff, size)) {
        for (let at = range.offset; at < range.offset + range.length;) {
          const n = readSync(diff, buf, 0, Math.min(CHUNK, range.offset + range.length - at), at);
          if (n <= 0) throw new SnapshotError(`the diff ${diffPath} ended early at byte ${at}`);
          writeAll(base, buf.subarray(0, n), at);
          at += n;
          copied += n;
        }
      }
      fsyncSync(base);
      return copied;
    } finally {
      closeSync(base);
    }
  } finally {
    closeSync(diff);
  }
}

/** Opens `path` non-blocking (a FIFO cannot stall the VMM) and checks it is a regular file. */
function openRegular(path: string, flags: number, what: string): number {
  let fd: number;
  try {
    fd = openSync(path, flags | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
  } catch (err) {
    throw new SnapshotError(
      `cannot open the ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
  if (!fstatSync(fd).isFile()) {
    closeSync(fd);
    throw new SnapshotError(`the ${what} ${path} is not a regular file`);
  }
  return fd;
}
