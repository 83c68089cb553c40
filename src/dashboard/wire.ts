// What the dashboard's server sends its page on /ws/events, typed once for both sides
// (this module imports nothing, so the page's bundle can use it).

export type VmStateName = 'stopped' | 'starting' | 'running' | 'paused';

export interface VmSample {
  readonly name: string;
  readonly state: VmStateName;
  readonly pid: number | null;
  readonly cpus: number;
  readonly memoryMiB: number;
  /** When the VMM process started (ISO 8601), while it runs. */
  readonly startedAt: string | null;
  /** Percent of one host CPU the VMM used since the previous sample (null: first sample or stopped). */
  readonly cpuPercent: number | null;
  /** Memory charged to the VM's cgroup (or, without one, the VMM's resident set). */
  readonly memoryBytes: number | null;
  readonly diskReadBps: number | null;
  readonly diskWriteBps: number | null;
  readonly netRxBps: number | null;
  readonly netTxBps: number | null;
}

export interface HostSample {
  readonly cpus: number;
  readonly memoryMiB: number;
  readonly freeMemoryMiB: number;
  readonly cpuOvercommit: number;
  readonly memoryOvercommit: number;
  /** The most vCPUs and MiB the running VMs may have together (host x overcommit ratio). */
  readonly vcpuLimit: number;
  readonly memoryLimitMiB: number;
  readonly vcpusUsed: number;
  readonly memoryUsedMiB: number;
}

export interface Sample {
  readonly type: 'sample';
  readonly at: number;
  readonly vms: readonly VmSample[];
  readonly host: HostSample;
}
