// Driving interrupt lines from any thread: KVM_IRQ_LINE on the VM fd, with one
// preallocated argument buffer per thread so a device raising an IRQ allocates nothing.
import { KVM } from '../kvm/ioctl.js';
import * as libc from '../kvm/libc.js';
import { dataView } from '../kvm/struct.js';
import { kvm_irq_level, kvm_msi } from '../kvm/structs.js';

export function irqLineSetter(vmFd: number): (irq: number, level: 0 | 1) => void {
  const buf = kvm_irq_level.alloc();
  const dv = dataView(buf);
  const irqAt = kvm_irq_level.offsetOf('irq');
  const levelAt = kvm_irq_level.offsetOf('level');
  return (irq, level) => {
    dv.setUint32(irqAt, irq, true);
    dv.setUint32(levelAt, level, true);
    // Without an in-kernel irqchip there is no line to drive: ENXIO, ignored by design.
    libc.ioctlPtr(vmFd, KVM.IRQ_LINE, buf);
  };
}

/** KVM_SIGNAL_MSI with a preallocated argument: how MSI-X vectors reach the guest. */
export function msiSender(vmFd: number): (addressLo: number, addressHi: number, data: number) => void {
  const buf = kvm_msi.alloc();
  const dv = dataView(buf);
  const lo = kvm_msi.offsetOf('address_lo');
  const hi = kvm_msi.offsetOf('address_hi');
  const dataAt = kvm_msi.offsetOf('data');
  return (addressLo, addressHi, data) => {
    dv.setUint32(lo, addressLo, true);
    dv.setUint32(hi, addressHi, true);
    dv.setUint32(dataAt, data, true);
    // Returns 0 when the guest's LAPIC blocked it (a bad address): nothing to report.
    libc.ioctlPtr(vmFd, KVM.SIGNAL_MSI, buf);
  };
}
