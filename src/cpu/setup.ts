// Per-vCPU setup for booting an operating system: CPUID, boot MSRs, FPU state, the
// local APIC's LINT pins, and the register state for each Linux boot entry.
import type { BootEntry } from '../boot/loader.js';
import {
  CR0_ET,
  CR0_PE,
  CR0_PG,
  CR4_PAE,
  EFER_LMA,
  EFER_LME,
  flat,
  gdtDescriptor,
  kvmSegment,
  PD_ENTRY_SPAN,
  PDE_HUGE,
  PTE_PRESENT,
  PTE_WRITABLE,
  RFLAGS_RESERVED_1,
  TYPE_CODE_EXEC_READ_ACCESSED,
  TYPE_DATA_READ_WRITE_ACCESSED,
  tssSegment,
  type Segment,
} from './x86.js';
import type { VcpuFd } from '../kvm/kvm.js';
import { ioctlBuf } from '../kvm/kvm.js';
import { dataView } from '../kvm/struct.js';
import { kvm_lapic_state } from '../kvm/structs.js';
import { BOOT_GDT, BOOT_IDT, BOOT_PD, BOOT_PDPT, BOOT_PML4, PAGE_SIZE } from '../layout.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { setCpuid, vcpuCpuid, type CpuidEntry } from './cpuid.js';

// MSRs (Intel SDM vol. 4) zeroed or set at boot, as real firmware leaves them.
export const MSR_IA32_TSC = 0x10;
export const MSR_IA32_MISC_ENABLE = 0x1a0;
export const MSR_IA32_SYSENTER_CS = 0x174;
export const MSR_IA32_SYSENTER_ESP = 0x175;
export const MSR_IA32_SYSENTER_EIP = 0x176;
export const MSR_STAR = 0xc000_0081;
export const MSR_LSTAR = 0xc000_0082;
export const MSR_CSTAR = 0xc000_0083;
export const MSR_SYSCALL_MASK = 0xc000_0084;
export const MSR_KERNEL_GS_BASE = 0xc000_0102;
const MISC_ENABLE_FAST_STRING = 1n;

// FPU reset values (SDM vol. 1, 8.1.5 and 10.2.3).
const FPU_CONTROL_WORD = 0x37f;
const MXCSR_DEFAULT = 0x1f80;

// Local APIC registers and delivery modes (SDM vol. 3, 10.5.1).
const APIC_LVT_LINT0 = 0x350;
const APIC_LVT_LINT1 = 0x360;
const APIC_MODE_NMI = 0x4;
const APIC_MODE_EXTINT = 0x7;

// The boot GDT: Linux's conventional __BOOT_CS (0x10) and __BOOT_DS (0x18), plus a
// 32-bit code segment for the PVH entry and a TSS.
const BOOT_SEL_CODE32 = 0x08;
const BOOT_SEL_CODE64 = 0x10;
const BOOT_SEL_DATA = 0x18;
const BOOT_SEL_TSS = 0x20;
const BOOT_GDT_ENTRIES = 5;
const BOOT_SEGMENTS: Segment[] = [
  flat(BOOT_SEL_CODE32, TYPE_CODE_EXEC_READ_ACCESSED, 0, 0, 1),
  flat(BOOT_SEL_CODE64, TYPE_CODE_EXEC_READ_ACCESSED, 0, 1, 0),
  flat(BOOT_SEL_DATA, TYPE_DATA_READ_WRITE_ACCESSED, 0, 0, 1),
];
const BOOT_TSS: Segment = tssSegment(0, 0xfffff, BOOT_SEL_TSS);

/** Sets the boot MSRs one by one; returns those KVM refused (some KVMs own a few). */
export function setBootMsrs(vcpu: VcpuFd): number[] {
  const values = new Map<number, bigint>([
    [MSR_IA32_SYSENTER_CS, 0n],
    [MSR_IA32_SYSENTER_ESP, 0n],
    [MSR_IA32_SYSENTER_EIP, 0n],
    [MSR_STAR, 0n],
    [MSR_CSTAR, 0n],
    [MSR_KERNEL_GS_BASE, 0n],
    [MSR_SYSCALL_MASK, 0n],
    [MSR_LSTAR, 0n],
    [MSR_IA32_TSC, 0n],
    [MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING],
  ]);
  const refused: number[] = [];
  for (const [msr, value] of values) {
    try {
      vcpu.setMsrs(new Map([[msr, value]]));
    } catch {
      // KVM may own an MSR (or not emulate it); the caller reports the refused ones.
      refused.push(msr);
    }
  }
  return refused;
}

export function setBootFpu(vcpu: VcpuFd): void {
  vcpu.setFpu({ ...vcpu.getFpu(), fcw: FPU_CONTROL_WORD, mxcsr: MXCSR_DEFAULT });
}

/** LINT0 = ExtINT (the 8259 PIC's output), LINT1 = NMI, as a PC's firmware programs them. */
export function setLapicLints(vcpu: VcpuFd): void {
  const buf = kvm_lapic_state.alloc();
  ioctlBuf(vcpu.fd, 'GET_LAPIC', buf);
  const dv = dataView(buf);
  const setMode = (reg: number, mode: number) =>
    dv.setUint32(reg, (dv.getUint32(reg, true) & ~0x700) | (mode << 8), true);
  setMode(APIC_LVT_LINT0, APIC_MODE_EXTINT);
  setMode(APIC_LVT_LINT1, APIC_MODE_NMI);
  ioctlBuf(vcpu.fd, 'SET_LAPIC', buf);
}

/** Writes the boot GDT and, for the 64-bit entry, identity page tables over the first 1 GiB. */
function writeBootTables(memory: GuestMemory, longMode: boolean): void {
  memory.fill(BOOT_GDT, BOOT_GDT_ENTRIES * 8, 0);
  for (const seg of BOOT_SEGMENTS) memory.writeU64(BOOT_GDT + seg.selector, gdtDescriptor(seg));
  memory.writeU64(BOOT_GDT + BOOT_SEL_TSS, gdtDescriptor(BOOT_TSS));
  memory.writeU64(BOOT_IDT, 0n);
  if (!longMode) return;
  const flags = PTE_PRESENT | PTE_WRITABLE;
  memory.fill(BOOT_PML4, 3 * PAGE_SIZE, 0);
  memory.writeU64(BOOT_PML4, BigInt(BOOT_PDPT) | flags);
  memory.writeU64(BOOT_PDPT, BigInt(BOOT_PD) | flags);
  for (let i = 0; i < 512; i++) memory.writeU64(BOOT_PD + i * 8, BigInt(i * PD_ENTRY_SPAN) | flags | PDE_HUGE);
}

/** Sets registers for the loader's entry: PVH's 32-bit entry or Linux's 64-bit entry. */
export function setBootRegisters(vcpu: VcpuFd, memory: GuestMemory, entry: BootEntry): void {
  const longMode = entry.mode === 'linux64';
  writeBootTables(memory, longMode);
  const code = longMode ? BOOT_SEGMENTS[1]! : BOOT_SEGMENTS[0]!;
  const data = BOOT_SEGMENTS[2]!;
  vcpu.updateSregs((s) => ({
    ...s,
    cs: kvmSegment(code, 0),
    ds: kvmSegment(data, 0),
    es: kvmSegment(data, 0),
    fs: kvmSegment(data, 0),
    gs: kvmSegment(data, 0),
    ss: kvmSegment(data, 0),
    tr: kvmSegment(BOOT_TSS, 0),
    gdt: { base: BigInt(BOOT_GDT), limit: BOOT_GDT_ENTRIES * 8 - 1 },
    idt: { base: BigInt(BOOT_IDT), limit: 7 },
    cr0: BigInt(CR0_PE | CR0_ET | (longMode ? CR0_PG : 0)) & 0xffff_ffffn,
    cr3: longMode ? BigInt(BOOT_PML4) : 0n,
    cr4: longMode ? BigInt(CR4_PAE) : 0n,
    efer: longMode ? BigInt(EFER_LME | EFER_LMA) : 0n,
  }));
  const zero = Object.fromEntries(
    ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15'].map(
      (r) => [r, 0n],
    ),
  );
  vcpu.setRegs({
    ...zero,
    rip: BigInt(entry.rip),
    rflags: BigInt(RFLAGS_RESERVED_1),
    ...(entry.mode === 'pvh32' ? { rbx: BigInt(entry.rbx) } : { rsi: BigInt(entry.rsi) }),
  });
}

/** Everything a vCPU needs before an OS boots on it (the entry registers are separate). */
export function configureVcpu(
  vcpu: VcpuFd,
  index: number,
  vcpuCount: number,
  cpuid: readonly CpuidEntry[],
  irqchip: boolean,
  threadsPerCore: 1 | 2 = 1,
): number[] {
  setCpuid(vcpu, vcpuCpuid(cpuid, index, vcpuCount, threadsPerCore));
  const refused = setBootMsrs(vcpu);
  setBootFpu(vcpu);
  if (irqchip) setLapicLints(vcpu);
  return refused;
}
