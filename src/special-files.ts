// What a path handed to Kiln may be (an API client's drive, log or metrics path): checked on
// the opened fd (fstat: no race with a rename) and on its file system (a pseudo-file such as
// /proc/self/mem or a sysfs attribute is never a disk image or a log).
import { fstatSync, statfsSync } from 'node:fs';
import { KilnError } from './errors.js';

export type FileKind = 'regular file' | 'block device' | 'FIFO' | 'character device' | 'directory' | 'socket' | 'other';

// statfs(2) f_type of the kernel's pseudo file systems (linux/magic.h).
const PSEUDO_FS: ReadonlyMap<number, string> = new Map([
  [0x9fa0, 'procfs'],
  [0x62656572, 'sysfs'],
  [0x64626720, 'debugfs'],
  [0x73636673, 'securityfs'],
  [0x27e0eb, 'cgroupfs'],
  [0x63677270, 'cgroup2fs'],
  [0x74726163, 'tracefs'],
  [0xcafe4a11, 'bpffs'],
  [0x6e736673, 'nsfs'],
]);

/** /dev/null (character device 1:3): a log or metrics path some orchestrators give to discard them. */
export function isNullDevice(fd: number): boolean {
  const st = fstatSync(fd);
  return st.isCharacterDevice() && st.rdev === ((1 << 8) | 3);
}

export function fileKind(fd: number): FileKind {
  const st = fstatSync(fd);
  if (st.isFile()) return 'regular file';
  if (st.isBlockDevice()) return 'block device';
  if (st.isFIFO()) return 'FIFO';
  if (st.isCharacterDevice()) return 'character device';
  if (st.isDirectory()) return 'directory';
  if (st.isSocket()) return 'socket';
  return 'other';
}

/** Throws (naming the path and what it is) unless the opened `fd` is one of `allowed` on a real file system. */
export function requireKind(fd: number, path: string, what: string, allowed: readonly FileKind[]): void {
  const kind = fileKind(fd);
  if (!allowed.includes(kind))
    throw new KilnError(`${what} ${path} is a ${kind}; it must be a ${allowed.join(' or a ')}`);
  let type: number | null = null;
  try {
    type = statfsSync(path).type;
  } catch {
    // renamed away since it was opened: the fd's kind was checked, nothing more to learn
  }
  const pseudo = type === null ? undefined : PSEUDO_FS.get(type);
  if (pseudo) throw new KilnError(`${what} ${path} is on ${pseudo}, not a file Kiln may use`);
}
