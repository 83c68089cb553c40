// The daemon's pool of pre-started VMMs (`kiln daemon --pool N`): N kiln-vmm processes,
// each already jailed (its own uid, chroot, mount namespace, seccomp) with its modules
// loaded, its vCPU and I/O threads started and its KVM VM made, waiting for its API. The
// next `kiln start`, `kiln restore` or `kiln clone` of a jailed VM takes one instead of
// starting a process: the manager binds the VM's files into the jail from outside (the
// pool's directory is a shared mount and each pool jail a slave of it, so mounts made
// there later appear inside), moves the process into the VM's cgroup and configures it
// through its API.
//
// A pool process that died is noticed (its exit, or a GET / that does not answer at
// take time) and replaced, never handed out. Under memory pressure (MemAvailable below
// the floor) the pool gives back one idle process every check and does not refill until
// the pressure is gone: an idle VMM must never be the reason another is OOM-killed.
import type { ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { basename, join } from 'node:path';
import { KilnError } from '../errors.js';
import { KILN_VMM, meminfoKiB, vmmEnvironment } from '../host.js';
import * as libc from '../kvm/libc.js';
import { prepareCgroup, removeCgroup, spawnInCgroup } from './cgroup.js';
import { isKilnVmm, jailerArgv } from './jail.js';
import { PRIVATE_DIR, PRIVATE_FILE } from './store.js';

/** The cgroup idle pool processes share ('_' is not in any VM's name). */
export const POOL_CGROUP = '_pool';
/** What one idle pool process may use at most, for the pool cgroup's memory limit. */
const IDLE_LIMIT_BYTES = 256 * 1024 * 1024;
const READY_TIMEOUT_MS = 30_000;
const PRESSURE_CHECK_MS = 2_000;
/** A pool process that dies this soon after it started counts as a failed start. */
const QUICK_DEATH_MS = 5_000;
/** Failed starts in a row after which the pool stops refilling (and says why). */
const MAX_FAILED_STARTS = 3;

/** One idle pool process, ready to take. */
export interface PoolVmm {
  readonly pid: number;
  /** Its --id (pool-N): the manager knows its VMM by it. */
  readonly id: string;
  readonly uid: number;
  /** Its jail's root on the host (a slave of the pool's shared mount). */
  readonly root: string;
  /** Its slot directory (removed when the VM it became is released). */
  readonly dir: string;
  /** Its stdout and stderr (the serial console and the VMM's log). */
  readonly log: string;
  readonly child: ChildProcess;
}

export interface PoolOptions {
  /** Where pool jails are built (made a shared mount point). */
  readonly dir: string;
  readonly size: number;
  /** The jail uids running VMs and other pool processes use now. */
  readonly uidsInUse: () => ReadonlySet<number>;
  readonly allocateUid: (inUse: ReadonlySet<number>) => number;
  readonly log: (line: string) => void;
  /** MemAvailable (MiB) below which the pool shrinks (default: 5 % of MemTotal, at least 256). */
  readonly minAvailableMiB?: number;
}

export class VmmPool {
  private readonly idle: PoolVmm[] = [];
  private readonly starting = new Set<ChildProcess>();
  private nextSlot = 0;
  private failedStarts = 0;
  private closed = false;
  private pressure = false;
  private readonly timer: NodeJS.Timeout;
  private cgroupProcs: string[] = [];

  private readonly logDir: string;

  constructor(private readonly opts: PoolOptions) {
    mkdirSync(opts.dir, { recursive: true, mode: PRIVATE_DIR });
    this.logDir = `${opts.dir}-logs`;
    rmSync(this.logDir, { recursive: true, force: true });
    mkdirSync(this.logDir, { recursive: true, mode: PRIVATE_DIR });
    // Slots of an earlier daemon that no VM uses: their idle processes (if it was killed
    // before it could end them) are ended now, by the pid it recorded.
    for (const entry of safeList(opts.dir)) {
      const slot = join(opts.dir, entry);
      if (readInUse(slot)) continue;
      endOrphan(slot, `pool-${entry}`);
      rmSync(slot, { recursive: true, force: true });
    }
    // The pool's directory is a shared mount: binds made under a jail's root later
    // propagate into that jail (a slave of it, kiln-jailer --late-binds).
    const r1 = isMountPoint(opts.dir) ? 0 : libc.mount(opts.dir, opts.dir, null, libc.MS_BIND, null);
    if (r1 !== 0 || libc.mount(null, opts.dir, null, libc.MS_SHARED, null) !== 0)
      throw new KilnError(`the VMM pool needs a shared mount at ${opts.dir}: ${libc.errnoName(libc.errno())}`);
    try {
      this.cgroupProcs = prepareCgroup(POOL_CGROUP, {
        cpuWeight: 10,
        cpuQuotaPercent: 0,
        memoryBytes: Math.max(1, opts.size) * IDLE_LIMIT_BYTES,
      });
    } catch (err) {
      opts.log(`kiln daemon: pool processes run without a cgroup: ${(err as Error).message}`);
    }
    this.timer = setInterval(() => this.checkPressure(), PRESSURE_CHECK_MS);
    this.timer.unref();
    this.fill();
  }

  /** Idle processes ready to take, and those still starting. */
  get counts(): { idle: number; starting: number; size: number } {
    return { idle: this.idle.length, starting: this.starting.size, size: this.opts.size };
  }

  /** The uids idle and starting pool processes hold. */
  get uids(): number[] {
    return [...this.idle.map((p) => p.uid), ...this.pendingUids];
  }
  private pendingUids: number[] = [];

  /** Starts processes until the pool is full (not under memory pressure, not after repeated failures). */
  fill(): void {
    while (
      !this.closed &&
      !this.pressure &&
      this.failedStarts < MAX_FAILED_STARTS &&
      this.idle.length + this.starting.size < this.opts.size
    )
      this.startOne();
  }

  private startOne(): void {
    const slot = this.nextSlot++;
    const dir = join(this.opts.dir, String(slot));
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    const uid = this.opts.allocateUid(new Set([...this.opts.uidsInUse(), ...this.uids]));
    this.pendingUids.push(uid);
    const base = join(dir, 'jail');
    const id = `pool-${slot}`;
    const root = join(base, basename(KILN_VMM), id, 'root');
    // Beside the pool's mount, not in it: the log is renamed into the VM's run directory.
    const log = join(this.logDir, `${slot}.log`);
    const out = openSync(log, 'a', PRIVATE_FILE);
    const argv = jailerArgv(id, uid, base, ['--late-binds'], []);
    const child = spawnInCgroup(this.cgroupProcs, argv, {
      detached: true,
      stdio: ['ignore', out, out],
      env: vmmEnvironment(),
    });
    closeSync(out);
    child.unref();
    writeFileSync(join(dir, 'pid'), `${child.pid}\n`, { mode: PRIVATE_FILE });
    this.starting.add(child);
    const started = Date.now();
    const forget = () => {
      this.starting.delete(child);
      this.pendingUids = this.pendingUids.filter((u) => u !== uid);
    };
    child.once('exit', (code, signal) => {
      const wasIdle = this.idle.findIndex((p) => p.child === child);
      if (wasIdle >= 0) this.idle.splice(wasIdle, 1);
      const wasStarting = this.starting.has(child);
      forget();
      if (this.closed) return;
      // A process handed out is the VM's now (the manager watches it); only ours are replaced.
      if (wasIdle < 0 && !wasStarting) return;
      if (Date.now() - started < QUICK_DEATH_MS) this.failedStarts++;
      rmSync(dir, { recursive: true, force: true });
      rmSync(log, { force: true });
      this.opts.log(
        `kiln daemon: pool process ${child.pid} ended (${signal ?? `status ${code}`}); ${this.failedStarts >= MAX_FAILED_STARTS ? `not replaced after ${this.failedStarts} failed starts: see ${log}` : 'replacing it'}`,
      );
      this.fill();
    });
    void this.whenReady(root, child).then((ready) => {
      if (!this.starting.has(child)) return;
      forget();
      if (!ready) {
        this.failedStarts++;
        child.kill('SIGKILL');
        return;
      }
      this.failedStarts = 0;
      this.idle.push({ pid: child.pid!, id, uid, root, dir, log, child });
    });
  }

  /** Whether the process's API answers within READY_TIMEOUT_MS. */
  private async whenReady(root: string, child: ChildProcess): Promise<boolean> {
    const api = join(root, 'run', 'api.sock');
    const deadline = Date.now() + READY_TIMEOUT_MS;
    while (Date.now() < deadline && child.exitCode === null && child.signalCode === null && !this.closed) {
      if (await answers(api)) return true;
      await new Promise((r) => setTimeout(r, 50));
    }
    return false;
  }

  /**
   * An idle process, checked alive and answering, removed from the pool (the pool refills
   * behind it); null when none is ready.
   */
  async take(): Promise<PoolVmm | null> {
    while (this.idle.length > 0) {
      const p = this.idle.shift()!;
      if (
        p.child.exitCode === null &&
        p.child.signalCode === null &&
        (await answers(join(p.root, 'run', 'api.sock')))
      ) {
        this.fill();
        return p;
      }
      this.opts.log(`kiln daemon: pool process ${p.pid} does not answer; replacing it`);
      p.child.kill('SIGKILL');
    }
    this.fill();
    return null;
  }

  private checkPressure(): void {
    let info: { available: number; total: number };
    try {
      const kib = meminfoKiB();
      info = { available: kib('MemAvailable') / 1024, total: kib('MemTotal') / 1024 };
    } catch {
      return;
    }
    const floor = this.opts.minAvailableMiB ?? Math.max(256, info.total * 0.05);
    this.pressure = info.available < floor;
    if (this.pressure && this.idle.length > 0) {
      const p = this.idle.pop()!;
      this.opts.log(
        `kiln daemon: memory pressure (${info.available.toFixed(0)} MiB available, floor ${floor.toFixed(0)} MiB): the pool gives back process ${p.pid}`,
      );
      p.child.kill('SIGKILL');
    } else if (!this.pressure) this.fill();
  }

  /** Ends every idle and starting pool process (by pid) and undoes the shared mount. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    const all = [...this.idle.map((p) => p.child), ...this.starting];
    this.idle.length = 0;
    this.starting.clear();
    await Promise.all(
      all.map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode !== null || c.signalCode !== null) return resolve();
            c.once('exit', () => resolve());
            c.kill('SIGKILL');
          }),
      ),
    );
    let inUse = false;
    for (const entry of safeList(this.opts.dir)) {
      // A slot a running VM still uses keeps its directory (released with the VM).
      if (readInUse(join(this.opts.dir, entry))) inUse = true;
      else rmSync(join(this.opts.dir, entry), { recursive: true, force: true });
    }
    // The shared mount stays while a VM from the pool runs (the next daemon finds it).
    if (!inUse) libc.umount2(this.opts.dir, libc.MNT_DETACH);
    if (this.cgroupProcs.length) {
      try {
        removeCgroup(POOL_CGROUP);
      } catch {
        // a process is still leaving it
      }
    }
  }
}

/** Whether a VMM's API socket answers GET / with 200 within a second. */
function answers(api: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ socketPath: api, path: '/', method: 'GET', agent: false, timeout: 1000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode === 200));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
    req.end();
  });
}

/** Whether `dir` is a mount point (in this process's mount namespace). */
function isMountPoint(dir: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[4] === dir);
}

function safeList(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** Kills the process a slot's pid file names, if it is still that slot's kiln-vmm (not a recycled pid). */
function endOrphan(slot: string, id: string): void {
  try {
    const pid = Number(readFileSync(join(slot, 'pid'), 'utf8').trim());
    if (isKilnVmm(pid, id)) process.kill(pid, 'SIGKILL');
  } catch {
    // no pid file, or the process is gone
  }
}

/** A slot handed to a VM has its marker file (written by markInUse). */
function readInUse(dir: string): boolean {
  try {
    readFileSync(join(dir, 'in-use'));
    return true;
  } catch {
    return false;
  }
}

/** Marks a taken slot as a VM's: the pool leaves its directory to the VM's release. */
export function markInUse(p: PoolVmm, name: string): void {
  writeFileSync(join(p.dir, 'in-use'), `${name}\n`, { mode: PRIVATE_FILE });
}
