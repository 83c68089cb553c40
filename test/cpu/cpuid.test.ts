import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CPUID1_ECX_HYPERVISOR, vcpuCpuid, type CpuidEntry } from '../../src/cpu/cpuid.js';
import {
  applyCpuidModifiers,
  applyTemplate,
  cpuTemplate,
  CPU_TEMPLATES,
  FEATURES,
  KVM_CPUID_FEATURES,
} from '../../src/cpu/templates.js';

const base: CpuidEntry[] = [
  { function: 0, index: 0, flags: 0, eax: 0xd, ebx: 0x68747541, ecx: 0x444d4163, edx: 0x69746e65 },
  {
    function: 1,
    index: 0,
    flags: 0,
    eax: 0xa10f11,
    ebx: 0x00020800,
    ecx: 0x81a03203 | (1 << 26) | (1 << 23),
    edx: 0x078bfbff,
  },
  { function: 7, index: 0, flags: 1, eax: 0, ebx: (1 << 7) | (1 << 20) | (1 << 5), ecx: 0, edx: 0 },
  { function: 0xb, index: 0, flags: 1, eax: 0, ebx: 0, ecx: 0, edx: 0 },
  {
    function: KVM_CPUID_FEATURES,
    index: 0,
    flags: 0,
    eax: (1 << 3) | (1 << 7) | (1 << 11) | (1 << 13),
    ebx: 0,
    ecx: 0,
    edx: 0,
  },
];

test('each vCPU sees its own APIC id, the vCPU count and the hypervisor bit', () => {
  for (const vcpu of [0, 1, 3]) {
    const t = vcpuCpuid(base, vcpu, 4);
    const leaf1 = t.find((e) => e.function === 1)!;
    assert.equal(leaf1.ebx >>> 24, vcpu, 'initial APIC id');
    assert.equal((leaf1.ebx >>> 16) & 0xff, 4, 'logical processor count');
    assert.ok(leaf1.ecx & CPUID1_ECX_HYPERVISOR);
    const b0 = t.find((e) => e.function === 0xb && e.index === 0)!;
    const b1 = t.find((e) => e.function === 0xb && e.index === 1)!;
    assert.equal(b0.edx, vcpu, 'x2APIC id');
    assert.equal(b1.edx, vcpu);
    assert.equal(b1.ebx, 4, 'processors at the core level');
    assert.equal(b1.eax, 2, 'bits to shift for 4 cores');
    assert.equal((b1.ecx >> 8) & 0xff, 2, 'core level type');
  }
  assert.equal(base[1]!.ebx >>> 24, 0, 'the base table is not changed');
});

test('templates clear their CPUID bits and name the kernel flags that hide the same features', () => {
  const pvm = applyTemplate(base, cpuTemplate('pvm'));
  const leaf1 = pvm.find((e) => e.function === 1)!;
  const leaf7 = pvm.find((e) => e.function === 7)!;
  const kvm = pvm.find((e) => e.function === KVM_CPUID_FEATURES)!;
  assert.equal(leaf1.ecx & (1 << FEATURES.xsave.bit), 0);
  assert.equal(leaf1.ecx & (1 << FEATURES.popcnt.bit), 0);
  assert.equal(leaf7.ebx & ((1 << 7) | (1 << 20)), 0, 'SMEP and SMAP');
  assert.equal(leaf7.ebx & (1 << 5), 1 << 5, 'AVX2 kept by pvm');
  assert.equal(kvm.eax, 1 << 3, 'hypercall-based PV features hidden, the rest kept');
  assert.deepEqual(cpuTemplate('pvm').cmdline, ['noxsave', 'clearcpuid=avx,popcnt,cx16,smap,smep']);
  assert.equal(leaf1.ecx & (1 << FEATURES.cx16.bit), 0);
  assert.deepEqual(cpuTemplate('host').cmdline, []);
  assert.deepEqual(applyTemplate(base, cpuTemplate('host')), base);
  const baseline = applyTemplate(base, CPU_TEMPLATES.baseline!);
  assert.equal(baseline.find((e) => e.function === 7)!.ebx & (1 << 5), 0, 'AVX2 hidden by baseline');
  assert.throws(() => cpuTemplate('T9'), /unknown CPU template 'T9' \(known: host, pvm, baseline\)/);
});

test('with SMT on, CPUID shows two threads per core: leaf 0xB level 0 has one bit and two threads, caches shared by a core', () => {
  const withCaches: CpuidEntry[] = [
    ...base,
    { function: 4, index: 0, flags: 1, eax: (1 << 5) | 1, ebx: 0, ecx: 0, edx: 0 },
    { function: 4, index: 1, flags: 1, eax: (3 << 5) | 3, ebx: 0, ecx: 0, edx: 0 },
  ];
  for (const [smt, threads, bits] of [
    [2, 2, 1],
    [1, 1, 0],
  ] as const) {
    const t = vcpuCpuid(withCaches, 3, 4, smt);
    const b0 = t.find((e) => e.function === 0xb && e.index === 0)!;
    const b1 = t.find((e) => e.function === 0xb && e.index === 1)!;
    assert.deepEqual([b0.eax, b0.ebx, (b0.ecx >> 8) & 0xff], [bits, threads, 1], 'SMT level');
    assert.deepEqual([b1.eax, b1.ebx, (b1.ecx >> 8) & 0xff], [2, 4, 2], 'core level: 4 logical processors');
    const l1 = t.find((e) => e.function === 4 && e.index === 0)!;
    const l3 = t.find((e) => e.function === 4 && e.index === 1)!;
    assert.equal(((l1.eax >>> 14) & 0xfff) + 1, threads, 'L1 shared by a core');
    assert.equal(((l3.eax >>> 14) & 0xfff) + 1, 4, 'L3 shared by the socket');
    assert.equal((l1.eax >>> 26) + 1, 4 / threads, 'cores per socket');
    assert.equal(l1.eax & 0x3ff, (1 << 5) | 1, 'the cache type and level are kept');
  }
  // One vCPU has no sibling, whatever SMT says.
  const one = vcpuCpuid(base, 0, 1, 2).find((e) => e.function === 0xb && e.index === 0)!;
  assert.deepEqual([one.eax, one.ebx], [0, 1]);
});

test("a custom CPU template's modifiers force their bits and leave the rest; a leaf KVM lacks is refused", () => {
  const table: CpuidEntry[] = [
    { function: 1, index: 0, flags: 0, eax: 0x000806f8, ebx: 0, ecx: 0xfffa3203, edx: 0x0f8bfbff },
    { function: 7, index: 0, flags: 1, eax: 0, ebx: 0xf1bf07ab, ecx: 0, edx: 0 },
    { function: 7, index: 1, flags: 1, eax: 0x1c30, ebx: 0, ecx: 0, edx: 0 },
  ];
  const out = applyCpuidModifiers(table, [
    // Leaf 1 ECX: bit 31 (hypervisor) forced on, bit 23 (POPCNT) off, the rest as they were.
    { leaf: 1, subleaf: 0, flags: 0, register: 'ecx', mask: 0x8080_0000, value: 0x8000_0000 },
    // Leaf 7 subleaf 1 only (significant index): EAX cleared.
    { leaf: 7, subleaf: 1, flags: 1, register: 'eax', mask: 0xffff_ffff, value: 0 },
  ]);
  assert.equal(out[0]!.ecx, ((0xfffa3203 | 0x8000_0000) & ~0x0080_0000) >>> 0);
  assert.equal(out[0]!.edx, 0x0f8bfbff, 'another register untouched');
  assert.equal(out[1]!.ebx, 0xf1bf07ab, 'subleaf 0 untouched');
  assert.equal(out[2]!.eax, 0);
  assert.equal(table[2]!.eax, 0x1c30, 'the input table is not changed');
  assert.throws(
    () => applyCpuidModifiers(table, [{ leaf: 0x8000_0008, subleaf: 0, flags: 0, register: 'eax', mask: 1, value: 1 }]),
    /CPUID leaf 0x80000008, which this host's KVM does not offer/,
  );
});
