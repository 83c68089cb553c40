// The snapshot memory file: guest RAM regions back to back, as Firecracker writes it,
// but sparse: a page of zeros is a hole (never written), so a guest that touched little
// of its RAM gives a small file. A restore maps it MAP_PRIVATE (guest-memory.ts): pages
// come in as the guest touches them and its writes never reach the file.
import { closeSync, fstatSync, ftruncateSync, openSync, constants as fsConstants } from 'node:fs';
import { writeAll, writeFileAtomically } from '../atomic-file.js';
import type { GuestMemory } from '../memory/guest-memory.js';
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
      for (let chunk = 0; chunk < region.size; chunk += CHUNK) {
        const end = Math.min(region.size, chunk + CHUNK);
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
  let fd: number;
  try {
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
  } catch (err) {
    throw new SnapshotError(
      `cannot open the memory file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new SnapshotError(`the memory file ${path} is not a regular file`);
    if (st.size !== bytes)
      throw new SnapshotError(
        `the memory file ${path} is ${st.size} bytes; the snapshot's guest has ${bytes} bytes of RAM`,
      );
    return fd;
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}
