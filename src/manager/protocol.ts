// The daemon's JSON API on <state>/kiln.sock: its replies, typed once for the daemon
// that sends them and the CLI that reads them.
import type { VmDefinition } from './definition.js';
import type { BrokenDefinition } from './store.js';

export type VmState = 'stopped' | 'starting' | 'running' | 'paused';

export interface VmStatus {
  readonly name: string;
  readonly state: VmState;
  readonly pid: number | null;
  readonly cpus: number;
  readonly memoryMiB: number;
  /** When the VMM process started (ISO 8601), while it runs. */
  readonly startedAt: string | null;
}

export interface ListReply {
  readonly vms: readonly VmStatus[];
  readonly broken: readonly BrokenDefinition[];
}

export interface InfoReply extends VmStatus {
  readonly definition: VmDefinition;
  /** The VM's cgroup directories and the limits written there. */
  readonly cgroup: {
    readonly dirs: readonly string[];
    readonly cpuWeight: number;
    readonly cpuQuotaPercent: number;
    readonly memoryLimitBytes: number;
  };
  readonly consoleLog: string;
  /** How the VMM was (last) started: jailed (its uid and chroot) or not; null before its first start. */
  readonly jail: { readonly jailed: boolean; readonly uid: number | null; readonly root: string | null } | null;
  /** Its snapshots' tags, oldest first (kiln snapshots NAME has the details). */
  readonly snapshots?: readonly string[];
}

export interface StartReply extends VmStatus {
  /** Things that did not work but did not stop the start (e.g. a pinning the kernel refused). */
  readonly warnings: readonly string[];
}

/** kiln upgrade's answer: the VM's status in its new VMM, and how it got there. */
export interface UpgradeReply extends StartReply {
  /** 'handed over': the new VMM maps the old one's guest memory file; 'copied': a live migration copied it. */
  readonly memory: 'handed over' | 'copied';
  /** How long the guest was paused. */
  readonly downtimeMs: number;
}

export interface LogsReply {
  readonly log: string;
}

export interface RemovedReply {
  readonly removed: string;
}

/** Every failure: 400 for a request that cannot be done (field: the definition's field at fault), 500 for a daemon bug. */
export interface ErrorReply {
  readonly error: string;
  readonly field?: string;
}

/** GET /pool: the daemon's pool of VMMs started ahead. */
export interface PoolReply {
  readonly idle: number;
  readonly starting: number;
  readonly size: number;
}

/** POST /dashboard: where the web UI serves, and a one-time address that opens a session. */
export interface DashboardReply {
  readonly url: string;
  readonly listen: string;
  readonly loopback: boolean;
}
