#!/usr/bin/env node
// `kiln-jailer`: Firecracker's jailer interface for Kiln's VMM, so an orchestrator that runs
// `jailer --id ... --exec-file ... --uid ... --gid ... -- <VMM args>` runs this with the same
// arguments. Firecracker's jailer copies a static binary into an empty chroot; Kiln's VMM
// is Node, so the chroot instead gets read-only bind mounts of node, its libraries and
// Kiln's package (docs/ARCHITECTURE.md, "The jail").
//
// Stage 1 (this file, root, the host's view): check everything, make the jail directory,
// set resource limits, join the cgroups and the network namespace, daemonize, then execute
// util-linux `unshare` (same pid) into a new mount namespace (and pid namespace), where
// stage 2 (enter.ts) builds the chroot, pivots into it, drops privileges and executes the
// VMM. Node is multi-threaded before its first line runs, so namespaces that need a single
// thread (and the new pid namespace, which needs a fork) come from `unshare`.
import { Command, Option } from 'commander';
import { existsSync, fstatSync, mkdirSync, openSync, closeSync, realpathSync, statSync } from 'node:fs';
import { basename, isAbsolute, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as libc from '../kvm/libc.js';
import { isSoftwareKvm } from '../compat/pvm.js';
import { KILN_VERSION } from '../version.js';
import { joinJailCgroups } from './cgroup.js';
import type { EnterPlan } from './enter.js';
import { checkCall, closeOnExecFrom3, ensureDirs } from './steps.js';
import {
  checkId,
  checkParentCgroup,
  checkUidGid,
  DEFAULT_CHROOT_BASE,
  DEFAULT_NO_FILE,
  jailPaths,
  JailError,
  parseBind,
  parseCgroup,
  parseResourceLimit,
  runtimeEntries,
  type JailOptions,
} from './plan.js';

/** The jailer's second stage: its CommonJS stub (scripts/bundle.mjs), the quickest to start. */
const ENTER = fileURLToPath(new URL('./enter.cjs', import.meta.url));
const EXIT_USAGE = 2;

function parseOptions(argv: readonly string[]): JailOptions {
  const dash = argv.indexOf('--');
  const own = dash < 0 ? [...argv] : argv.slice(0, dash);
  const vmmArgs = dash < 0 ? [] : argv.slice(dash + 1);
  const collect = (value: string, previous: string[]) => [...previous, value];
  const program = new Command('kiln-jailer')
    .description("Runs Kiln's VMM in a jail, with Firecracker's jailer arguments")
    .version(`kiln-jailer ${KILN_VERSION} (Firecracker jailer interface)`, '--version')
    .requiredOption('--id <id>', 'the VM id (letters, digits, -; at most 64)')
    .requiredOption('--exec-file <path>', "the VMM to run: kiln-vmm (its name names the jail's directory)")
    .requiredOption('--uid <uid>', 'the user the VMM runs as')
    .requiredOption('--gid <gid>', 'the group the VMM runs as')
    .option('--chroot-base-dir <dir>', 'where jails are built', DEFAULT_CHROOT_BASE)
    .option('--netns <path>', 'a network namespace to join (e.g. /var/run/netns/NAME)')
    .option('--cgroup <file=value>', 'a cgroup value, e.g. cpuset.cpus=0 (repeatable)', collect, [])
    .addOption(new Option('--cgroup-version <n>', 'cgroup version').choices(['1', '2']).default('1'))
    .option('--parent-cgroup <path>', 'the cgroup the jail cgroup is made under (default: the exec file name)')
    .option('--resource-limit <res=value>', 'fsize=BYTES or no-file=COUNT (repeatable)', collect, [])
    .option('--daemonize', 'setsid and stdio to /dev/null', false)
    .option('--new-pid-ns', 'run the VMM as pid 1 of a new pid namespace', false)
    .option('--bind <src[:dst][:ro|rw]>', "Kiln's own: bind a host path into the jail (repeatable)", collect, [])
    .option(
      '--late-binds',
      "Kiln's own: host mounts made later under the jail's root (a shared mount) appear inside it (the daemon's pool)",
      false,
    )
    .option(
      '--pass-fd <fd>',
      "Kiln's own: an inherited fd (3 or more) left open for the VMM, e.g. a guest memory file (repeatable)",
      collect,
      [],
    )
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  // Firecracker removed these in 1.0; old SDK builders still pass them. Accepted and ignored, as a drop-in must.
  program.addOption(new Option('--node <n>').hideHelp());
  program.addOption(new Option('--seccomp-level <n>').hideHelp());
  program.parse(own, { from: 'user' });
  const o = program.opts<{
    id: string;
    execFile: string;
    uid: string;
    gid: string;
    chrootBaseDir: string;
    netns?: string;
    cgroup: string[];
    cgroupVersion: '1' | '2';
    parentCgroup?: string;
    resourceLimit: string[];
    daemonize: boolean;
    newPidNs: boolean;
    bind: string[];
    lateBinds: boolean;
    passFd: string[];
  }>();
  const resourceLimits: { fsize?: bigint; noFile?: bigint } = {};
  for (const r of o.resourceLimit) parseResourceLimit(r, resourceLimits);
  if (!isAbsolute(o.chrootBaseDir))
    throw new JailError(`--chroot-base-dir must be absolute (got '${o.chrootBaseDir}')`);
  if (o.netns !== undefined && !isAbsolute(o.netns))
    throw new JailError(`--netns must be an absolute path (got '${o.netns}')`);
  return {
    id: checkId(o.id),
    execFile: o.execFile,
    uid: checkUidGid('uid', o.uid),
    gid: checkUidGid('gid', o.gid),
    chrootBaseDir: o.chrootBaseDir,
    netns: o.netns ?? null,
    cgroups: o.cgroup.map(parseCgroup),
    cgroupVersion: o.cgroupVersion === '2' ? 2 : 1,
    parentCgroup: o.parentCgroup === undefined ? null : checkParentCgroup(o.parentCgroup),
    resourceLimits,
    daemonize: o.daemonize,
    newPidNs: o.newPidNs,
    binds: o.bind.map(parseBind),
    lateBinds: o.lateBinds,
    passFds: o.passFd.map(parsePassFd),
    vmmArgs,
  };
}

/** --pass-fd's value: a decimal fd of 3 or more that this process has open. */
function parsePassFd(text: string): number {
  const fd = /^\d{1,9}$/.test(text) ? Number(text) : NaN;
  if (!(fd >= 3)) throw new JailError(`invalid --pass-fd '${text}': an inherited fd, 3 or more`);
  try {
    fstatSync(fd);
  } catch {
    throw new JailError(`invalid --pass-fd ${fd}: it is not open`);
  }
  return fd;
}

/** Sets a resource limit (soft and hard) for this process and what it executes. */
function limit(resource: number, value: bigint, what: string): void {
  checkCall(libc.setrlimit(resource, { rlim_cur: value, rlim_max: value }), `setrlimit(${what})`);
}

/** A character device's numbers on the host, or null where it is absent. */
function hostDevice(path: string): { major: number; minor: number } | null {
  try {
    const st = statSync(path);
    return st.isCharacterDevice() ? libc.deviceNumbers(st.rdev) : null;
  } catch {
    return null;
  }
}

function findTool(name: string): string {
  for (const dir of ['/usr/bin', '/bin', '/usr/sbin', '/sbin']) if (existsSync(join(dir, name))) return join(dir, name);
  throw new JailError(`util-linux's ${name} is not installed`);
}

function main(argv: readonly string[]): number {
  const startUs = process.hrtime.bigint() / 1000n;
  let opts: JailOptions;
  try {
    opts = parseOptions(argv);
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'commander.version' || code === 'commander.helpDisplayed') return 0;
    if (!(err instanceof JailError)) return EXIT_USAGE;
    process.stderr.write(`kiln-jailer: ${err.message}\n`);
    return EXIT_USAGE;
  }
  try {
    if (process.geteuid?.() !== 0)
      throw new JailError('kiln-jailer must run as root (it mounts, makes device nodes and changes user)');
    let exec: string;
    try {
      exec = realpathSync(opts.execFile);
      if (!statSync(exec).isFile()) throw new Error('not a regular file');
    } catch (err) {
      throw new JailError(`--exec-file ${opts.execFile}: ${(err as Error).message}`);
    }
    for (const b of opts.binds)
      if (!existsSync(b.source)) throw new JailError(`--bind ${b.source}: no such file or directory`);
    if (opts.netns !== null && !existsSync(opts.netns)) throw new JailError(`--netns ${opts.netns}: no such file`);
    const { rootDir } = jailPaths(opts);
    const entries = runtimeEntries(exec);
    const umask = process.umask(0o022);
    // The chroot base is the administrator's (it may be a link); below it nothing is followed.
    mkdirSync(opts.chrootBaseDir, { recursive: true, mode: 0o755 });
    ensureDirs(realpathSync(opts.chrootBaseDir), join(basename(opts.execFile), opts.id, 'root'));
    process.umask(umask);

    limit(libc.RLIMIT_NOFILE, opts.resourceLimits.noFile ?? DEFAULT_NO_FILE, 'no-file');
    if (opts.resourceLimits.fsize !== undefined) limit(libc.RLIMIT_FSIZE, opts.resourceLimits.fsize, 'fsize');
    joinJailCgroups(
      {
        id: opts.id,
        cgroups: opts.cgroups,
        cgroupVersion: opts.cgroupVersion,
        parentCgroup: opts.parentCgroup ?? basename(opts.execFile),
        parentGiven: opts.parentCgroup !== null,
      },
      process.pid,
    );
    if (opts.netns !== null) {
      const fd = openSync(opts.netns, 'r');
      checkCall(libc.setns(fd, libc.CLONE_NEWNET), `setns ${opts.netns}`);
      closeSync(fd);
    }
    const plan: EnterPlan = {
      rootDir,
      entries,
      binds: opts.binds,
      uid: opts.uid,
      gid: opts.gid,
      pidFile: opts.newPidNs ? join(rootDir, `${basename(opts.execFile)}.pid`) : null,
      node: process.execPath,
      args: [
        exec,
        `--id=${opts.id}`,
        `--start-time-us=${startUs}`,
        `--start-time-cpu-us=${process.cpuUsage().user + process.cpuUsage().system}`,
        ...opts.vmmArgs,
      ],
      // The environment is cleared, as Firecracker's jailer clears it; the VMM cannot see
      // /sys inside the jail, so it is told here whether /dev/kvm is software KVM.
      env: isSoftwareKvm() ? ['KILN_HOST_KVM=pvm'] : [],
      userfaultfd: hostDevice('/dev/userfaultfd'),
      passFds: opts.passFds ?? [],
    };
    if (opts.daemonize) {
      checkCall(libc.setsid(), 'setsid (a process group leader cannot daemonize)');
      const devNull = openSync('/dev/null', 'r+');
      for (const fd of [0, 1, 2]) checkCall(libc.dup2(devNull, fd), 'dup2 /dev/null');
      closeSync(devNull);
    }
    closeOnExecFrom3(opts.passFds ?? []);
    libc.keepStdioAcrossExec();
    const unshare = findTool('unshare');
    const nsArgs = [
      '--mount',
      '--propagation',
      // slave: mounts the host makes under the jail's root later (a shared mount, the
      // daemon's pool) reach the jail; nothing the jail mounts reaches the host.
      opts.lateBinds ? 'slave' : 'private',
      ...(opts.newPidNs ? ['--pid', '--fork', '--kill-child'] : []),
    ];
    libc.execve(unshare, ['unshare', ...nsArgs, '--', process.execPath, ENTER, JSON.stringify(plan), null], [null]);
    throw new JailError(`cannot execute ${unshare}: ${libc.errnoName(libc.errno())}`);
  } catch (err) {
    process.stderr.write(`kiln-jailer: ${(err as Error).message}\n`);
    return 1;
  }
}

process.exitCode = main(process.argv.slice(2));
