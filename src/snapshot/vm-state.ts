// The VM-wide state KVM holds (in-kernel irqchip and PIT, the kvmclock), as the bytes KVM
// gives; saved while every vCPU is parked, restored before any runs.
import type { VmFd } from '../kvm/kvm.js';

export interface SavedVmState {
  readonly picMaster: Uint8Array;
  readonly picSlave: Uint8Array;
  readonly ioapic: Uint8Array;
  readonly pit: Uint8Array;
  readonly clock: Uint8Array;
}

export function saveVmState(vm: VmFd): SavedVmState {
  return {
    picMaster: vm.getIrqchip(0),
    picSlave: vm.getIrqchip(1),
    ioapic: vm.getIrqchip(2),
    pit: vm.getPit2(),
    clock: vm.getClock(),
  };
}

/** The PIT, the irqchips, then the clock (the guest's kvmclock resumes where it stopped). */
export function restoreVmState(vm: VmFd, saved: SavedVmState): void {
  vm.setPit2(saved.pit);
  vm.setIrqchip(saved.picMaster);
  vm.setIrqchip(saved.picSlave);
  vm.setIrqchip(saved.ioapic);
  vm.setClock(saved.clock);
}
