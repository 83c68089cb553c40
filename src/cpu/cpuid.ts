// CPUID for each vCPU: KVM_GET_SUPPORTED_CPUID, adjusted per vCPU (APIC ids, topology,
// the hypervisor bit) and by the VM's CPU template, then set with KVM_SET_CPUID2.
import { KilnError } from '../errors.js';
import { KVM } from '../kvm/ioctl.js';
import type { KvmSystem, VcpuFd } from '../kvm/kvm.js';
import { ioctlBuf } from '../kvm/kvm.js';
import * as libc from '../kvm/libc.js';
import { dataView } from '../kvm/struct.js';
import { kvm_cpuid2, kvm_cpuid_entry2 } from '../kvm/structs.js';

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export type CpuidRegister = 'eax' | 'ebx' | 'ecx' | 'edx';

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;
const E2BIG = 7;

/** KVM_GET_SUPPORTED_CPUID, growing the buffer until KVM stops saying E2BIG. */
/** KVM_GET_SUPPORTED_CPUID's answer: the host's KVM gives the same one all process long. */
let supportedCache: readonly CpuidEntry[] | null = null;

/** What this host's KVM can present in CPUID (a fresh copy each call; asked of KVM once). */
export function supportedCpuid(kvm: KvmSystem): CpuidEntry[] {
  supportedCache ??= querySupportedCpuid(kvm);
  return supportedCache.map((e) => ({ ...e }));
}

function querySupportedCpuid(kvm: KvmSystem): CpuidEntry[] {
  for (let capacity = 128; capacity <= 4096; capacity *= 2) {
    const buf = kvm_cpuid2.alloc(capacity);
    const dv = dataView(buf);
    kvm_cpuid2.encode(dv, 0, { nent: capacity });
    if (libc.ioctlPtr(kvm.fd, KVM.GET_SUPPORTED_CPUID, buf) < 0) {
      if (libc.errno() === E2BIG) continue;
      ioctlBuf(kvm.fd, 'GET_SUPPORTED_CPUID', buf); // throws the typed error
    }
    const n = dv.getUint32(0, true);
    return Array.from(
      { length: n },
      (_, i) => kvm_cpuid_entry2.decode(dv, kvm_cpuid2.flexOffset + i * kvm_cpuid_entry2.size) as unknown as CpuidEntry,
    );
  }
  throw new KilnError('KVM_GET_SUPPORTED_CPUID reports more than 4096 entries');
}

export function setCpuid(vcpu: VcpuFd, entries: readonly CpuidEntry[]): void {
  const buf = kvm_cpuid2.alloc(entries.length);
  const dv = dataView(buf);
  kvm_cpuid2.encode(dv, 0, { nent: entries.length });
  entries.forEach((e, i) => kvm_cpuid_entry2.encode(dv, kvm_cpuid2.flexOffset + i * kvm_cpuid_entry2.size, { ...e }));
  ioctlBuf(vcpu.fd, 'SET_CPUID2', buf);
}

export function findLeaf(entries: readonly CpuidEntry[], fn: number, index = 0): CpuidEntry | undefined {
  return entries.find((e) => e.function === fn && (!(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || e.index === index));
}

// Leaf 1 and 0xB fields (Intel SDM vol. 2, CPUID).
export const CPUID1_ECX_HYPERVISOR = 1 << 31;
export const CPUID1_EDX_HTT = 1 << 28;
const LEAF_B_LEVEL_SMT = 1;
const LEAF_B_LEVEL_CORE = 2;

/**
 * The CPUID table one vCPU sees: one socket of `vcpuCount` logical processors, each core
 * with `threadsPerCore` threads (2 with SMT on, else 1; APIC id = vCPU index, so vCPUs
 * 2k and 2k+1 are one core's threads), and the hypervisor bit set.
 */
export function vcpuCpuid(
  base: readonly CpuidEntry[],
  vcpu: number,
  vcpuCount: number,
  threadsPerCore: 1 | 2 = 1,
): CpuidEntry[] {
  const out = base.map((e) => ({ ...e }));
  const threads = vcpuCount > 1 ? threadsPerCore : 1;
  const smtBits = threads === 2 ? 1 : 0;
  const coreBits = Math.ceil(Math.log2(Math.max(1, vcpuCount)));
  for (const e of out) {
    if (e.function === 1) {
      e.ebx = ((vcpu & 0xff) << 24) | ((Math.min(vcpuCount, 255) & 0xff) << 16) | (e.ebx & 0xffff);
      e.ecx = (e.ecx | CPUID1_ECX_HYPERVISOR) >>> 0;
      e.edx = (vcpuCount > 1 ? e.edx | CPUID1_EDX_HTT : e.edx & ~CPUID1_EDX_HTT) >>> 0;
    } else if (e.function === 0xb || e.function === 0x1f) {
      // Extended topology: level 0 = SMT (threads per core), level 1 = cores (all logical processors).
      e.edx = vcpu;
      if (e.index === 0) {
        e.eax = smtBits;
        e.ebx = threads;
        e.ecx = (LEAF_B_LEVEL_SMT << 8) | 0;
      } else if (e.index === 1) {
        e.eax = coreBits;
        e.ebx = vcpuCount;
        e.ecx = (LEAF_B_LEVEL_CORE << 8) | 1;
      } else {
        e.eax = 0;
        e.ebx = 0;
        e.ecx = e.index;
      }
    } else if (e.function === 4 && (e.eax & 0x1f) !== 0) {
      // Deterministic cache parameters: L1 and L2 are a core's (its threads share them),
      // the last level the socket's; bits 31:26 are the cores per socket, less one.
      const level = (e.eax >>> 5) & 7;
      const sharing = level >= 3 ? vcpuCount : threads;
      const cores = Math.max(1, Math.ceil(vcpuCount / threads));
      e.eax = ((e.eax & 0x3fff) | (((sharing - 1) & 0xfff) << 14) | (((cores - 1) & 0x3f) << 26)) >>> 0;
    }
  }
  // Leaves 0xB needs its sub-leaves listed explicitly for KVM to report them.
  if (!out.some((e) => e.function === 0xb && e.index === 1) && findLeaf(out, 0xb)) {
    out.push({
      function: 0xb,
      index: 1,
      flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
      eax: coreBits,
      ebx: vcpuCount,
      ecx: (LEAF_B_LEVEL_CORE << 8) | 1,
      edx: vcpu,
    });
  }
  return out;
}
