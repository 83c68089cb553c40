// One cgroup per VM, with its CPU weight, CPU quota and memory limit: cgroup v2 where
// it is mounted (cpu.weight, cpu.max, memory.max), else v1 (cpu.shares,
// cpu.cfs_quota_us, memory.limit_in_bytes). The cgroup is made and limited before the
// VMM exists; the VMM's process joins it before it executes (the `cgroup.procs` files
// prepareCgroup returns are written by the process itself, then it execs the VMM, as
// Firecracker's jailer does), so no guest code ever runs outside its limits.
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { KilnError } from '../errors.js';

export const CGROUP_ROOT = '/sys/fs/cgroup';
const PERIOD_US = 100_000;

export interface CgroupLimits {
  /** 1-10000, 100 is the default share. */
  readonly cpuWeight: number;
  /** Percent of one host CPU (0: no quota). */
  readonly cpuQuotaPercent: number;
  readonly memoryBytes: number;
}

export function cgroupVersion(root = CGROUP_ROOT): 1 | 2 | null {
  if (existsSync(join(root, 'cgroup.controllers'))) return 2;
  if (existsSync(join(root, 'cpu')) && existsSync(join(root, 'memory'))) return 1;
  return null;
}

/**
 * The group the VMs' cgroups go under: `kiln`, or KILN_CGROUP_PARENT (one name) for a
 * daemon that must not share it (two daemons on one host, as the migration tests run them).
 */
export function cgroupParent(): string {
  const p = process.env.KILN_CGROUP_PARENT;
  return p !== undefined && /^[A-Za-z0-9_.-]{1,64}$/.test(p) && p !== '.' && p !== '..' ? p : 'kiln';
}

/** The directories of VM `name`'s cgroup, one per v1 hierarchy or the one v2 group. */
export function cgroupDirs(name: string, root = CGROUP_ROOT): string[] {
  const v = cgroupVersion(root);
  const parent = cgroupParent();
  if (v === 2) return [join(root, parent, name)];
  if (v === 1) return [join(root, 'cpu', parent, name), join(root, 'memory', parent, name)];
  return [];
}

const write = (dir: string, file: string, value: string) => writeFileSync(join(dir, file), value);

/** The controller names in a cgroup.controllers or cgroup.subtree_control file ("cpuset cpu io memory"). */
export function controllerSet(text: string): Set<string> {
  return new Set(text.split(/\s+/).filter((c) => c !== ''));
}

/** Lets the children of cgroup v2 directory `dir` use `controllers` (enabling those not enabled yet). */
export function enableControllers(dir: string, controllers: Iterable<string>): void {
  const enabled = controllerSet(readFileSync(join(dir, 'cgroup.subtree_control'), 'utf8'));
  for (const c of controllers) if (!enabled.has(c)) write(dir, 'cgroup.subtree_control', `+${c}`);
}

/** v1 cpu.shares from a v2-style weight (1-10000 -> 2-262144, 100 -> 1024). */
export function weightToShares(weight: number): number {
  return Math.max(2, Math.min(262_144, Math.round((weight * 1024) / 100)));
}

/** v2 cpu.max for a quota in percent of one CPU ("max 100000" for none). */
export function cpuMax(quotaPercent: number): string {
  return quotaPercent > 0 ? `${Math.round((quotaPercent / 100) * PERIOD_US)} ${PERIOD_US}` : `max ${PERIOD_US}`;
}

/**
 * Creates VM `name`'s cgroup with `limits`; returns the `cgroup.procs` files a process
 * writes its pid to in order to join it.
 */
export function prepareCgroup(name: string, limits: CgroupLimits, root = CGROUP_ROOT): string[] {
  const v = cgroupVersion(root);
  if (v === null) throw new KilnError(`no cgroup hierarchy is mounted at ${root}`);
  if (!Number.isInteger(limits.cpuWeight) || limits.cpuWeight < 1 || limits.cpuWeight > 10_000)
    throw new KilnError(`CPU weight must be 1 to 10000 (got ${limits.cpuWeight})`);
  const dirs = cgroupDirs(name, root);
  try {
    if (v === 2) {
      const parent = join(root, cgroupParent());
      mkdirSync(parent, { recursive: true });
      const available = controllerSet(readFileSync(join(root, 'cgroup.controllers'), 'utf8'));
      for (const c of ['cpu', 'memory'])
        if (!available.has(c)) throw new KilnError(`the cgroup v2 controller '${c}' is not available at ${root}`);
      // Let the children use the cpu and memory controllers (matched by name: "cpuset" is not "cpu").
      for (const dir of [root, parent]) enableControllers(dir, ['cpu', 'memory']);
      const dir = dirs[0]!;
      mkdirSync(dir, { recursive: true });
      write(dir, 'cpu.weight', String(limits.cpuWeight));
      write(dir, 'cpu.max', cpuMax(limits.cpuQuotaPercent));
      write(dir, 'memory.max', String(limits.memoryBytes));
    } else {
      const [cpu, memory] = dirs as [string, string];
      mkdirSync(cpu, { recursive: true });
      mkdirSync(memory, { recursive: true });
      write(cpu, 'cpu.shares', String(weightToShares(limits.cpuWeight)));
      write(cpu, 'cpu.cfs_period_us', String(PERIOD_US));
      write(
        cpu,
        'cpu.cfs_quota_us',
        limits.cpuQuotaPercent > 0 ? String(Math.round((limits.cpuQuotaPercent / 100) * PERIOD_US)) : '-1',
      );
      write(memory, 'memory.limit_in_bytes', String(limits.memoryBytes));
    }
  } catch (err) {
    if (err instanceof KilnError) throw err;
    throw new KilnError(`cannot set up the cgroup of '${name}': ${(err as Error).message}`);
  }
  return dirs.map((d) => join(d, 'cgroup.procs'));
}

/** Removes VM `name`'s (empty) cgroup. */
export function removeCgroup(name: string, root = CGROUP_ROOT): void {
  for (const dir of cgroupDirs(name, root)) {
    if (!existsSync(dir)) continue;
    try {
      rmdirSync(dir);
    } catch (err) {
      // EBUSY: a process is still in it (the VMM is exiting); the next start reuses it.
      if ((err as NodeJS.ErrnoException).code !== 'EBUSY') throw err;
    }
  }
}

/**
 * Joins the cgroup(s) named before `--`, then becomes the command after it (same pid):
 * the command is confined from its first instruction.
 */
const ATTACH_THEN_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"';

/**
 * Starts `argv` already inside the cgroup(s) whose `cgroup.procs` files are `procs`
 * (prepareCgroup's): a shell writes its own pid there, then execs the command, which
 * keeps that pid. If a write fails the command never runs (the shell exits 125).
 */
export function spawnInCgroup(
  procs: readonly string[],
  argv: readonly string[],
  options: { detached?: boolean; stdio?: StdioOptions; env?: NodeJS.ProcessEnv } = {},
): ChildProcess {
  return spawn('/bin/sh', ['-c', ATTACH_THEN_EXEC, 'kiln-attach', ...procs, '--', ...argv], options);
}
