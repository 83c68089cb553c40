// Complete-or-nothing file writes: a temporary file beside the target, filled, synced,
// then renamed over it (the directory synced too). A failure removes the temporary file
// and leaves the old file as it was; a crash leaves only a temporary file, which carries
// TMP_MARK in its name so it can be swept.
import { closeSync, fsyncSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';

export const TMP_MARK = '.tmp-';

/** Writes all of `bytes` at `position` (writeSync may write less than asked: looped; ENOSPC throws). */
export function writeAll(fd: number, bytes: Uint8Array, position: number | null = null): void {
  for (let done = 0; done < bytes.length;) {
    done += writeSync(fd, bytes, done, bytes.length - done, position === null ? null : position + done);
  }
}

/** Creates `path` anew through `fill(fd)`, atomically. */
export function writeFileAtomically(path: string, fill: (fd: number) => void, mode = 0o600): void {
  const tmp = `${path}${TMP_MARK}${process.pid}`;
  try {
    const fd = openSync(tmp, 'w', mode);
    try {
      fill(fd);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }
  const dfd = openSync(dirname(path), 'r');
  try {
    fsyncSync(dfd);
  } finally {
    closeSync(dfd);
  }
}
