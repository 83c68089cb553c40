// What a vCPU thread is started with and what it reports back.
import type { CompatConfig } from '../compat/pvm.js';
import type { DeviceSpec } from '../devices/catalogue.js';
import type { Decoded } from '../kvm/struct.js';
import type { LogMessage } from '../log.js';
import type { GuestMemoryDescriptor } from '../memory/guest-memory.js';
import type { SavedVcpu } from '../snapshot/vcpu-state.js';

export interface VcpuWorkerInit {
  readonly id: number;
  readonly vcpuFd: number;
  /** The VM's fd, for KVM_IRQ_LINE from devices. */
  readonly vmFd: number;
  readonly runMmapSize: number;
  readonly control: SharedArrayBuffer;
  readonly memory: GuestMemoryDescriptor;
  readonly devices: readonly DeviceSpec[];
  /** Signal that kicks this thread out of KVM_RUN (blocked outside KVM_RUN). */
  readonly kickSignal: number;
  /** Log each unhandled port or MMIO address once. */
  readonly logUnhandled: boolean;
  /** Software-KVM compatibility (compat/pvm.ts); null on hardware KVM. */
  readonly compat: CompatConfig | null;
  /** The vCPU thread's seccomp program (seccomp/policy.ts), loaded before its first KVM_RUN; null: none. */
  readonly seccomp: Uint8Array | null;
  /** The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST). */
  readonly msrIndices: readonly number[];
  /** A snapshot's state for this vCPU, restored before its first KVM_RUN. */
  readonly restore?: SavedVcpu;
  /** Where the thread counts its exits for the metrics (Float64 each: VCPU_EXIT_COUNTERS' order). */
  readonly exitCounters?: SharedArrayBuffer;
}

/** A vCPU's exit counters (Firecracker's vcpu metrics' names), in their shared order. */
export const VCPU_EXIT_COUNTERS = ['exit_io_in', 'exit_io_out', 'exit_mmio_read', 'exit_mmio_write'] as const;

/**
 * Why a vCPU thread stopped running its guest:
 * - stopped: the host asked it to stop;
 * - guest-exit: a device ended the VM on the guest's request (debug-exit, ACPI poweroff);
 * - hlt: the guest halted with no in-kernel irqchip to wake it;
 * - shutdown: triple fault;
 * - fail-entry / internal-error / unhandled-exit: KVM could not go on;
 * - error: Kiln itself failed on this thread.
 */
export type VcpuExitReason =
  'stopped' | 'guest-exit' | 'hlt' | 'shutdown' | 'fail-entry' | 'internal-error' | 'unhandled-exit' | 'error';

export interface VcpuExit {
  readonly vcpu: number;
  readonly reason: VcpuExitReason;
  /** One line for a human: what happened, with KVM's own codes. */
  readonly detail: string;
  /** General registers at the exit, where KVM could still report them. */
  readonly regs?: Decoded;
  /** Selected system registers at the exit: cs, ss, cr0, cr3, cr4, efer. */
  readonly sregs?: Decoded;
  /** How many exits this vCPU handled (I/O and MMIO). */
  readonly exits: number;
  /** Milliseconds from the first KVM_RUN to the end of the run loop. */
  readonly runMs: number;
  /** Instructions finished by the software-KVM compatibility layer, by kind. */
  readonly compat?: Readonly<Record<string, number>>;
}

export type VcpuMessage =
  | LogMessage
  | {
      readonly type: 'ready';
      readonly thread: number | bigint;
      readonly tid: number;
      /** Epoch ms, just before the first KVM_RUN. */ readonly firstRunAt: number;
    }
  | { readonly type: 'paused' }
  | { readonly type: 'state'; readonly state: SavedVcpu }
  | { readonly type: 'state-error'; readonly error: string }
  | { readonly type: 'exit'; readonly exit: VcpuExit };
