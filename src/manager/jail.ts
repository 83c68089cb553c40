// The manager's jail for each VM (issue: every VMM jailed by default): kiln-jailer runs the
// VMM as a uid of its own (one per running VM, from JAIL_UID_BASE), with no new privileges,
// in a chroot under the VM's run directory that holds only its kernel, initrd and disks
// (read-only bind mounts, disks read-write when they are), passt's socket, its config and
// its own sockets (API, serial, vsock, console), which the manager links to from outside.
// `kiln start --no-jail` runs the VMM as root in the host's namespaces, for debugging.
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KilnError } from '../errors.js';
import { isKilnVmmEntry, KILN_VMM } from '../host.js';
import { ensureDir, ensureDirs, ensureFile, lstatOrNull } from '../jail/steps.js';
import * as libc from '../kvm/libc.js';
import type { VmConfig } from '../config/vm-config.js';

/** The first uid (and gid) jailed VMMs run as; VM n running at once gets BASE + n. */
export const JAIL_UID_BASE = 2_000_000_000;
const JAILER = fileURLToPath(new URL('../jail/jailer-cli.cjs', import.meta.url));

/** What `kiln info` shows, kept in the VM's run directory while it runs. */
export interface JailRecord {
  readonly jailed: boolean;
  readonly uid: number | null;
  readonly root: string | null;
  /** TAPs the manager made persistent for the jail user (undone at stop). */
  readonly taps: readonly string[];
  /** Files chowned to the jail user, with their owners before (given back at stop). */
  readonly lent?: ReadonlyArray<{ readonly path: string; readonly uid: number; readonly gid: number }>;
  /** Links the manager made at the definition's socket paths, into the jail (removed at stop). */
  readonly links?: readonly string[];
  /** A pool process's jail: the host-side bind mounts made into it, and its pool slot (both undone at stop). */
  readonly mounts?: readonly string[];
  readonly poolDir?: string;
  /** The VMM's --id when it is not the VM's name (a pool process keeps the one it was started with). */
  readonly vmmId?: string;
}

export const NOT_JAILED: JailRecord = { jailed: false, uid: null, root: null, taps: [] };

/**
 * Gives files lent to a jail user back to their owners, as libvirt restores what its
 * dynamic ownership changed; a file someone has chowned since is left alone. Returns
 * what could not be given back.
 */
export function returnLentFiles(record: JailRecord): string[] {
  const failed: string[] = [];
  for (const f of record.lent ?? []) {
    try {
      if (statSync(f.path).uid === record.uid) chownSync(f.path, f.uid, f.gid);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') failed.push(`${f.path}: ${(err as Error).message}`);
    }
  }
  return failed;
}

export function readJailRecord(run: string): JailRecord | null {
  try {
    return JSON.parse(readFileSync(join(run, 'jail.json'), 'utf8')) as JailRecord;
  } catch {
    // no record: the VM has not started since jails were introduced, or is stopped
    return null;
  }
}

export function writeJailRecord(run: string, record: JailRecord): void {
  writeFileSync(join(run, 'jail.json'), JSON.stringify(record), { mode: 0o600 });
}

/** The lowest jail uid no running VM uses. */
export function allocateJailUid(inUse: ReadonlySet<number>): number {
  for (let uid = JAIL_UID_BASE; ; uid++) if (!inUse.has(uid)) return uid;
}

/** Where the jailed VMM's sockets are, inside its jail (its /run is the jail user's). */
export const JAIL_VSOCK = '/run/vsock/v.sock';
export const JAIL_CONSOLE = '/run/console.sock';
const jailPasst = (i: number) => `/run/passt-${i}.sock`;
/** Where a snapshot being restored is bound in the jail, and where kiln snapshot has the VMM write one. */
export const JAIL_SNAPSHOT_STATE = '/snapshot/state';
export const JAIL_SNAPSHOT_MEMORY = '/snapshot/memory';
export const JAIL_NEW_SNAPSHOT = { state: '/new-snapshot.state', memory: '/new-snapshot.memory' } as const;

/**
 * Makes `path` a link to `target` (a socket inside VM `run`'s jail), replacing only a
 * link a previous start made (one that points into `run`'s jail); anything else there
 * is refused, never removed.
 */
function linkSocket(run: string, path: string, target: string): void {
  const st = lstatOrNull(path);
  if (st !== null) {
    if (!st.isSymbolicLink() || !ownLink(run, path))
      throw new KilnError(
        `'${path}' exists: the jailed VMM's socket is linked there (remove it, or choose another path)`,
      );
    rmSync(path);
  }
  symlinkSync(target, path);
}

/** Whether `path` is a link this manager made into `run`'s jail. */
function ownLink(run: string, path: string): boolean {
  try {
    return readlinkSync(path).startsWith(join(run, 'jail') + '/');
  } catch {
    return false;
  }
}

/** Removes the links to a stopped jail's sockets (only links into `run`'s jail). */
export function removeSocketLinks(run: string, record: JailRecord): void {
  for (const link of record.links ?? []) if (ownLink(run, link)) rmSync(link, { force: true });
}

/**
 * Prepares VM `name`'s jail under `run` and returns the command that starts its VMM
 * there (kiln-jailer, which executes kiln-vmm) and the record to keep.
 *
 * Sockets: the VMM creates its vsock and console sockets in its jail's /run; the
 * manager links the definition's paths to them (a client connects through the link).
 * vsock's guest-initiated connections reach listeners beside the jail's socket
 * (`<root>/run/vsock/v.sock_PORT`), as with Firecracker's jailer. A passt socket is
 * bound into the jail.
 */
export function prepareJail(
  run: string,
  name: string,
  config: VmConfig,
  uid: number,
  lendTap: (tap: string, uid: number) => boolean,
  /**
   * A snapshot to load (kiln restore): its files are bound in read-only and no config is
   * given; 'receive': no config either (an incoming migration brings it).
   */
  restore?: { readonly state: string; readonly memory: string } | 'receive',
  /** Disks whose image is another file (a clone's copies), bound at the path the VMM opens. */
  diskSources: ReadonlyMap<string, string> = new Map(),
  /**
   * A pool process already jailed (pool.ts): its root, whose files are bound in from the
   * host (they propagate into its mount namespace), and its slot directory.
   */
  pooled?: { readonly root: string; readonly dir: string; readonly id: string },
): { argv: string[]; record: JailRecord; config: VmConfig } {
  const base = join(run, 'jail');
  // A previous run's jail: its mounts died with its mount namespace; only mount points and sockets are left.
  rmSync(base, { recursive: true, force: true });
  const root = pooled ? pooled.root : join(base, basename(KILN_VMM), name, 'root');
  if (!pooled) {
    mkdirSync(root, { recursive: true, mode: 0o755 });
    chmodSync(root, 0o755);
  }
  // What the jail's VMM sees: the same paths for files, its own for sockets.
  const jailed: VmConfig = {
    ...config,
    nets: config.nets.map((n, i) => (n.passt !== undefined ? { ...n, passt: jailPasst(i) } : n)),
    ...(config.vsock ? { vsock: { ...config.vsock, uds: JAIL_VSOCK } } : {}),
    ...(config.consoleSocket !== undefined ? { consoleSocket: JAIL_CONSOLE } : {}),
  };
  const files: Array<{ path: string; target: string; rw: boolean }> = [];
  if (config.kernel !== undefined) files.push({ path: config.kernel, target: config.kernel, rw: false });
  if (config.initrd !== undefined) files.push({ path: config.initrd, target: config.initrd, rw: false });
  for (const d of config.disks)
    files.push({ path: diskSources.get(d.path) ?? d.path, target: d.path, rw: !d.readOnly });
  if (restore && restore !== 'receive') {
    files.push({ path: restore.state, target: JAIL_SNAPSHOT_STATE, rw: false });
    files.push({ path: restore.memory, target: JAIL_SNAPSHOT_MEMORY, rw: false });
  }
  config.nets.forEach((n, i) => {
    if (n.passt !== undefined) {
      if (!lstatOrNull(n.passt)?.isSocket())
        throw new KilnError(`passt socket '${n.passt}' of '${name}' is not a socket: is passt running?`);
      files.push({ path: n.passt, target: jailPasst(i), rw: true });
    }
  });
  // Links first: a path that is not free fails the start before anything is lent.
  const links: string[] = [];
  if (config.vsock) {
    linkSocket(run, config.vsock.uds, join(root, JAIL_VSOCK));
    links.push(config.vsock.uds);
  }
  if (config.consoleSocket !== undefined) {
    linkSocket(run, config.consoleSocket, join(root, JAIL_CONSOLE));
    links.push(config.consoleSocket);
  }
  const lent: Array<{ path: string; uid: number; gid: number }> = [];
  for (const f of files) {
    // The jail user must be able to open it (as libvirt's dynamic ownership does for its qemu user).
    const st = statSync(f.path);
    const others = f.rw ? 0o006 : 0o004;
    if ((st.mode & others) !== others && st.uid !== uid) {
      chownSync(f.path, uid, uid);
      lent.push({ path: f.path, uid: st.uid, gid: st.gid });
    }
  }
  // The config (kernel command line included) is the jail user's alone.
  const configFile = join(root, 'kiln-config.json');
  writeFileSync(configFile, JSON.stringify(jailed), { mode: 0o600 });
  chownSync(configFile, uid, uid);
  if (config.vsock) {
    // Listeners for guest-initiated connections go beside the socket, as the jail user's.
    const dir = join(root, 'run', 'vsock');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    chownSync(dir, uid, uid);
  }
  // The VMM's sockets live in its jail's /run; the manager reaches them through links in the run directory.
  for (const sock of ['api.sock', 'serial.sock']) {
    rmSync(join(run, sock), { force: true });
    symlinkSync(join(root, 'run', sock), join(run, sock));
  }
  const taps: string[] = [];
  for (const n of config.nets) if (n.tap !== undefined && lendTap(n.tap, uid)) taps.push(n.tap);
  if (pooled) {
    const mounts: string[] = [];
    // The directories made for mount points must be passable by the jail user (the daemon's umask is 077).
    const umask = process.umask(0o022);
    try {
      for (const f of files) mounts.push(lateBind(root, f.path, f.target, f.rw));
    } catch (err) {
      unmountAll(mounts);
      throw err;
    } finally {
      process.umask(umask);
    }
    return {
      argv: [],
      record: { jailed: true, uid, root, taps, lent, links, mounts, poolDir: pooled.dir, vmmId: pooled.id },
      config: jailed,
    };
  }
  const argv = jailerArgv(
    name,
    uid,
    base,
    files.flatMap((f) => ['--bind', `${f.path}:${f.target}:${f.rw ? 'rw' : 'ro'}`]),
    restore ? [] : ['--kiln-config', '/kiln-config.json'],
  );
  return { argv, record: { jailed: true, uid, root, taps, lent, links }, config: jailed };
}

/**
 * The command that starts a jailed kiln-vmm `id` as `uid` under `base`: kiln-jailer with
 * `jailerFlags`, then the VMM with its API and serial sockets in the jail's /run and
 * `vmmFlags`.
 */
export function jailerArgv(
  id: string,
  uid: number,
  base: string,
  jailerFlags: readonly string[],
  vmmFlags: readonly string[],
): string[] {
  return [
    process.execPath,
    JAILER,
    '--id',
    id,
    '--exec-file',
    KILN_VMM,
    '--uid',
    String(uid),
    '--gid',
    String(uid),
    '--chroot-base-dir',
    base,
    ...jailerFlags,
    '--',
    '--api-sock',
    '/run/api.sock',
    ...vmmFlags,
    '--serial-sock',
    '/run/serial.sock',
  ];
}

/**
 * Binds host file `source` at `target` inside a pool jail's `root`, from the host (the
 * mount propagates into the jail): nosuid, nodev, read-only unless `rw`. Mount points are
 * made without following links. The pool process has run no guest code yet, so nothing
 * in its root is a tenant's.
 */
function lateBind(root: string, source: string, target: string, rw: boolean): string {
  const at = join(ensureDirs(root, dirname(target)), basename(target));
  if (statSync(source).isDirectory()) ensureDir(at);
  else ensureFile(at);
  const fail = (what: string) =>
    new KilnError(`cannot bind ${source} into the pool jail (${what}): ${libc.errnoName(libc.errno())}`);
  if (libc.mount(source, at, null, libc.MS_BIND, null) !== 0) throw fail('bind');
  const flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID | libc.MS_NODEV | (rw ? 0 : libc.MS_RDONLY);
  if (libc.mount(null, at, null, flags, null) !== 0) {
    const err = fail('remount');
    libc.umount2(at, libc.MNT_DETACH);
    throw err;
  }
  return at;
}

/** Undoes lateBind's mounts (last first); returns those that could not be undone. */
export function unmountAll(mounts: readonly string[]): string[] {
  const failed: string[] = [];
  for (const m of [...mounts].reverse())
    if (libc.umount2(m, libc.MNT_DETACH) !== 0 && libc.errno() !== libc.EINVAL && libc.errno() !== libc.ENOENT)
      failed.push(`${m}: ${libc.errnoName(libc.errno())}`);
  return failed;
}

/**
 * Whether process `pid` is kiln-vmm with `--id` `id` (kiln-jailer passes `--id=ID`, a
 * direct start `--id ID`): alive, and not a pid reused by something else. Throws when
 * there is no such process.
 */
export function isKilnVmm(pid: number, id: string): boolean {
  const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  const i = cmdline.indexOf('--id');
  const named = (i >= 0 && cmdline[i + 1] === id) || cmdline.includes(`--id=${id}`);
  return named && cmdline.some(isKilnVmmEntry);
}

/** Whether `run`'s sockets point into a jail that still exists. */
export function jailExists(record: JailRecord | null): boolean {
  return record?.root != null && existsSync(record.root);
}
