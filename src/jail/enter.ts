// kiln-jailer's second stage, run as root by util-linux `unshare --mount --propagation
// private` (and `--pid --fork` for --new-pid-ns), so it is already in the jail's own mount
// namespace: it builds the chroot, pivots into it, drops to the jail's uid and gid, sets
// no_new_privs and executes the VMM, which starts inside the finished jail.
import {
  closeSync,
  lstatSync,
  mkdirSync,
  openSync,
  readlinkSync,
  rmdirSync,
  symlinkSync,
  writeSync,
  constants,
} from 'node:fs';
import { chownSync } from 'node:fs';
import { dirname, join } from 'node:path';
import * as libc from '../kvm/libc.js';
import type { RuntimeEntry } from './plan.js';

export interface EnterPlan {
  readonly rootDir: string;
  readonly entries: readonly RuntimeEntry[];
  readonly binds: ReadonlyArray<{ readonly source: string; readonly target: string; readonly rw: boolean }>;
  readonly uid: number;
  readonly gid: number;
  /** Where to write the VMM's host pid (the jail's `<exec-file name>.pid`), for --new-pid-ns. */
  readonly pidFile: string | null;
  readonly node: string;
  /** argv after node: the VMM's entry point and its arguments. */
  readonly args: readonly string[];
  readonly env: readonly string[];
  /** /dev/userfaultfd's device number on the host, where it has one (its minor is dynamic). */
  readonly userfaultfd: { readonly major: number; readonly minor: number } | null;
}

class EnterError extends Error {}

function check(rc: number, what: string): void {
  if (rc < 0) throw new EnterError(`${what}: ${libc.errnoName(libc.errno())} (${libc.strerror(libc.errno())})`);
}

/** The jail-side path of a host path (`rootDir` + path); every component is checked or made by us. */
const inside = (plan: EnterPlan, path: string) => join(plan.rootDir, path);

function lstatOrNull(path: string) {
  try {
    return lstatSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** A directory we may create things in: made if missing, refused if it is anything but a directory (a link planted by a previous tenant). */
function ensureDir(path: string): void {
  const st = lstatOrNull(path);
  if (st === null) mkdirSync(path, { mode: 0o755 });
  else if (!st.isDirectory()) throw new EnterError(`refusing ${path}: it exists and is not a directory`);
}

function ensureDirs(root: string, relative: string): string {
  let at = root;
  for (const part of relative.split('/').filter(Boolean)) {
    at = join(at, part);
    ensureDir(at);
  }
  return at;
}

/** An empty regular file to mount over (never following a link). */
function ensureFile(path: string): void {
  const st = lstatOrNull(path);
  if (st === null)
    closeSync(openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o644));
  else if (!st.isFile()) throw new EnterError(`refusing ${path}: it exists and is not a regular file`);
}

function bindReadOnly(source: string, target: string, recursive: boolean, rw = false): void {
  check(libc.mount(source, target, null, libc.MS_BIND | (recursive ? libc.MS_REC : 0), null), `bind ${source}`);
  const flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID | libc.MS_NODEV | (rw ? 0 : libc.MS_RDONLY);
  check(libc.mount(null, target, null, flags, null), `remount ${target} read-only`);
}

function build(plan: EnterPlan): void {
  const root = plan.rootDir;
  // The chroot becomes a mount point of its own (pivot_root needs one); nosuid, but device
  // nodes allowed (the ones made below), whatever the hierarchy it lives on.
  check(libc.mount(root, root, null, libc.MS_BIND, null), `bind ${root}`);
  check(libc.mount(null, root, null, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID, null), `remount ${root}`);

  for (const e of plan.entries) {
    const at = inside(plan, e.path);
    if (e.kind === 'mkdir') ensureDir(at);
    else if (e.kind === 'symlink') {
      const st = lstatOrNull(at);
      if (st === null) symlinkSync(e.target, at);
      else if (!st.isSymbolicLink() || readlinkSync(at) !== e.target)
        throw new EnterError(`refusing ${at}: it exists and is not the link ${e.path} -> ${e.target}`);
    } else {
      if (e.dir) ensureDir(at);
      else ensureFile(at);
      bindReadOnly(e.path, at, e.dir);
    }
  }
  for (const b of plan.binds) {
    const st = lstatSync(b.source);
    const at = join(ensureDirs(root, dirname(b.target)), b.target.split('/').at(-1)!);
    if (st.isDirectory()) ensureDir(at);
    else ensureFile(at);
    bindReadOnly(b.source, at, st.isDirectory(), b.rw);
  }
  if (plan.pidFile) {
    // /proc is still the host's: its "self" is this process's pid on the host.
    const fd = openSync(
      plan.pidFile,
      constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW,
      0o644,
    );
    writeSync(fd, `${readlinkSync('/proc/self')}\n`);
    closeSync(fd);
  }

  ensureDir(join(root, 'old_root'));
  check(libc.chdir(root), `chdir ${root}`);
  check(libc.pivotRoot('.', 'old_root'), 'pivot_root');
  check(libc.chdir('/'), 'chdir /');
  check(libc.umount2('/old_root', libc.MNT_DETACH), 'umount old root');
  rmdirSync('/old_root');
  check(libc.chroot('.'), 'chroot');

  // Device nodes inside the jail, owned by the jail's user (as Firecracker's jailer makes them).
  ensureDir('/dev');
  ensureDir('/dev/net');
  const nodes: Array<[string, number, number]> = [
    ['/dev/kvm', 10, 232],
    ['/dev/net/tun', 10, 200],
    ['/dev/urandom', 1, 9],
    ...(plan.userfaultfd
      ? [['/dev/userfaultfd', plan.userfaultfd.major, plan.userfaultfd.minor] as [string, number, number]]
      : []),
  ];
  for (const [path, major, minor] of nodes) {
    if (lstatOrNull(path) === null)
      check(libc.mknod(path, libc.S_IFCHR | 0o600, libc.makedev(major, minor)), `mknod ${path}`);
    chownSync(path, plan.uid, plan.gid);
  }
  // The VMM creates its API socket (and anything else it writes) under its root.
  chownSync('/', plan.uid, plan.gid);
  ensureDir('/run');
  chownSync('/run', plan.uid, plan.gid);
}

function dropAndExec(plan: EnterPlan): never {
  check(libc.setgroups(0, null), 'setgroups');
  check(libc.setresgid(plan.gid, plan.gid, plan.gid), `setresgid ${plan.gid}`);
  check(libc.setresuid(plan.uid, plan.uid, plan.uid), `setresuid ${plan.uid}`);
  check(libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 'prctl(PR_SET_NO_NEW_PRIVS)');
  // Nothing but stdio crosses into the VMM.
  check(libc.closeRange(3, 0xffffffff, libc.CLOSE_RANGE_CLOEXEC), 'close_range');
  libc.keepStdioAcrossExec();
  libc.execve(plan.node, [plan.node, ...plan.args, null], [...plan.env, null]);
  throw new EnterError(`cannot execute ${plan.node} in the jail: ${libc.errnoName(libc.errno())}`);
}

try {
  const plan = JSON.parse(process.argv[2] ?? '') as EnterPlan;
  // What the jail is built of must be readable by its user, whatever umask the caller has
  // (the manager's daemon runs with 077); the VMM gets the caller's umask back.
  const umask = process.umask(0o022);
  build(plan);
  process.umask(umask);
  dropAndExec(plan);
} catch (err) {
  process.stderr.write(`kiln-jailer: ${(err as Error).message}\n`);
  process.exitCode = 1;
}
