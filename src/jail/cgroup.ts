// kiln-jailer's cgroups, as Firecracker's jailer makes them: `--cgroup <controller>.<file>=<value>`
// values written under `<hierarchy>/<parent-cgroup>/<id>`, found from /proc/mounts, and the
// jailer's own process moved in (cgroup.procs: every thread, since Node has several) before
// it executes the VMM.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { enableControllers } from '../manager/cgroup.js';
import { JailError } from './plan.js';
import { ensureDirs } from './steps.js';

interface Mount {
  readonly dir: string;
  readonly type: string;
  readonly options: readonly string[];
}

export function cgroupMounts(mounts = readFileSync('/proc/mounts', 'utf8')): Mount[] {
  return mounts
    .split('\n')
    .map((line) => line.split(' '))
    .filter((f) => f.length >= 4 && (f[2] === 'cgroup' || f[2] === 'cgroup2'))
    .map((f) => ({ dir: f[1]!.replace(/\\040/g, ' '), type: f[2]!, options: f[3]!.split(',') }));
}

/**
 * Creates the jail's cgroup(s), writes the values and moves process `pid` in. Returns
 * the cgroup directories (none when neither values nor a parent cgroup were given).
 */
export function joinJailCgroups(
  opts: {
    readonly id: string;
    readonly cgroups: ReadonlyArray<{ readonly file: string; readonly value: string }>;
    readonly cgroupVersion: 1 | 2;
    readonly parentCgroup: string;
    readonly parentGiven: boolean;
  },
  pid: number,
  mounts = cgroupMounts(),
): string[] {
  if (opts.cgroups.length === 0 && !opts.parentGiven) return [];
  const relative = join(opts.parentCgroup, opts.id);
  const dirs = new Map<string, Array<{ file: string; value: string }>>();
  if (opts.cgroupVersion === 2) {
    const root = mounts.find((m) => m.type === 'cgroup2');
    if (!root) throw new JailError('--cgroup-version 2: no cgroup2 hierarchy is mounted');
    const controllers = new Set(opts.cgroups.map((c) => c.file.split('.')[0]!));
    controllers.delete('cgroup');
    // Enable the controllers for children on the way down (cpu.max needs +cpu above it).
    let at = root.dir;
    for (const part of opts.parentCgroup.split('/').filter(Boolean)) {
      enableControllers(at, controllers);
      at = ensureDirs(at, part);
    }
    enableControllers(at, controllers);
    dirs.set(ensureDirs(root.dir, relative), [...opts.cgroups]);
  } else {
    const v1 = mounts.filter((m) => m.type === 'cgroup');
    if (v1.length === 0) throw new JailError('--cgroup-version 1: no cgroup v1 hierarchy is mounted');
    for (const c of opts.cgroups) {
      const controller = c.file.split('.')[0]!;
      const mount = v1.find((m) => m.options.includes(controller));
      if (!mount) throw new JailError(`--cgroup ${c.file}: no cgroup v1 hierarchy has the '${controller}' controller`);
      const dir = ensureDirs(mount.dir, relative);
      dirs.set(dir, [...(dirs.get(dir) ?? []), c]);
    }
  }
  for (const [dir, values] of dirs) {
    for (const { file, value } of values) {
      try {
        writeFileSync(join(dir, file), value);
      } catch (err) {
        throw new JailError(`--cgroup ${file}=${value}: ${(err as Error).message}`);
      }
    }
  }
  for (const dir of dirs.keys()) writeFileSync(join(dir, 'cgroup.procs'), String(pid));
  return [...dirs.keys()];
}
