// CPU templates: named sets of CPUID changes (and, for software KVM, the kernel
// command-line flags that hide the same features from Linux when KVM_SET_CPUID2 cannot).
import { KilnError } from '../errors.js';
import type { CpuidEntry, CpuidRegister } from './cpuid.js';

export interface FeatureBit {
  /** The name Linux's clearcpuid= accepts, e.g. "popcnt". */
  readonly name: string;
  readonly leaf: number;
  readonly index: number;
  readonly register: CpuidRegister;
  readonly bit: number;
  /** A bit of KVM's own leaves (0x4000_0000+): KVM_SET_CPUID2 hides it even on software KVM. */
  readonly kvmOwned?: boolean;
}

/** KVM's paravirtual feature leaf (Documentation/virt/kvm/x86/cpuid.rst). */
export const KVM_CPUID_FEATURES = 0x4000_0001;

// Feature bits Kiln may hide (Intel SDM vol. 2, CPUID leaves 1 and 7).
export const FEATURES = {
  xsave: { name: 'xsave', leaf: 1, index: 0, register: 'ecx', bit: 26 },
  osxsave: { name: 'osxsave', leaf: 1, index: 0, register: 'ecx', bit: 27 },
  avx: { name: 'avx', leaf: 1, index: 0, register: 'ecx', bit: 28 },
  popcnt: { name: 'popcnt', leaf: 1, index: 0, register: 'ecx', bit: 23 },
  cx16: { name: 'cx16', leaf: 1, index: 0, register: 'ecx', bit: 13 },
  smep: { name: 'smep', leaf: 7, index: 0, register: 'ebx', bit: 7 },
  smap: { name: 'smap', leaf: 7, index: 0, register: 'ebx', bit: 20 },
  avx2: { name: 'avx2', leaf: 7, index: 0, register: 'ebx', bit: 5 },
  avx512f: { name: 'avx512f', leaf: 7, index: 0, register: 'ebx', bit: 16 },
  // KVM paravirtual features that work through hypercalls (which never complete on kvm_pvm).
  kvmPvUnhalt: { name: 'kvm-pv-unhalt', leaf: KVM_CPUID_FEATURES, index: 0, register: 'eax', bit: 7, kvmOwned: true },
  kvmPvSendIpi: {
    name: 'kvm-pv-send-ipi',
    leaf: KVM_CPUID_FEATURES,
    index: 0,
    register: 'eax',
    bit: 11,
    kvmOwned: true,
  },
  kvmPvSchedYield: {
    name: 'kvm-pv-sched-yield',
    leaf: KVM_CPUID_FEATURES,
    index: 0,
    register: 'eax',
    bit: 13,
    kvmOwned: true,
  },
} as const satisfies Record<string, FeatureBit>;

export interface CpuTemplate {
  readonly name: string;
  readonly description: string;
  /** Features cleared from CPUID. */
  readonly hide: readonly FeatureBit[];
  /** Kernel command-line flags that hide the same features where CPUID changes are ignored. */
  readonly cmdline: readonly string[];
}

const hideFlags = (hide: readonly FeatureBit[]): string[] => {
  const flags: string[] = [];
  if (hide.some((f) => f.name === 'xsave')) flags.push('noxsave');
  const rest = hide.filter((f) => !f.kvmOwned && f.name !== 'xsave' && f.name !== 'osxsave').map((f) => f.name);
  if (rest.length) flags.push(`clearcpuid=${rest.join(',')}`);
  return flags;
};

function template(name: string, description: string, hide: FeatureBit[]): CpuTemplate {
  return { name, description, hide, cmdline: hideFlags(hide) };
}

export const CPU_TEMPLATES: Readonly<Record<string, CpuTemplate>> = {
  host: template('host', 'everything KVM supports, unchanged', []),
  /**
   * What Linux needs hidden to boot on kvm_pvm: XSAVE, POPCNT, SMAP, SMEP (MACHINE.md),
   * CMPXCHG16B (SLUB's first `lock cmpxchg16b` is an emulation failure there), and KVM's
   * hypercall-based PV features (measured: PV send-IPI hangs SMP bring-up).
   */
  pvm: template('pvm', 'hides XSAVE, POPCNT, SMAP, SMEP, CX16 and hypercall-based KVM PV features (software KVM)', [
    FEATURES.xsave,
    FEATURES.osxsave,
    FEATURES.avx,
    FEATURES.popcnt,
    FEATURES.cx16,
    FEATURES.smap,
    FEATURES.smep,
    FEATURES.kvmPvUnhalt,
    FEATURES.kvmPvSendIpi,
    FEATURES.kvmPvSchedYield,
  ]),
  /** A conservative baseline for migration between unlike hosts. */
  baseline: template('baseline', 'hides AVX and later vector extensions, XSAVE and SMAP/SMEP', [
    FEATURES.xsave,
    FEATURES.osxsave,
    FEATURES.avx,
    FEATURES.avx2,
    FEATURES.avx512f,
    FEATURES.smap,
    FEATURES.smep,
  ]),
};

export function cpuTemplate(name: string): CpuTemplate {
  const t = CPU_TEMPLATES[name];
  if (!t) throw new KilnError(`unknown CPU template '${name}' (known: ${Object.keys(CPU_TEMPLATES).join(', ')})`);
  return t;
}

/** Applies a template's CPUID changes to a table (in place is avoided: returns a copy). */
export function applyTemplate(entries: readonly CpuidEntry[], t: CpuTemplate): CpuidEntry[] {
  const out = entries.map((e) => ({ ...e }));
  for (const f of t.hide) {
    for (const e of out)
      if (e.function === f.leaf && e.index === f.index) e[f.register] = (e[f.register] & ~(1 << f.bit)) >>> 0;
  }
  return out;
}

/** One register's forced bits (VmConfig's cpuidModifiers, from PUT /cpu-config). */
export interface CpuidModifier {
  readonly leaf: number;
  readonly subleaf: number;
  /** 1: the subleaf must match (KVM_CPUID_FLAG_SIGNIFCANT_INDEX); 0: every entry of the leaf. */
  readonly flags: number;
  readonly register: CpuidRegister;
  readonly mask: number;
  readonly value: number;
}

const hex = (n: number) => `0x${n.toString(16)}`;

/**
 * Forces the modifiers' bits in a CPUID table (a copy), as Firecracker's custom templates
 * do; a leaf (or leaf and subleaf) the table lacks is an error: the bits would not reach
 * the guest.
 */
export function applyCpuidModifiers(entries: readonly CpuidEntry[], modifiers: readonly CpuidModifier[]): CpuidEntry[] {
  const out = entries.map((e) => ({ ...e }));
  for (const m of modifiers) {
    const matches = out.filter((e) => e.function === m.leaf && (!(m.flags & 1) || e.index === m.subleaf));
    if (matches.length === 0)
      throw new KilnError(
        `the CPU template changes CPUID leaf ${hex(m.leaf)}${m.flags & 1 ? ` subleaf ${hex(m.subleaf)}` : ''}, which this host's KVM does not offer`,
      );
    for (const e of matches) e[m.register] = ((e[m.register] & ~m.mask) | (m.value & m.mask)) >>> 0;
  }
  return out;
}
