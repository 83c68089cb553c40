// Puts a vCPU straight into a CPU mode and privilege level, as a loader would leave it:
// real mode, 32-bit protected mode or 64-bit long mode, at CPL0 or CPL3. The VMM
// writes the GDT, TSS and identity page tables into guest memory and sets the
// registers itself, so no guest code runs at CPL0 to get there (CPL0 is emulated,
// and slow, on software KVM). Ring-3 guests get IOPL 3, so `in`/`out` work there.
import { KilnError } from '../errors.js';
import type { VcpuFd } from '../kvm/kvm.js';
import {
  CR0_PE,
  CR0_ET,
  CR0_NE,
  CR0_PG,
  CR4_PAE,
  EFER_LME,
  EFER_LMA,
  RFLAGS_RESERVED_1,
  RFLAGS_IOPL3,
  PTE_PRESENT,
  PTE_WRITABLE,
  PTE_USER,
  PDE_HUGE,
  PD_ENTRY_SPAN,
  TYPE_CODE_EXEC_READ_ACCESSED,
  TYPE_DATA_READ_WRITE_ACCESSED,
  tssSegment,
  SEL_KERNEL_CODE64,
  SEL_KERNEL_DATA,
  SEL_KERNEL_CODE32,
  SEL_USER_CODE32,
  SEL_USER_DATA,
  SEL_USER_CODE64,
  SEL_TSS,
  type Segment,
  gdtDescriptor,
  kvmSegment,
  flat,
} from '../cpu/x86.js';
import {
  KIT_CODE,
  KIT_GDT,
  KIT_IDENTITY_MAP_SIZE,
  KIT_IDT,
  KIT_KERNEL_STACK_TOP,
  KIT_PD,
  KIT_PDPT,
  KIT_PML4,
  KIT_TSS,
  KIT_USER_STACK_TOP,
  PAGE_SIZE,
} from '../layout.js';
import type { GuestMemory } from '../memory/guest-memory.js';

export type CpuMode = 'real' | 'protected32' | 'long64';
export type Cpl = 0 | 3;

export * from '../cpu/x86.js';

const GDT_ENTRIES = 9; // null, six segments, and the 16-byte TSS descriptor
const TSS_SIZE = 104;
const TSS_RSP0 = 4;
const TSS32_SS0 = 8;
const TSS_IOMAP_BASE = 102;

const SEGMENTS = {
  kernelCode64: flat(SEL_KERNEL_CODE64, TYPE_CODE_EXEC_READ_ACCESSED, 0, 1, 0),
  kernelData: flat(SEL_KERNEL_DATA, TYPE_DATA_READ_WRITE_ACCESSED, 0, 0, 1),
  kernelCode32: flat(SEL_KERNEL_CODE32, TYPE_CODE_EXEC_READ_ACCESSED, 0, 0, 1),
  userCode32: flat(SEL_USER_CODE32, TYPE_CODE_EXEC_READ_ACCESSED, 3, 0, 1),
  userData: flat(SEL_USER_DATA, TYPE_DATA_READ_WRITE_ACCESSED, 3, 0, 1),
  userCode64: flat(SEL_USER_CODE64, TYPE_CODE_EXEC_READ_ACCESSED, 3, 1, 0),
};
const TSS_SEGMENT: Segment = tssSegment(KIT_TSS, TSS_SIZE - 1, SEL_TSS);

/** Writes the kit's GDT and a TSS whose ring-0 stack is KIT_KERNEL_STACK_TOP. */
function writeGdtAndTss(memory: GuestMemory, mode: CpuMode): void {
  memory.fill(KIT_GDT, GDT_ENTRIES * 8, 0);
  for (const seg of Object.values(SEGMENTS)) memory.writeU64(KIT_GDT + seg.selector, gdtDescriptor(seg));
  memory.writeU64(KIT_GDT + SEL_TSS, gdtDescriptor(TSS_SEGMENT));
  memory.writeU64(KIT_GDT + SEL_TSS + 8, 0n); // base bits 63:32 of the 16-byte long-mode TSS descriptor
  memory.fill(KIT_TSS, TSS_SIZE, 0);
  if (mode === 'long64') {
    memory.writeU64(KIT_TSS + TSS_RSP0, BigInt(KIT_KERNEL_STACK_TOP));
  } else {
    memory.writeU32(KIT_TSS + TSS_RSP0, KIT_KERNEL_STACK_TOP);
    memory.writeU16(KIT_TSS + TSS32_SS0, SEL_KERNEL_DATA);
  }
  memory.writeU16(KIT_TSS + TSS_IOMAP_BASE, TSS_SIZE); // no I/O bitmap: IOPL alone decides
}

/** Identity-maps [0, KIT_IDENTITY_MAP_SIZE) with 2 MiB user-accessible pages. */
export function writeIdentityPageTables(memory: GuestMemory): void {
  const directories = KIT_IDENTITY_MAP_SIZE / (512 * PD_ENTRY_SPAN);
  const flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
  memory.fill(KIT_PML4, PAGE_SIZE, 0);
  memory.fill(KIT_PDPT, PAGE_SIZE, 0);
  memory.writeU64(KIT_PML4, BigInt(KIT_PDPT) | flags);
  for (let d = 0; d < directories; d++) {
    const pd = KIT_PD + d * PAGE_SIZE;
    memory.writeU64(KIT_PDPT + d * 8, BigInt(pd) | flags);
    for (let e = 0; e < 512; e++) {
      memory.writeU64(pd + e * 8, BigInt((d * 512 + e) * PD_ENTRY_SPAN) | flags | PDE_HUGE);
    }
  }
}

export interface EntryState {
  readonly mode: CpuMode;
  readonly cpl: Cpl;
  /** Guest-physical (and, with the identity map, linear) address of the first instruction. */
  readonly entry: number;
  /** Initial stack pointer; defaults to the kit's ring-3 or ring-0 stack. */
  readonly stackTop?: number;
  /** Extra general registers (e.g. rdi = vCPU index). */
  readonly regs?: Readonly<Record<string, bigint>>;
}

/**
 * Sets a vCPU's registers (and, outside real mode, the GDT, TSS and page tables in
 * guest memory) so that it starts at `entry` in the given mode and privilege level.
 * Real mode runs at CPL0 with CS:IP = (entry >> 4):(entry & 0xf).
 */
export function enterMode(vcpu: VcpuFd, memory: GuestMemory, state: EntryState): void {
  const { mode, cpl, entry } = state;
  if (mode === 'real' && cpl !== 0) throw new KilnError('real mode has no ring 3');
  if (mode === 'real' && entry >= 0x10_0000) throw new KilnError('a real-mode entry point must lie below 1 MiB');
  const stack = state.stackTop ?? (cpl === 3 ? KIT_USER_STACK_TOP : KIT_KERNEL_STACK_TOP);
  let rip = entry;
  let rsp = stack;

  if (mode === 'real') {
    const segment = entry >>> 4;
    rip = entry & 0xf;
    rsp = stack & 0xffff;
    vcpu.updateSregs((s) => {
      const realSeg = (type: number) => ({
        base: BigInt(segment << 4),
        limit: 0xffff,
        selector: segment,
        type,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
      });
      const ss = {
        ...realSeg(TYPE_DATA_READ_WRITE_ACCESSED),
        base: BigInt(stack & ~0xffff),
        selector: (stack & ~0xffff) >>> 4,
      };
      return {
        ...s,
        cs: realSeg(TYPE_CODE_EXEC_READ_ACCESSED),
        ds: realSeg(TYPE_DATA_READ_WRITE_ACCESSED),
        es: realSeg(TYPE_DATA_READ_WRITE_ACCESSED),
        fs: realSeg(TYPE_DATA_READ_WRITE_ACCESSED),
        gs: realSeg(TYPE_DATA_READ_WRITE_ACCESSED),
        ss,
      };
    });
  } else {
    writeGdtAndTss(memory, mode);
    const long = mode === 'long64';
    if (long) writeIdentityPageTables(memory);
    const code = long
      ? cpl === 3
        ? SEGMENTS.userCode64
        : SEGMENTS.kernelCode64
      : cpl === 3
        ? SEGMENTS.userCode32
        : SEGMENTS.kernelCode32;
    const data = cpl === 3 ? SEGMENTS.userData : SEGMENTS.kernelData;
    vcpu.updateSregs((s) => ({
      ...s,
      cs: kvmSegment(code, cpl),
      ds: kvmSegment(data, cpl),
      es: kvmSegment(data, cpl),
      fs: kvmSegment(data, cpl),
      gs: kvmSegment(data, cpl),
      ss: kvmSegment(data, cpl),
      tr: kvmSegment(TSS_SEGMENT, 0),
      gdt: { base: BigInt(KIT_GDT), limit: GDT_ENTRIES * 8 - 1 },
      idt: { base: BigInt(KIT_IDT), limit: 0 },
      cr0: BigInt(CR0_PE | CR0_ET | CR0_NE | (long ? CR0_PG : 0)) & 0xffff_ffffn,
      cr3: long ? BigInt(KIT_PML4) : 0n,
      cr4: long ? BigInt(CR4_PAE) : 0n,
      efer: long ? BigInt(EFER_LME | EFER_LMA) : 0n,
    }));
  }
  vcpu.setRegs({
    ...Object.fromEntries(
      ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15'].map(
        (r) => [r, 0n],
      ),
    ),
    ...state.regs,
    rip: BigInt(rip),
    rsp: BigInt(rsp),
    rflags: BigInt(RFLAGS_RESERVED_1 | (cpl === 3 ? RFLAGS_IOPL3 : 0)),
  });
}

/** Where kit code is loaded unless a test says otherwise. */
export const DEFAULT_ENTRY = KIT_CODE;
