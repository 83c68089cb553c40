// One cgroup per VM, with its CPU weight, CPU quota and memory limit: cgroup v2 where
// it is mounted (cpu.weight, cpu.max, memory.max), else v1 (cpu.shares,
// cpu.cfs_quota_us, memory.limit_in_bytes). The VMM process is moved in whole.
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { KilnError } from '../errors.js';

const ROOT = '/sys/fs/cgroup';
const PERIOD_US = 100_000;

export interface CgroupLimits {
  /** 1-10000, 100 is the default share. */
  readonly cpuWeight: number;
  /** Percent of one host CPU (0: no quota). */
  readonly cpuQuotaPercent: number;
  readonly memoryBytes: number;
}

export function cgroupVersion(): 1 | 2 | null {
  if (existsSync(join(ROOT, 'cgroup.controllers'))) return 2;
  if (existsSync(join(ROOT, 'cpu')) && existsSync(join(ROOT, 'memory'))) return 1;
  return null;
}

/** The directories of VM `name`'s cgroup, one per v1 hierarchy or the one v2 group. */
export function cgroupDirs(name: string): string[] {
  const v = cgroupVersion();
  if (v === 2) return [join(ROOT, 'kiln', name)];
  if (v === 1) return [join(ROOT, 'cpu', 'kiln', name), join(ROOT, 'memory', 'kiln', name)];
  return [];
}

const write = (dir: string, file: string, value: string) => writeFileSync(join(dir, file), value);

/** v1 cpu.shares from a v2-style weight (1-10000 -> 2-262144, 100 -> 1024). */
export function weightToShares(weight: number): number {
  return Math.max(2, Math.min(262_144, Math.round((weight * 1024) / 100)));
}

/** Creates VM `name`'s cgroup with `limits` and moves `pid` into it; returns where it went. */
export function placeInCgroup(name: string, pid: number, limits: CgroupLimits): string[] {
  const v = cgroupVersion();
  if (v === null) throw new KilnError('no cgroup hierarchy is mounted at /sys/fs/cgroup');
  if (!Number.isInteger(limits.cpuWeight) || limits.cpuWeight < 1 || limits.cpuWeight > 10_000) throw new KilnError(`CPU weight must be 1 to 10000 (got ${limits.cpuWeight})`);
  const dirs = cgroupDirs(name);
  try {
    if (v === 2) {
      const parent = join(ROOT, 'kiln');
      mkdirSync(parent, { recursive: true });
      // Let the children use the cpu and memory controllers.
      for (const dir of [ROOT, parent]) {
        const enabled = readFileSync(join(dir, 'cgroup.subtree_control'), 'utf8');
        for (const c of ['cpu', 'memory']) if (!enabled.includes(c)) write(dir, 'cgroup.subtree_control', `+${c}`);
      }
      const dir = dirs[0]!;
      mkdirSync(dir, { recursive: true });
      write(dir, 'cpu.weight', String(limits.cpuWeight));
      write(dir, 'cpu.max', limits.cpuQuotaPercent > 0 ? `${Math.round((limits.cpuQuotaPercent / 100) * PERIOD_US)} ${PERIOD_US}` : `max ${PERIOD_US}`);
      write(dir, 'memory.max', String(limits.memoryBytes));
      write(dir, 'cgroup.procs', String(pid));
    } else {
      const [cpu, memory] = dirs as [string, string];
      mkdirSync(cpu, { recursive: true });
      mkdirSync(memory, { recursive: true });
      write(cpu, 'cpu.shares', String(weightToShares(limits.cpuWeight)));
      write(cpu, 'cpu.cfs_period_us', String(PERIOD_US));
      write(cpu, 'cpu.cfs_quota_us', limits.cpuQuotaPercent > 0 ? String(Math.round((limits.cpuQuotaPercent / 100) * PERIOD_US)) : '-1');
      write(memory, 'memory.limit_in_bytes', String(limits.memoryBytes));
      write(cpu, 'cgroup.procs', String(pid));
      write(memory, 'cgroup.procs', String(pid));
    }
  } catch (err) {
    if (err instanceof KilnError) throw err;
    throw new KilnError(`cannot set up the cgroup of '${name}': ${(err as Error).message}`);
  }
  return dirs;
}

/** Removes VM `name`'s (empty) cgroup. */
export function removeCgroup(name: string): void {
  for (const dir of cgroupDirs(name)) {
    if (!existsSync(dir)) continue;
    try {
      rmdirSync(dir);
    } catch (err) {
      // EBUSY: a process is still in it (the VMM is exiting); the next start reuses it.
      if ((err as NodeJS.ErrnoException).code !== 'EBUSY') throw err;
    }
  }
}
