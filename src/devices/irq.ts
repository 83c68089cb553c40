// Driving interrupt lines from any thread: KVM_IRQ_LINE on the VM fd, with one
// preallocated argument buffer per thread so a device raising an IRQ allocates nothing.
import { KVM } from '../kvm/ioctl.js';
import * as libc from '../kvm/libc.js';
import { dataView } from '../kvm/struct.js';
import { kvm_irq_level } from '../kvm/structs.js';

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
