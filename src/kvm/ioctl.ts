// KVM ioctl request numbers, computed as <asm-generic/ioctl.h> does from the
// direction, the KVMIO type 0xAE, the command number and the argument struct's size.
import type { StructType } from './struct.js';
import * as s from './structs.js';

const IOC_NRBITS = 8;
const IOC_TYPEBITS = 8;
const IOC_SIZEBITS = 14;
const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

/** _IOC(dir, type, nr, size); a plain number (it may exceed 2^31, never 2^53). */
export function ioc(dir: number, type: number, nr: number, size: number): number {
  if (size >= 1 << IOC_SIZEBITS) throw new RangeError(`ioctl argument size ${size} does not fit`);
  return dir * 2 ** IOC_DIRSHIFT + ((type << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)) + size * 2 ** IOC_SIZESHIFT;
}

const KVMIO = 0xae;
const sizeOfArg = (arg: StructType | number): number => (typeof arg === 'number' ? arg : arg.size);
export const _IO = (nr: number) => ioc(IOC_NONE, KVMIO, nr, 0);
export const _IOR = (nr: number, arg: StructType | number) => ioc(IOC_READ, KVMIO, nr, sizeOfArg(arg));
export const _IOW = (nr: number, arg: StructType | number) => ioc(IOC_WRITE, KVMIO, nr, sizeOfArg(arg));
export const _IOWR = (nr: number, arg: StructType | number) => ioc(IOC_READ | IOC_WRITE, KVMIO, nr, sizeOfArg(arg));

/** The ioctls Kiln issues, by their <linux/kvm.h> names. */
export const KVM = {
  // /dev/kvm
  GET_API_VERSION: _IO(0x00),
  CREATE_VM: _IO(0x01),
  GET_MSR_INDEX_LIST: _IOWR(0x02, s.kvm_msr_list),
  CHECK_EXTENSION: _IO(0x03),
  GET_VCPU_MMAP_SIZE: _IO(0x04),
  GET_SUPPORTED_CPUID: _IOWR(0x05, s.kvm_cpuid2),
  // VM fd
  CREATE_VCPU: _IO(0x41),
  SET_USER_MEMORY_REGION: _IOW(0x46, s.kvm_userspace_memory_region),
  SET_TSS_ADDR: _IO(0x47),
  SET_IDENTITY_MAP_ADDR: _IOW(0x48, 8),
  CREATE_IRQCHIP: _IO(0x60),
  IRQ_LINE: _IOW(0x61, s.kvm_irq_level),
  SET_GSI_ROUTING: _IOW(0x6a, s.kvm_irq_routing),
  IRQFD: _IOW(0x76, s.kvm_irqfd),
  CREATE_PIT2: _IOW(0x77, s.kvm_pit_config),
  IOEVENTFD: _IOW(0x79, s.kvm_ioeventfd),
  ENABLE_CAP: _IOW(0xa3, s.kvm_enable_cap),
  SIGNAL_MSI: _IOW(0xa5, s.kvm_msi),
  // vCPU fd
  RUN: _IO(0x80),
  GET_REGS: _IOR(0x81, s.kvm_regs),
  SET_REGS: _IOW(0x82, s.kvm_regs),
  GET_SREGS: _IOR(0x83, s.kvm_sregs),
  SET_SREGS: _IOW(0x84, s.kvm_sregs),
  TRANSLATE: _IOWR(0x85, s.kvm_translation),
  GET_MSRS: _IOWR(0x88, s.kvm_msrs),
  SET_MSRS: _IOW(0x89, s.kvm_msrs),
  SET_SIGNAL_MASK: _IOW(0x8b, s.kvm_signal_mask),
  GET_FPU: _IOR(0x8c, s.kvm_fpu),
  SET_FPU: _IOW(0x8d, s.kvm_fpu),
  GET_LAPIC: _IOR(0x8e, s.kvm_lapic_state),
  SET_LAPIC: _IOW(0x8f, s.kvm_lapic_state),
  SET_CPUID2: _IOW(0x90, s.kvm_cpuid2),
  GET_MP_STATE: _IOR(0x98, s.kvm_mp_state),
  SET_MP_STATE: _IOW(0x99, s.kvm_mp_state),
  GET_VCPU_EVENTS: _IOR(0x9f, s.kvm_vcpu_events),
  SET_VCPU_EVENTS: _IOW(0xa0, s.kvm_vcpu_events),
  GET_CPUID2: _IOWR(0x91, s.kvm_cpuid2),
  // Snapshot state, moved as opaque bytes (sizes in KVM_STATE_BYTES).
  GET_XSAVE: _IOR(0xa4, 4096),
  SET_XSAVE: _IOW(0xa5, 4096),
  GET_XCRS: _IOR(0xa6, 392),
  SET_XCRS: _IOW(0xa7, 392),
  GET_DEBUGREGS: _IOR(0xa1, 128),
  SET_DEBUGREGS: _IOW(0xa2, 128),
  GET_TSC_KHZ: _IO(0xa3),
  SET_TSC_KHZ: _IO(0xa2),
  KVMCLOCK_CTRL: _IO(0xad),
  // VM fd, snapshot state
  GET_IRQCHIP: _IOWR(0x62, 520),
  SET_IRQCHIP: _IOR(0x63, 520),
  GET_PIT2: _IOR(0x9f, 112),
  SET_PIT2: _IOW(0xa0, 112),
  GET_CLOCK: _IOR(0x7c, 48),
  SET_CLOCK: _IOW(0x7b, 48),
  GET_DIRTY_LOG: _IOW(0x42, 16),
} as const;

/**
 * Sizes of the state structs a snapshot keeps as bytes (x86-64 <asm/kvm.h>): kvm_xsave,
 * kvm_xcrs, kvm_debugregs, kvm_irqchip (chip id + 512-byte union), kvm_pit_state2,
 * kvm_clock_data.
 */
export const KVM_STATE_BYTES = { xsave: 4096, xcrs: 392, debugregs: 128, irqchip: 520, pit2: 112, clock: 48 } as const;

export type KvmIoctlName = keyof typeof KVM;

/** KVM_CAP_* numbers Kiln asks about with KVM_CHECK_EXTENSION. */
export const KVM_CAP = {
  IRQCHIP: 0,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  IRQ_ROUTING: 25,
  IRQFD: 32,
  PIT2: 33,
  IOEVENTFD: 36,
  MAX_VCPUS: 66,
  SIGNAL_MSI: 77,
  READONLY_MEM: 81,
  IMMEDIATE_EXIT: 136,
  ADJUST_CLOCK: 39,
  DEBUGREGS: 50,
  XSAVE: 55,
  XCRS: 56,
  GET_TSC_KHZ: 61,
  KVMCLOCK_CTRL: 76,
} as const;

/** KVM_EXIT_* reasons (kvm_run.exit_reason). */
export const KVM_EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  NMI: 16,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
} as const;

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;
export const KVM_API_VERSION = 12;
export const KVM_MEM_READONLY = 1 << 1;
export const KVM_PIT_SPEAKER_DUMMY = 1;

const exitNames = new Map<number, string>(Object.entries(KVM_EXIT).map(([name, value]) => [value, `KVM_EXIT_${name}`]));

export function exitReasonName(reason: number): string {
  return exitNames.get(reason) ?? `KVM_EXIT_${reason}`;
}
