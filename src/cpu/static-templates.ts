// Firecracker's static CPU templates (machine-config `cpu_template`: C3, T2, T2S, T2CL,
// T2A): each makes the guest's CPUID (and, for T2S and T2CL, IA32_ARCH_CAPABILITIES) look
// like an EC2 instance type's, so a guest can move between hosts of those processor
// generations. Each is a list of forced bits on top of KVM's supported CPUID, the same
// mechanism as a custom template's modifiers (PUT /cpu-config), and each applies only on
// the processors it was made for, which Firecracker checks at InstanceStart.
import { KilnError } from '../errors.js';
import type { CpuidEntry, CpuidRegister } from './cpuid.js';
import type { CpuidModifier } from './templates.js';

export const STATIC_TEMPLATE_NAMES = ['C3', 'T2', 'T2S', 'T2CL', 'T2A'] as const;
export type StaticTemplateName = (typeof STATIC_TEMPLATE_NAMES)[number];

/** One MSR's forced bits: where `mask` has a 1 the guest reads `value`'s bit. */
export interface MsrModifier {
  readonly index: number;
  readonly mask: bigint;
  readonly value: bigint;
}

/** A processor's family, model and stepping as CPUID leaf 1's EAX spells them. */
export interface CpuModel {
  readonly extendedFamily: number;
  readonly extendedModel: number;
  readonly family: number;
  readonly model: number;
  readonly stepping: number;
}

export const cpuModelOf = (leaf1Eax: number): CpuModel => ({
  extendedFamily: (leaf1Eax >>> 20) & 0xff,
  extendedModel: (leaf1Eax >>> 16) & 0xf,
  family: (leaf1Eax >>> 8) & 0xf,
  model: (leaf1Eax >>> 4) & 0xf,
  stepping: leaf1Eax & 0xf,
});

const sameModel = (a: CpuModel, b: CpuModel) =>
  a.extendedFamily === b.extendedFamily &&
  a.extendedModel === b.extendedModel &&
  a.family === b.family &&
  a.model === b.model &&
  a.stepping === b.stepping;

// The processors the templates were made for (as leaf 1's EAX): Intel family 6, AMD 0x19.
const SKYLAKE = cpuModelOf(0x0005_0654);
const CASCADE_LAKE = cpuModelOf(0x0005_0657);
const ICE_LAKE = cpuModelOf(0x0006_06a6);
const MILAN = cpuModelOf(0x00a0_0f11);

export const VENDOR_INTEL = 'GenuineIntel';
export const VENDOR_AMD = 'AuthenticAMD';

/** IA32_ARCH_CAPABILITIES (Intel SDM vol. 4): the speculative-execution fixes a CPU has. */
export const MSR_IA32_ARCH_CAPABILITIES = 0x10a;

export interface StaticTemplate {
  readonly name: StaticTemplateName;
  readonly vendor: typeof VENDOR_INTEL | typeof VENDOR_AMD;
  readonly models: readonly CpuModel[];
  readonly cpuid: readonly CpuidModifier[];
  readonly msrs: readonly MsrModifier[];
}

type Row = readonly [
  leaf: number,
  subleaf: number,
  flags: number,
  register: CpuidRegister,
  mask: number,
  value: number,
];
const rows = (list: readonly Row[]): CpuidModifier[] =>
  list.map(([leaf, subleaf, flags, register, mask, value]) => ({ leaf, subleaf, flags, register, mask, value }));

// XSAVE with x87, SSE and AVX state only (no MPX, AVX-512 or PKRU components) and none of
// XSAVEOPT's successors (XSAVEC, XGETBV1, XSAVES): every template has it.
const XSAVE_UP_TO_AVX: readonly Row[] = [
  [0xd, 0, 1, 'eax', 0x0000_02f8, 0],
  [0xd, 1, 1, 'eax', 0x0000_000e, 0],
];

// What the T2 family shares: leaf 1 reads as a Haswell Xeon (family 6, model 0x3f,
// stepping 2) and loses the monitoring, virtualization and power-management bits (DTES64,
// MONITOR, DS-CPL, VMX, SMX, EST, TM2, CNXT-ID, SDBG, xTPR, PDCM, DCA); leaf 7 loses what came
// after Haswell (AVX-512, SGX, MPX, PKU) while ERMS is forced on.
const T2_COMMON: readonly Row[] = [
  [0x1, 0, 0, 'eax', 0x0fff_3fff, 0x0003_06f2],
  [0x1, 0, 0, 'ecx', 0x0004_cdfc, 0],
  [0x1, 0, 0, 'edx', 0xe864_1080, 0x0000_1080],
  [0x7, 0, 1, 'ebx', 0xffef_da14, 0x0000_0200],
  [0x7, 0, 1, 'ecx', 0x4041_5f5e, 0],
  [0x7, 0, 1, 'edx', 0x0000_011c, 0],
  ...XSAVE_UP_TO_AVX,
];

// T2's extended leaves: no PREFETCHW and MONITORX (0x80000001 ECX bits 8, 29), no 1 GiB
// pages (EDX bit 26), no WBNOINVD (0x80000008 EBX bit 9).
const T2_EXTENDED: readonly Row[] = [
  [0x8000_0001, 0, 0, 'ecx', 0x2000_0100, 0],
  [0x8000_0001, 0, 0, 'edx', 0x0400_0000, 0],
  [0x8000_0008, 0, 0, 'ebx', 0x0000_0200, 0],
];

const TEMPLATES: Readonly<Record<StaticTemplateName, StaticTemplate>> = {
  // C3: an Ivy Bridge Xeon (family 6, model 0x3e): none of leaf 7's extensions from AVX2 on,
  // no XSAVE state beyond AVX.
  C3: {
    name: 'C3',
    vendor: VENDOR_INTEL,
    models: [SKYLAKE, CASCADE_LAKE, ICE_LAKE],
    cpuid: rows([
      [0x1, 0, 0, 'eax', 0x0fff_3fff, 0x0003_06e4],
      [0x1, 0, 0, 'ecx', 0x0040_dd3c, 0],
      [0x1, 0, 0, 'edx', 0xa864_1080, 0x0000_1080],
      [0x7, 0, 1, 'ebx', 0xffaf_dd3c, 0],
      [0x7, 0, 1, 'ecx', 0x4041_481e, 0],
      [0x7, 0, 1, 'edx', 0x0000_000c, 0],
      ...XSAVE_UP_TO_AVX,
      [0x8000_0001, 0, 0, 'ecx', 0x0000_0120, 0],
      [0x8000_0001, 0, 0, 'edx', 0x0400_0000, 0],
    ]),
    msrs: [],
  },
  T2: {
    name: 'T2',
    vendor: VENDOR_INTEL,
    models: [SKYLAKE, CASCADE_LAKE, ICE_LAKE],
    cpuid: rows([...T2_COMMON, ...T2_EXTENDED]),
    msrs: [],
  },
  // T2S: T2 plus one IA32_ARCH_CAPABILITIES for Skylake and Cascade Lake hosts alike (the
  // most vulnerable of the two), so a guest can move between them safely.
  T2S: {
    name: 'T2S',
    vendor: VENDOR_INTEL,
    models: [SKYLAKE, CASCADE_LAKE],
    cpuid: rows([...T2_COMMON, ...T2_EXTENDED]),
    msrs: [{ index: MSR_IA32_ARCH_CAPABILITIES, mask: 0xffff_ffff_ffff_ffffn, value: 0x0c0a_0c4cn }],
  },
  // T2CL: T2 for Cascade Lake and Ice Lake; the mitigation bits of IA32_ARCH_CAPABILITIES
  // pass through, the control and reserved ones are cleared.
  T2CL: {
    name: 'T2CL',
    vendor: VENDOR_INTEL,
    models: [CASCADE_LAKE, ICE_LAKE],
    cpuid: rows([
      ...T2_COMMON,
      [0x8000_0001, 0, 0, 'ecx', 0x2000_01c0, 0],
      [0x8000_0001, 0, 0, 'edx', 0x07c0_0000, 0],
      [0x8000_0008, 0, 0, 'ebx', 0x0000_0200, 0],
    ]),
    msrs: [{ index: MSR_IA32_ARCH_CAPABILITIES, mask: 0xffff_ffff_e2f5_1e00n, value: 0n }],
  },
  // T2A: the T2 feature set on AMD Milan hosts (AMD's own extended bits adjusted).
  T2A: {
    name: 'T2A',
    vendor: VENDOR_AMD,
    models: [MILAN],
    cpuid: rows([
      ...T2_COMMON,
      [0x8000_0001, 0, 0, 'ecx', 0x2000_01c4, 0],
      [0x8000_0001, 0, 0, 'edx', 0x0640_0000, 0],
      [0x8000_0008, 0, 0, 'ebx', 0x001c_0205, 0x001c_0004],
    ]),
    msrs: [],
  },
};

/** The vendor string of CPUID leaf 0 (EBX, EDX, ECX). */
export function cpuVendor(entries: readonly CpuidEntry[]): string {
  const leaf0 = entries.find((e) => e.function === 0);
  if (!leaf0) return '';
  const b = Buffer.alloc(12);
  b.writeUInt32LE(leaf0.ebx, 0);
  b.writeUInt32LE(leaf0.edx, 4);
  b.writeUInt32LE(leaf0.ecx, 8);
  return b.toString('latin1');
}

/**
 * The static template `name` for a host whose CPUID (KVM's supported table: its leaf 0 and
 * 1 are the host's) is `host`; an error with Firecracker's words where the vendor or the
 * processor model is not one the template was made for.
 */
export function staticTemplate(name: StaticTemplateName, host: readonly CpuidEntry[]): StaticTemplate {
  const t = TEMPLATES[name];
  const vendor = cpuVendor(host);
  if (vendor !== t.vendor)
    throw new KilnError(
      `Failed to get CPU template: CPU vendor mismatched between actual CPU and CPU template (${name} is for ${t.vendor}; this host is ${vendor || 'unknown'})`,
    );
  const eax = host.find((e) => e.function === 1)?.eax ?? 0;
  const model = cpuModelOf(eax);
  if (!t.models.some((m) => sameModel(m, model)))
    throw new KilnError(
      `Failed to get CPU template: The current CPU model is not permitted to apply the CPU template (${name}; this host's family/model/stepping is 0x${(eax & 0x0fff_3fff).toString(16)})`,
    );
  return t;
}

/**
 * Forces the modifiers' bits into the MSR values `current` (index → value read from the
 * vCPU): the values to write. An MSR that is not in `current` (KVM cannot read it) is an
 * error naming it, as in Firecracker.
 */
export function applyMsrModifiers(
  current: ReadonlyMap<number, bigint>,
  modifiers: readonly MsrModifier[],
): Map<number, bigint> {
  const out = new Map<number, bigint>();
  for (const m of modifiers) {
    const now = out.get(m.index) ?? current.get(m.index);
    if (now === undefined)
      throw new KilnError(`the CPU template sets MSR 0x${m.index.toString(16)}, which this host's KVM does not offer`);
    out.set(m.index, (now & ~m.mask) | (m.value & m.mask));
  }
  return out;
}
