// What both stages of kiln-jailer (and its cgroups) do to the file system: make directories
// and mount points without ever following a symbolic link (a tenant of a previous run may
// have planted one in a jail it owned), and turn a failed system call into a JailError.
import { closeSync, constants, lstatSync, mkdirSync, openSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import * as libc from '../kvm/libc.js';
import { JailError } from './plan.js';

/** A failed call (-1 with errno) as a JailError naming `what`. */
export function checkCall(rc: number, what: string): void {
  if (rc < 0) throw new JailError(`${what}: ${libc.errnoName(libc.errno())} (${libc.strerror(libc.errno())})`);
}

/**
 * Marks every fd from 3 up close-on-exec, but those in `keep` (inherited fds the jailer
 * passes on to the VMM: --pass-fd). Nothing else crosses an exec.
 */
export function closeOnExecFrom3(keep: readonly number[]): void {
  let first = 3;
  for (const fd of [...new Set(keep)].sort((a, b) => a - b)) {
    if (fd < first) continue;
    if (fd > first) checkCall(libc.closeRange(first, fd - 1, libc.CLOSE_RANGE_CLOEXEC), 'close_range');
    checkCall(libc.fcntlInt(fd, libc.F_SETFD, 0), `keeping fd ${fd} open across exec`);
    first = fd + 1;
  }
  checkCall(libc.closeRange(first, 0xffffffff, libc.CLOSE_RANGE_CLOEXEC), 'close_range');
}

export function lstatOrNull(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** A directory to create things in: made if missing, refused if it is anything but a directory (a link, say). */
export function ensureDir(path: string): void {
  const st = lstatOrNull(path);
  if (st === null) mkdirSync(path, { mode: 0o755 });
  else if (!st.isDirectory()) throw new JailError(`refusing ${path}: it exists and is not a directory`);
}

/** mkdir -p of `relative` below `base` (which is trusted), each component by ensureDir; returns the last. */
export function ensureDirs(base: string, relative: string): string {
  let at = base;
  for (const part of relative.split('/').filter(Boolean)) {
    at = join(at, part);
    ensureDir(at);
  }
  return at;
}

/** An empty regular file to mount over (never following a link). */
export function ensureFile(path: string): void {
  const st = lstatOrNull(path);
  if (st === null)
    closeSync(openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o644));
  else if (!st.isFile()) throw new JailError(`refusing ${path}: it exists and is not a regular file`);
}
