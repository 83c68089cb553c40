// What the dashboard's live view shows of each VM and of the host, sampled once a second
// by the daemon while a page watches (never otherwise): CPU from the VMM process's own
// accounting (/proc/PID/stat: every vCPU and I/O thread is one of its threads), memory
// from the VM's cgroup (what its limit is measured against), disk and network
// throughput from the VMM's device counters (GET /kiln/counters). Rates are the change
// between two samples of the same VMM process.
import { readFileSync } from 'node:fs';
import { freemem } from 'node:os';
import { join } from 'node:path';
import { cgroupDirs, cgroupVersion } from '../manager/cgroup.js';
import { hostCapacity, unixHttp, type Manager } from '../manager/manager.js';
import type { VmStatus } from '../manager/protocol.js';
import type { Store } from '../manager/store.js';
import type { HostSample, Sample, VmSample } from './wire.js';

const MiB = 1024 * 1024;
/** Clock ticks per second of /proc/PID/stat's times (USER_HZ: 100 on every Linux architecture Kiln runs on). */
const USER_HZ = 100;

interface Counters {
  block: { readBytes: number; writeBytes: number };
  net: { rxBytes: number; txBytes: number };
}

interface Previous {
  readonly pid: number;
  readonly at: number;
  readonly cpuTicks: number | null;
  readonly counters: Counters | null;
}

/** utime + stime of process `pid`, in clock ticks; null when it is gone. */
export function processCpuTicks(pid: number, procRoot = '/proc'): number | null {
  try {
    const text = readFileSync(join(procRoot, String(pid), 'stat'), 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    return Number.isFinite(utime) && Number.isFinite(stime) ? utime + stime : null;
  } catch {
    return null;
  }
}

function readNumber(path: string): number | null {
  try {
    const n = Number(readFileSync(path, 'utf8').trim());
    return Number.isFinite(n) ? n : null;
  } catch {
    return null;
  }
}

/** The memory charged to VM `name`'s cgroup; the VMM's resident set where there is none. */
function memoryOf(name: string, pid: number): number | null {
  const v = cgroupVersion();
  const dirs = cgroupDirs(name);
  const memoryDir = v === 2 ? dirs[0] : dirs.find((d) => d.includes('/memory/'));
  const fromCgroup =
    memoryDir === undefined ? null : readNumber(join(memoryDir, v === 2 ? 'memory.current' : 'memory.usage_in_bytes'));
  if (fromCgroup !== null) return fromCgroup;
  try {
    const kb = /^VmRSS:\s*(\d+)\s*kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kb === undefined ? null : Number(kb) * 1024;
  } catch {
    return null;
  }
}

const rate = (now: number, before: number, seconds: number) => Math.max(0, (now - before) / seconds);

/** Samples every VM and the host; keeps the previous sample of each VMM process for its rates. */
export class Sampler {
  private readonly previous = new Map<string, Previous>();

  constructor(
    private readonly manager: Manager,
    private readonly store: Store,
  ) {}

  async sample(): Promise<Sample> {
    const at = Date.now();
    const { vms } = await this.manager.list();
    const samples = await Promise.all(vms.map((vm) => this.sampleVm(vm, at)));
    for (const name of this.previous.keys()) if (!vms.some((v) => v.name === name)) this.previous.delete(name);
    return { type: 'sample', at, vms: samples, host: this.host(vms) };
  }

  private async sampleVm(vm: VmStatus, at: number): Promise<VmSample> {
    const none = {
      cpuPercent: null,
      memoryBytes: null,
      diskReadBps: null,
      diskWriteBps: null,
      netRxBps: null,
      netTxBps: null,
    };
    if (vm.pid === null || vm.state === 'stopped') {
      this.previous.delete(vm.name);
      return { ...vm, ...none };
    }
    const cpuTicks = processCpuTicks(vm.pid);
    let counters: Counters | null = null;
    if (vm.state === 'running' || vm.state === 'paused') {
      try {
        const r = await unixHttp(
          join(this.store.runDir(vm.name), 'api.sock'),
          'GET',
          '/kiln/counters',
          undefined,
          1000,
        );
        if (r.status === 200) counters = r.body as Counters;
      } catch {
        // The VMM is busy or going: this sample has no throughput.
      }
    }
    const before = this.previous.get(vm.name);
    this.previous.set(vm.name, { pid: vm.pid, at, cpuTicks, counters });
    const memoryBytes = memoryOf(vm.name, vm.pid);
    if (!before || before.pid !== vm.pid || at <= before.at) return { ...vm, ...none, memoryBytes };
    const seconds = (at - before.at) / 1000;
    const c = counters;
    const b = before.counters;
    return {
      ...vm,
      cpuPercent:
        cpuTicks !== null && before.cpuTicks !== null
          ? Math.round((rate(cpuTicks, before.cpuTicks, seconds) / USER_HZ) * 1000) / 10
          : null,
      memoryBytes,
      diskReadBps: c && b ? rate(c.block.readBytes, b.block.readBytes, seconds) : null,
      diskWriteBps: c && b ? rate(c.block.writeBytes, b.block.writeBytes, seconds) : null,
      netRxBps: c && b ? rate(c.net.rxBytes, b.net.rxBytes, seconds) : null,
      netTxBps: c && b ? rate(c.net.txBytes, b.net.txBytes, seconds) : null,
    };
  }

  /** The host's capacity and what the running VMs leave of it under the overcommit limits (as `kiln start` counts). */
  host(vms: readonly VmStatus[]): HostSample {
    return { ...hostCapacity(this.store.limits(), vms), freeMemoryMiB: Math.floor(freemem() / MiB) };
  }
}
