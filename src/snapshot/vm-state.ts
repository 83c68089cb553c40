// The VM-wide state KVM holds (in-kernel irqchip and PIT, the kvmclock), as the bytes KVM
// gives; saved while every vCPU is parked, restored before any runs.
import type { VmFd } from '../kvm/kvm.js';

export interface SavedVmState {
  readonly picMaster: Uint8Array;
  readonly picSlave: Uint8Array;
  readonly ioapic: Uint8Array;
  readonly pit: Uint8Array;
  readonly clock: Uint8Array;
  /** The host's wall clock (ns since the epoch) when the clock was read: clock_realtime's reference. */
  readonly wallNs?: bigint;
}

const wallNs = (): bigint => BigInt(Date.now()) * 1_000_000n;

export function saveVmState(vm: VmFd): SavedVmState {
  return {
    picMaster: vm.getIrqchip(0),
    picSlave: vm.getIrqchip(1),
    ioapic: vm.getIrqchip(2),
    pit: vm.getPit2(),
    clock: vm.getClock(),
    wallNs: wallNs(),
  };
}

/**
 * The PIT, the irqchips, then the clock. By default the guest's kvmclock resumes where it
 * stopped (its time stood still while it was saved); with `clockRealtime` (Firecracker's
 * clock_realtime) it is moved on by the wall-clock time since the snapshot, so the guest's
 * clock agrees with the host's again. Never moved back (a host clock set backwards).
 */
export function restoreVmState(vm: VmFd, saved: SavedVmState, opts: { clockRealtime?: boolean } = {}): void {
  vm.setPit2(saved.pit);
  vm.setIrqchip(saved.picMaster);
  vm.setIrqchip(saved.picSlave);
  vm.setIrqchip(saved.ioapic);
  const elapsed = opts.clockRealtime && saved.wallNs !== undefined ? wallNs() - saved.wallNs : 0n;
  vm.setClock(saved.clock, elapsed > 0n ? elapsed : 0n);
}
