// The manager's snapshots: one directory per snapshot under <state>/snapshots/<vm>/<tag>,
// holding kiln-vmm's state and memory files, a copy of every writable disk taken while
// the VM was paused (so a restore is consistent), and meta.json. A snapshot is built in
// a temporary directory and renamed into place whole; a tag that exists is never
// replaced, and one the manager did not finish (no meta.json) is not listed.
import {
  closeSync,
  constants as fsConstants,
  copyFileSync,
  existsSync,
  fstatSync,
  ftruncateSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
} from 'node:fs';
import { join } from 'node:path';
import { TMP_MARK, writeAll } from '../atomic-file.js';
import type { VmConfig } from '../config/vm-config.js';
import { KilnError } from '../errors.js';
import { NAME_RULE } from './definition.js';

export interface SnapshotMeta {
  readonly vm: string;
  readonly tag: string;
  readonly createdAt: string;
  /** The VM's configuration as its VMM ran it (host paths). */
  readonly config: VmConfig;
  /** Whether the VMM that took it was jailed (its socket paths inside the state are the jail's). */
  readonly jailed: boolean;
  readonly stateBytes: number;
  readonly memoryBytes: number;
  /** Bytes the memory file holds on disk (it is sparse). */
  readonly memoryOnDisk: number;
  /** Each writable disk's copy: drive id, the disk's path, the copy's file name. */
  readonly disks: ReadonlyArray<{
    readonly id: string;
    readonly path: string;
    readonly file: string;
    readonly bytes: number;
  }>;
  readonly createMs: number;
  /**
   * 'diff': the memory file holds only the pages that changed since `base` (a snapshot of
   * the same run of the VM); a restore lays the chain of diffs over the full one at its
   * root. Absent in snapshots taken before diffs existed: full.
   */
  readonly type?: 'full' | 'diff';
  readonly base?: string;
}

export const STATE_FILE = 'state';
export const MEMORY_FILE = 'memory';
const META_FILE = 'meta.json';

export function checkTag(tag: string): string {
  if (!NAME_RULE.test(tag))
    throw new KilnError(
      `invalid snapshot tag '${tag}': use 1-63 lower-case letters, digits and dashes, starting with a letter or digit`,
    );
  return tag;
}

/** A tag from the time: snap-YYYYMMDD-HHMMSS. */
export function defaultTag(now = new Date()): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `snap-${now.getUTCFullYear()}${p(now.getUTCMonth() + 1)}${p(now.getUTCDate())}-${p(now.getUTCHours())}${p(now.getUTCMinutes())}${p(now.getUTCSeconds())}`;
}

/** The finished snapshots in `dir` (a VM's snapshot directory), oldest first. */
export function listSnapshots(dir: string): SnapshotMeta[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  const out: SnapshotMeta[] = [];
  for (const n of names) {
    if (n.includes(TMP_MARK)) continue;
    try {
      out.push(JSON.parse(readFileSync(join(dir, n, META_FILE), 'utf8')) as SnapshotMeta);
    } catch {
      // not a finished snapshot
    }
  }
  return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

export function readSnapshot(dir: string, vm: string, tag: string): SnapshotMeta {
  checkTag(tag);
  try {
    return JSON.parse(readFileSync(join(dir, tag, META_FILE), 'utf8')) as SnapshotMeta;
  } catch {
    throw new KilnError(`'${vm}' has no snapshot '${tag}' (kiln snapshots ${vm} lists them)`);
  }
}

/** The snapshots a restore of `tag` needs, the full one first and `tag` last. */
export function snapshotChain(dir: string, vm: string, tag: string): SnapshotMeta[] {
  const chain: SnapshotMeta[] = [];
  for (let at: string | undefined = tag; at !== undefined;) {
    if (chain.some((s) => s.tag === at))
      throw new KilnError(`'${vm}': the snapshots of '${tag}' form a loop at '${at}'`);
    const meta = readSnapshot(dir, vm, at);
    chain.unshift(meta);
    at = meta.type === 'diff' ? meta.base : undefined;
  }
  return chain;
}

/**
 * Writes the whole memory of the last snapshot of `chain` (snapshotChain) to `to`, a new
 * file (one a failed build left there is replaced): the full snapshot's memory copied (a
 * reflink where possible), each diff laid over it in turn; `say` hears that it happens.
 */
export async function buildChainMemory(
  dir: string,
  chain: readonly SnapshotMeta[],
  to: string,
  say: (line: string) => void,
): Promise<void> {
  // The FFI (SEEK_DATA) loads only when a diff is restored.
  const { rebaseMemoryFile } = await import('../snapshot/memory-file.js');
  say(`'${chain[0]!.vm}': laying ${chain.length - 1} diff(s) over '${chain[0]!.tag}'`);
  rmSync(to, { force: true });
  copyDisk(join(dir, chain[0]!.tag, MEMORY_FILE), to);
  try {
    for (const diff of chain.slice(1)) rebaseMemoryFile(to, join(dir, diff.tag, MEMORY_FILE));
  } catch (err) {
    rmSync(to, { force: true });
    throw err;
  }
}

/** Moves a file (rename, or copy and unlink across file systems). */
export function moveFile(from: string, to: string): void {
  try {
    renameSync(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
    copyFileSync(from, to);
    unlinkSync(from);
  }
}

const CHUNK = 1024 * 1024;

/**
 * Copies a disk image: a reflink (FICLONE) where the file system shares blocks, else a
 * sparse copy (runs of zeros become holes). Returns whether it was a reflink.
 */
export function copyDisk(from: string, to: string, progress?: (done: number, total: number) => void): boolean {
  try {
    copyFileSync(from, to, fsConstants.COPYFILE_FICLONE_FORCE | fsConstants.COPYFILE_EXCL);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' || code === 'ENOENT') throw err;
    rmSync(to, { force: true });
  }
  const src = openSync(from, fsConstants.O_RDONLY);
  const dst = openSync(to, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
  try {
    const total = fstatSync(src).size;
    const buf = Buffer.alloc(CHUNK);
    const zero = Buffer.alloc(CHUNK);
    let last = 0;
    for (let at = 0; at < total;) {
      const n = readSync(src, buf, 0, Math.min(CHUNK, total - at), at);
      if (n === 0) break;
      if (buf.compare(zero, 0, n, 0, n) !== 0) writeAll(dst, buf.subarray(0, n), at);
      at += n;
      if (progress && (at - last >= 64 * CHUNK || at === total)) {
        progress(at, total);
        last = at;
      }
    }
    ftruncateSync(dst, total);
  } finally {
    closeSync(src);
    closeSync(dst);
  }
  return false;
}

/** Removes a snapshot directory (and a temporary one a failed create left). */
export function removeSnapshotDir(path: string): void {
  rmSync(path, { recursive: true, force: true });
}

export function writeMeta(dir: string, meta: SnapshotMeta): void {
  const fd = openSync(join(dir, META_FILE), 'w', 0o600);
  try {
    writeAll(fd, Buffer.from(JSON.stringify(meta, null, 2)));
  } finally {
    closeSync(fd);
  }
}

export function sizeOnDisk(path: string): number {
  const st = statSync(path);
  return st.blocks * 512;
}

export const snapshotExists = (dir: string, tag: string): boolean => existsSync(join(dir, tag));
