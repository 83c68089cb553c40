// x86 architecture: control-register and paging bits, segment types, and the GDT and
// kvm_segment encodings of a segment (Intel SDM vol. 3). Used by Linux boot
// (cpu/setup.ts) and by the test-guest kit (guest/modes.ts).
import type { Decoded } from '../kvm/struct.js';
import { PAGE_SIZE } from '../layout.js';

// Control and feature bits (Intel SDM vol. 3, 2.5 and 2.2.1).
export const CR0_PE = 1 << 0;
export const CR0_ET = 1 << 4;
export const CR0_NE = 1 << 5;
export const CR0_PG = 0x8000_0000;
export const CR4_PAE = 1 << 5;
export const EFER_LME = 1 << 8;
export const EFER_LMA = 1 << 10;
export const RFLAGS_RESERVED_1 = 1 << 1;
export const RFLAGS_IOPL3 = 3 << 12;

// Page-table entry bits.
export const PTE_PRESENT = 1n << 0n;
export const PTE_WRITABLE = 1n << 1n;
export const PTE_USER = 1n << 2n;
export const PDE_HUGE = 1n << 7n;
export const PD_ENTRY_SPAN = 2 * 1024 * 1024;

// Segment types (SDM 3.4.5.1) and the kit's GDT.
export const TYPE_CODE_EXEC_READ_ACCESSED = 0xb;
export const TYPE_DATA_READ_WRITE_ACCESSED = 0x3;
export const TYPE_TSS_BUSY = 0xb;
export const SEL_KERNEL_CODE64 = 0x08;
export const SEL_KERNEL_DATA = 0x10;
export const SEL_KERNEL_CODE32 = 0x18;
export const SEL_USER_CODE32 = 0x20;
export const SEL_USER_DATA = 0x28;
export const SEL_USER_CODE64 = 0x30;
export const SEL_TSS = 0x38;
export interface Segment {
  readonly base: number;
  readonly limit: number;
  readonly selector: number;
  readonly type: number;
  readonly s: 0 | 1;
  readonly dpl: number;
  readonly l: 0 | 1;
  readonly db: 0 | 1;
  readonly g: 0 | 1;
}

/** The 8-byte GDT descriptor for a segment (limit given in its own granularity). */
export function gdtDescriptor(seg: Segment): bigint {
  const limit = seg.g ? Math.floor(seg.limit / PAGE_SIZE) : seg.limit;
  const base = BigInt(seg.base);
  const access = BigInt(seg.type | (seg.s << 4) | (seg.dpl << 5) | (1 << 7));
  const flags = BigInt((seg.l << 1) | (seg.db << 2) | (seg.g << 3));
  return (
    BigInt(limit & 0xffff) |
    ((base & 0xffffffn) << 16n) |
    (access << 40n) |
    (BigInt((limit >>> 16) & 0xf) << 48n) |
    (flags << 52n) |
    (((base >> 24n) & 0xffn) << 56n)
  );
}

/** The kvm_segment form KVM_SET_SREGS takes. */
export function kvmSegment(seg: Segment, rpl: number): Decoded {
  return {
    base: BigInt(seg.base),
    limit: seg.limit,
    selector: seg.selector | rpl,
    type: seg.type,
    present: 1,
    dpl: seg.dpl,
    db: seg.db,
    s: seg.s,
    l: seg.l,
    g: seg.g,
    avl: 0,
    unusable: 0,
  };
}

export const flat = (selector: number, type: number, dpl: number, l: 0 | 1, db: 0 | 1): Segment => ({
  base: 0,
  limit: 0xffff_ffff,
  selector,
  type,
  s: 1,
  dpl,
  l,
  db,
  g: 1,
});

/** A busy 64-bit TSS descriptor's segment (system segment, byte granularity). */
export const tssSegment = (base: number, limit: number, selector: number): Segment => ({
  base,
  limit,
  selector,
  type: TYPE_TSS_BUSY,
  s: 0,
  dpl: 0,
  l: 0,
  db: 0,
  g: 0,
});
