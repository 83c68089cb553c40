// kiln-jailer's second stage, run as root by util-linux `unshare --mount --propagation
// private` (and `--pid --fork` for --new-pid-ns), so it is already in the jail's own mount
// namespace: it builds the chroot, pivots into it, drops to the jail's uid and gid, sets
// no_new_privs and executes the VMM, which starts inside the finished jail.
import {
  chownSync,
  closeSync,
  constants,
  lstatSync,
  openSync,
  readlinkSync,
  rmdirSync,
  symlinkSync,
  writeSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import * as libc from '../kvm/libc.js';
import { JailError, type RuntimeEntry } from './plan.js';
import { checkCall, closeOnExecFrom3, ensureDir, ensureDirs, ensureFile, lstatOrNull } from './steps.js';

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
  /** Inherited fds the VMM keeps (--pass-fd). */
  readonly passFds: readonly number[];
}

/** The jail-side path of a host path (`rootDir` + path); every component is checked or made by us. */
const inside = (plan: EnterPlan, path: string) => join(plan.rootDir, path);

/** A bind mount of a host path onto `target`, nosuid and nodev, read-only unless `rw`. */
function bind(source: string, target: string, recursive: boolean, rw = false): void {
  checkCall(libc.mount(source, target, null, libc.MS_BIND | (recursive ? libc.MS_REC : 0), null), `bind ${source}`);
  const flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID | libc.MS_NODEV | (rw ? 0 : libc.MS_RDONLY);
  checkCall(libc.mount(null, target, null, flags, null), `remount ${target}${rw ? '' : ' read-only'}`);
}

function build(plan: EnterPlan): void {
  const root = plan.rootDir;
  // The chroot becomes a mount point of its own (pivot_root needs one); nosuid, but device
  // nodes allowed (the ones made below), whatever the hierarchy it lives on.
  checkCall(libc.mount(root, root, null, libc.MS_BIND, null), `bind ${root}`);
  checkCall(libc.mount(null, root, null, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID, null), `remount ${root}`);

  for (const e of plan.entries) {
    const at = inside(plan, e.path);
    if (e.kind === 'mkdir') ensureDir(at);
    else if (e.kind === 'symlink') {
      const st = lstatOrNull(at);
      if (st === null) symlinkSync(e.target, at);
      else if (!st.isSymbolicLink() || readlinkSync(at) !== e.target)
        throw new JailError(`refusing ${at}: it exists and is not the link ${e.path} -> ${e.target}`);
    } else {
      if (e.dir) ensureDir(at);
      else ensureFile(at);
      bind(e.path, at, e.dir);
    }
  }
  for (const b of plan.binds) {
    const st = lstatSync(b.source);
    const at = join(ensureDirs(root, dirname(b.target)), b.target.split('/').at(-1)!);
    if (st.isDirectory()) ensureDir(at);
    else ensureFile(at);
    bind(b.source, at, st.isDirectory(), b.rw);
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
  checkCall(libc.chdir(root), `chdir ${root}`);
  checkCall(libc.pivotRoot('.', 'old_root'), 'pivot_root');
  checkCall(libc.chdir('/'), 'chdir /');
  checkCall(libc.umount2('/old_root', libc.MNT_DETACH), 'umount old root');
  rmdirSync('/old_root');
  checkCall(libc.chroot('.'), 'chroot');

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
      checkCall(libc.mknod(path, libc.S_IFCHR | 0o600, libc.makedev(major, minor)), `mknod ${path}`);
    chownSync(path, plan.uid, plan.gid);
  }
  // The VMM creates its API socket (and anything else it writes) under its root.
  chownSync('/', plan.uid, plan.gid);
  ensureDir('/run');
  chownSync('/run', plan.uid, plan.gid);
}

function dropAndExec(plan: EnterPlan): never {
  checkCall(libc.setgroups(0, null), 'setgroups');
  checkCall(libc.setresgid(plan.gid, plan.gid, plan.gid), `setresgid ${plan.gid}`);
  checkCall(libc.setresuid(plan.uid, plan.uid, plan.uid), `setresuid ${plan.uid}`);
  checkCall(libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 'prctl(PR_SET_NO_NEW_PRIVS)');
  // Nothing but stdio (and --pass-fd's fds) crosses into the VMM.
  closeOnExecFrom3(plan.passFds);
  libc.keepStdioAcrossExec();
  libc.execve(plan.node, [plan.node, ...plan.args, null], [...plan.env, null]);
  throw new JailError(`cannot execute ${plan.node} in the jail: ${libc.errnoName(libc.errno())}`);
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
