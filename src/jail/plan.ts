// What kiln-jailer builds, decided before anything is touched: the checked options
// (Firecracker's jailer flags), the chroot's place, and the host files the VMM needs to
// run inside it (node, its shared libraries, Kiln's package), each exposed read-only at
// its own absolute path.
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  lstatSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  readSync,
  realpathSync,
} from 'node:fs';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { KilnError } from '../errors.js';

export class JailError extends KilnError {}

export interface JailOptions {
  readonly id: string;
  /** The VMM entry point as given (its base name names the jail's directory). */
  readonly execFile: string;
  readonly uid: number;
  readonly gid: number;
  readonly chrootBaseDir: string;
  readonly netns: string | null;
  readonly cgroups: ReadonlyArray<{ readonly file: string; readonly value: string }>;
  readonly cgroupVersion: 1 | 2;
  readonly parentCgroup: string | null;
  readonly resourceLimits: { readonly fsize?: bigint; readonly noFile?: bigint };
  readonly daemonize: boolean;
  readonly newPidNs: boolean;
  /** Kiln's own: host paths bound into the jail (read-only unless `rw`), at `target` inside it. */
  readonly binds: ReadonlyArray<{ readonly source: string; readonly target: string; readonly rw: boolean }>;
  /** Kiln's own: the jail's mount namespace is a slave of the host's (see --late-binds). */
  readonly lateBinds?: boolean;
  /** Kiln's own: inherited fds left open for the VMM (a guest memory file, kiln upgrade). */
  readonly passFds?: readonly number[];
  /** The VMM's own arguments (after `--`). */
  readonly vmmArgs: readonly string[];
}

export const DEFAULT_CHROOT_BASE = '/srv/jailer';
/** Firecracker's jailer bounds open files to this when no --resource-limit no-file is given. */
export const DEFAULT_NO_FILE = 2048n;
const ID = /^[a-zA-Z0-9-]{1,64}$/;

export function checkId(id: string): string {
  if (!ID.test(id)) throw new JailError(`invalid --id '${id}': use letters, digits and '-', at most 64 characters`);
  return id;
}

export function checkUidGid(what: 'uid' | 'gid', text: string): number {
  if (!/^\d{1,10}$/.test(text) || Number(text) > 0xfffffffe)
    throw new JailError(`invalid --${what} '${text}': a number from 0 to 4294967294`);
  return Number(text);
}

export function parseResourceLimit(text: string, into: { fsize?: bigint; noFile?: bigint }): void {
  const m = /^(fsize|no-file)=(\d{1,19})$/.exec(text);
  if (!m) throw new JailError(`invalid --resource-limit '${text}': use fsize=BYTES or no-file=COUNT`);
  const value = BigInt(m[2]!);
  if (m[1] === 'fsize') into.fsize = value;
  else into.noFile = value;
}

export function parseCgroup(text: string): { file: string; value: string } {
  const m = /^([a-z_]+\.[a-z_.]+)=(.+)$/.exec(text);
  if (!m || m[1]!.includes('..'))
    throw new JailError(`invalid --cgroup '${text}': use <controller>.<file>=<value>, e.g. cpuset.cpus=0`);
  if (/[\n\0]/.test(m[2]!)) throw new JailError(`invalid --cgroup '${text}': the value is one line`);
  return { file: m[1]!, value: m[2]! };
}

export function checkParentCgroup(text: string): string {
  if (isAbsolute(text) || text.split('/').some((part) => part === '..' || part === '') || /[\n\0]/.test(text))
    throw new JailError(`invalid --parent-cgroup '${text}': a relative path without '..'`);
  return text;
}

/** Kiln's --bind SOURCE[:TARGET][:ro|rw] (TARGET defaults to SOURCE). */
export function parseBind(text: string): { source: string; target: string; rw: boolean } {
  const parts = text.split(':');
  let rw = false;
  if (parts.length > 1 && (parts.at(-1) === 'ro' || parts.at(-1) === 'rw')) rw = parts.pop() === 'rw';
  if (parts.length < 1 || parts.length > 2)
    throw new JailError(`invalid --bind '${text}': use SOURCE[:TARGET][:ro|rw]`);
  const [source, target = source] = parts as [string, string?];
  if (!isAbsolute(source) || !isAbsolute(target) || target.split('/').includes('..'))
    throw new JailError(`invalid --bind '${text}': absolute paths, and no '..' in the target`);
  return { source, target, rw };
}

/** `<chroot-base>/<exec-file name>/<id>`, and its `root`, as Firecracker lays them out. */
export function jailPaths(opts: Pick<JailOptions, 'chrootBaseDir' | 'execFile' | 'id'>): {
  jailDir: string;
  rootDir: string;
} {
  const jailDir = join(resolve(opts.chrootBaseDir), basename(opts.execFile), opts.id);
  return { jailDir, rootDir: join(jailDir, 'root') };
}

/** One step of exposing a host path inside the jail. */
export type RuntimeEntry =
  | { readonly kind: 'symlink'; readonly path: string; readonly target: string }
  | { readonly kind: 'mkdir'; readonly path: string }
  | { readonly kind: 'bind'; readonly path: string; readonly dir: boolean };

/** The directory holding package.json of the package that owns `file`. */
export function packageRoot(file: string): string {
  let dir = dirname(realpathSync(file));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'node_modules'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw new JailError(`cannot find the package (package.json and node_modules) that holds ${file}`);
    dir = up;
  }
}

/**
 * The program interpreter an ELF executable names (PT_INTERP: the dynamic loader), or null
 * for a file that names none (a shared object), that is not a 64-bit little-endian ELF or
 * that cannot be read.
 */
export function elfInterpreter(elf: string): string | null {
  let fd: number;
  try {
    fd = openSync(elf, 'r');
  } catch {
    return null;
  }
  try {
    const head = Buffer.alloc(64);
    if (readSync(fd, head, 0, 64, 0) < 64 || head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2 || head[5] !== 1)
      return null;
    const phoff = Number(head.readBigUInt64LE(0x20));
    const phentsize = head.readUInt16LE(0x36);
    const phnum = head.readUInt16LE(0x38);
    const ph = Buffer.alloc(56);
    for (let i = 0; i < phnum; i++) {
      if (readSync(fd, ph, 0, 56, phoff + i * phentsize) < 56) return null;
      if (ph.readUInt32LE(0) !== PT_INTERP) continue;
      const size = Number(ph.readBigUInt64LE(32));
      if (size < 2 || size > 4096) return null;
      const name = Buffer.alloc(size);
      if (readSync(fd, name, 0, size, Number(ph.readBigUInt64LE(8))) < size) return null;
      const path = name.toString('latin1', 0, name.indexOf(0) < 0 ? size : name.indexOf(0));
      return isAbsolute(path) ? path : null;
    }
    return null;
  } finally {
    closeSync(fd);
  }
}
const PT_INTERP = 3;

/**
 * The shared objects an ELF file loads, as the dynamic loader resolves them: the loader
 * itself asked (`LOADER --list FILE`, with node's loader for a shared object), which is
 * what `ldd` does through a shell script and two more runs of the loader (~25 ms each
 * here, against ~5); `ldd` where the loader cannot be asked so.
 */
export function sharedLibraries(elf: string, nodePath = process.execPath): string[] {
  const loader = elfInterpreter(elf) ?? elfInterpreter(nodePath);
  let out: string | null = null;
  if (loader !== null) {
    try {
      out = execFileSync(loader, ['--list', elf], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch {
      out = null;
    }
  }
  if (out === null) {
    try {
      out = execFileSync('ldd', [elf], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      throw new JailError(`cannot list the libraries of ${elf} (ldd): ${(err as Error).message.split('\n')[0]}`);
    }
  }
  const libs: string[] = [];
  for (const line of out.split('\n')) {
    const arrow = /=>\s+(\/\S+)/.exec(line);
    const bare = /^\s*(\/\S+)\s+\(/.exec(line);
    const path = arrow?.[1] ?? bare?.[1];
    if (path) libs.push(path);
  }
  return libs;
}

/**
 * The native addons of the package at `root` that this process has loaded (koffi's, for
 * its libc calls): the ones the VMM, the same package run by the same node, loads too.
 * Other builds of an addon in the package (koffi ships a musl one beside glibc's) are
 * never loaded here, so their libraries are not the jail's business. Empty where /proc
 * cannot be read.
 */
export function loadedAddons(root: string): string[] {
  let maps: string;
  try {
    maps = readFileSync('/proc/self/maps', 'utf8');
  } catch {
    return [];
  }
  const found = new Set<string>();
  for (const line of maps.split('\n')) {
    const at = line.indexOf('/');
    if (at < 0) continue;
    const path = line.slice(at);
    if (path.endsWith('.node') && path.startsWith(`${root}/`)) found.add(path);
  }
  return [...found];
}

/** Native addons (.node) under a package's node_modules (koffi's). */
export function nativeAddons(root: string): string[] {
  const found: string[] = [];
  const walk = (dir: string, depth: number) => {
    if (depth > 8) return;
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path, depth + 1);
      else if (entry.isFile() && entry.name.endsWith('.node')) found.push(path);
    }
  };
  const modules = join(root, 'node_modules');
  if (existsSync(modules)) walk(modules, 0);
  return found;
}

/**
 * The steps that make `hostPath` resolve inside the jail as it does on the host: every
 * symlink met on the way is recreated (so /lib64/ld-linux-x86-64.so.2 still reaches the
 * loader through /lib64 -> usr/lib64 and the loader's own link), every directory made,
 * and the final file or directory listed for a read-only bind mount.
 */
export function exposure(hostPath: string, seen = new Set<string>()): RuntimeEntry[] {
  const steps: RuntimeEntry[] = [];
  const parts = resolve(hostPath).split('/').filter(Boolean);
  let at = '/';
  for (let i = 0; i < parts.length; i++) {
    const path = join(at, parts[i]!);
    const st = lstatSync(path);
    if (st.isSymbolicLink()) {
      const target = readlinkSync(path);
      if (!seen.has(path)) {
        seen.add(path);
        steps.push({ kind: 'symlink', path, target });
      }
      const rest = parts.slice(i + 1).join('/');
      const next = resolve(dirname(path), target);
      if (seen.size > 64) throw new JailError(`too many symbolic links resolving ${hostPath}`);
      return [...steps, ...exposure(rest ? join(next, rest) : next, seen)];
    }
    if (i === parts.length - 1) {
      steps.push({ kind: 'bind', path, dir: st.isDirectory() });
    } else if (!seen.has(path)) {
      seen.add(path);
      steps.push({ kind: 'mkdir', path });
    }
    at = path;
  }
  return steps;
}

/** Everything the VMM needs from the host to start inside the jail, de-duplicated. */
export function runtimeEntries(execFile: string, nodePath = process.execPath): RuntimeEntry[] {
  const root = packageRoot(execFile);
  const files = new Set<string>([nodePath, ...sharedLibraries(nodePath, nodePath)]);
  const loaded = loadedAddons(realpathSync(root));
  for (const addon of loaded.length > 0 ? loaded : nativeAddons(root))
    for (const lib of sharedLibraries(addon, nodePath)) files.add(lib);
  if (existsSync('/etc/ld.so.cache')) files.add('/etc/ld.so.cache');
  files.add(root);
  const seen = new Set<string>();
  const entries: RuntimeEntry[] = [];
  const listed = new Set<string>();
  for (const f of files) {
    for (const e of exposure(f, seen)) {
      const key = `${e.kind}:${e.path}`;
      if (listed.has(key)) continue;
      listed.add(key);
      entries.push(e);
    }
  }
  return entries;
}
