// Firecracker's static CPU templates: their CPUID and MSR bits, and the processors they
// apply on; then, with KVM, the MSR modifiers reaching every vCPU.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { createLinuxVm } from '../../src/boot/linux.js';
import { parseVmConfig } from '../../src/config/vm-config.js';
import { supportedCpuid, type CpuidEntry } from '../../src/cpu/cpuid.js';
import { MSR_KERNEL_GS_BASE } from '../../src/cpu/setup.js';
import {
  applyMsrModifiers,
  cpuModelOf,
  cpuVendor,
  MSR_IA32_ARCH_CAPABILITIES,
  STATIC_TEMPLATE_NAMES,
  staticTemplate,
} from '../../src/cpu/static-templates.js';
import { applyCpuidModifiers } from '../../src/cpu/templates.js';
import { buildInitramfs, buildMinimalKernel } from '../../src/guestkit/build.js';
import { kvmSkip } from '../helpers.js';

/** A host's CPUID table: vendor in leaf 0, family/model/stepping in leaf 1's EAX, every feature bit on. */
function host(vendor: string, leaf1Eax: number): CpuidEntry[] {
  const v = Buffer.from(vendor, 'latin1');
  const all = 0xffff_ffff;
  const leaf = (fn: number, index: number, flags: number, regs: Partial<CpuidEntry> = {}): CpuidEntry => ({
    function: fn,
    index,
    flags,
    eax: all,
    ebx: all,
    ecx: all,
    edx: all,
    ...regs,
  });
  return [
    leaf(0, 0, 0, { eax: 0xd, ebx: v.readUInt32LE(0), edx: v.readUInt32LE(4), ecx: v.readUInt32LE(8) }),
    leaf(1, 0, 0, { eax: leaf1Eax }),
    leaf(7, 0, 1),
    leaf(0xd, 0, 1),
    leaf(0xd, 1, 1),
    leaf(0x8000_0001, 0, 0),
    leaf(0x8000_0008, 0, 0),
  ];
}

const SKYLAKE = host('GenuineIntel', 0x0005_0654);
const CASCADE_LAKE = host('GenuineIntel', 0x0005_0657);
const ICE_LAKE = host('GenuineIntel', 0x0006_06a6);
const MILAN = host('AuthenticAMD', 0x00a0_0f11);
const ZEN5 = host('AuthenticAMD', 0x00b0_0f20);

const reg = (t: CpuidEntry[], fn: number, index: number, r: 'eax' | 'ebx' | 'ecx' | 'edx') =>
  t.find((e) => e.function === fn && e.index === index)![r];
const bit = (value: number, n: number) => (value >>> n) & 1;

test('the vendor and family/model/stepping are read from CPUID leaves 0 and 1', () => {
  assert.equal(cpuVendor(SKYLAKE), 'GenuineIntel');
  assert.equal(cpuVendor(MILAN), 'AuthenticAMD');
  assert.deepEqual(cpuModelOf(0x0005_0654), { extendedFamily: 0, extendedModel: 5, family: 6, model: 5, stepping: 4 });
  assert.deepEqual(cpuModelOf(0x00a0_0f11), {
    extendedFamily: 0xa,
    extendedModel: 0,
    family: 0xf,
    model: 1,
    stepping: 1,
  });
});

test('each template applies only on the processors it was made for, as Firecracker checks', () => {
  const ok: Record<string, CpuidEntry[][]> = {
    C3: [SKYLAKE, CASCADE_LAKE, ICE_LAKE],
    T2: [SKYLAKE, CASCADE_LAKE, ICE_LAKE],
    T2S: [SKYLAKE, CASCADE_LAKE],
    T2CL: [CASCADE_LAKE, ICE_LAKE],
    T2A: [MILAN],
  };
  const hosts = [SKYLAKE, CASCADE_LAKE, ICE_LAKE, MILAN, ZEN5];
  for (const name of STATIC_TEMPLATE_NAMES) {
    for (const h of hosts) {
      if (ok[name]!.includes(h)) assert.equal(staticTemplate(name, h).name, name);
      else
        assert.throws(
          () => staticTemplate(name, h),
          cpuVendor(h) === (name === 'T2A' ? 'AuthenticAMD' : 'GenuineIntel')
            ? /^.*Failed to get CPU template: The current CPU model is not permitted to apply the CPU template \(/
            : /Failed to get CPU template: CPU vendor mismatched between actual CPU and CPU template/,
          `${name} on ${cpuVendor(h)} 0x${reg(h, 1, 0, 'eax').toString(16)}`,
        );
    }
  }
});

test("T2 makes a Skylake host's CPUID read as a Haswell Xeon without AVX-512, VMX or 1 GiB pages", () => {
  const out = applyCpuidModifiers(SKYLAKE, staticTemplate('T2', SKYLAKE).cpuid);
  const eax = reg(out, 1, 0, 'eax');
  assert.equal(eax, 0x0003_06f2, 'family 6, model 0x3f, stepping 2');
  assert.equal(bit(reg(out, 1, 0, 'ecx'), 5), 0, 'no VMX');
  assert.equal(bit(reg(out, 1, 0, 'ecx'), 28), 1, 'AVX kept');
  assert.equal(bit(reg(out, 1, 0, 'edx'), 12), 1, 'MTRR forced on');
  assert.equal(bit(reg(out, 7, 0, 'ebx'), 16), 0, 'no AVX512F');
  assert.equal(bit(reg(out, 7, 0, 'ebx'), 5), 1, 'AVX2 kept');
  assert.equal(bit(reg(out, 7, 0, 'ebx'), 9), 1, 'ERMS forced on');
  assert.equal(reg(out, 0xd, 0, 'eax') & 0x2e0, 0, 'no AVX-512 or PKRU XSAVE state');
  assert.equal(bit(reg(out, 0x8000_0001, 0, 'edx'), 26), 0, 'no 1 GiB pages');
  assert.equal(bit(reg(out, 0x8000_0008, 0, 'ebx'), 9), 0, 'no WBNOINVD');
  assert.equal(reg(SKYLAKE, 7, 0, 'ebx'), 0xffff_ffff, 'the host table is not changed');
});

test('C3 reads as an Ivy Bridge Xeon: none of AVX2, BMI or AVX-512', () => {
  const out = applyCpuidModifiers(ICE_LAKE, staticTemplate('C3', ICE_LAKE).cpuid);
  assert.equal(reg(out, 1, 0, 'eax') & 0x0fff_3fff, 0x0003_06e4);
  for (const n of [3, 5, 8, 16, 30, 31]) assert.equal(bit(reg(out, 7, 0, 'ebx'), n), 0, `leaf 7 EBX bit ${n}`);
  assert.equal(bit(reg(out, 1, 0, 'ecx'), 12), 0, 'no FMA');
});

test('T2A clears AMD extended bits and forces its own in 0x80000008 EBX', () => {
  const out = applyCpuidModifiers(MILAN, staticTemplate('T2A', MILAN).cpuid);
  const ebx = reg(out, 0x8000_0008, 0, 'ebx');
  assert.equal(ebx & 0x001c_0205, 0x001c_0004);
  assert.equal(bit(reg(out, 0x8000_0001, 0, 'ecx'), 2), 0, 'no SVM');
});

test('T2S and T2CL set IA32_ARCH_CAPABILITIES; an MSR KVM does not offer is an error', () => {
  const current = new Map([[MSR_IA32_ARCH_CAPABILITIES, 0xffff_ffff_ffff_ffffn]]);
  const t2s = applyMsrModifiers(current, staticTemplate('T2S', SKYLAKE).msrs);
  assert.equal(t2s.get(MSR_IA32_ARCH_CAPABILITIES), 0x0c0a_0c4cn, 'one value for Skylake and Cascade Lake');
  const t2cl = applyMsrModifiers(current, staticTemplate('T2CL', ICE_LAKE).msrs);
  // The mitigation bits pass through; control and reserved bits (9-12, 16, 18, 20-23, 25, 27-63) are cleared.
  assert.equal(t2cl.get(MSR_IA32_ARCH_CAPABILITIES), 0x1d0a_e1ffn);
  assert.equal(staticTemplate('T2', SKYLAKE).msrs.length, 0);
  assert.throws(
    () => applyMsrModifiers(new Map(), staticTemplate('T2S', SKYLAKE).msrs),
    /sets MSR 0x10a, which this host's KVM does not offer/,
  );
  // Two modifiers of one MSR compose.
  const both = applyMsrModifiers(new Map([[0x10, 0n]]), [
    { index: 0x10, mask: 0xf0n, value: 0x30n },
    { index: 0x10, mask: 0x0fn, value: 0x05n },
  ]);
  assert.equal(both.get(0x10), 0x35n);
});

describe('CPU templates on a KVM vCPU', { skip: kvmSkip, timeout: 30 * 60_000 }, () => {
  test("a custom template's MSR bits reach every vCPU; a static template for another processor fails the build", async () => {
    const log = (line: string) => process.stderr.write(`# guest kit: ${line}\n`);
    const kernel = await buildMinimalKernel(log);
    const initrd = await buildInitramfs(log);
    const base = { kernel: kernel.vmlinux, initrd: initrd.path, cpus: 2, memoryMiB: 64 };
    const lv = createLinuxVm(
      parseVmConfig({ ...base, msrModifiers: [{ index: MSR_KERNEL_GS_BASE, mask: '0xffff', value: '0x1234' }] }),
      { serialOutFd: -1 },
    );
    try {
      for (const vcpu of lv.vm.vcpus) assert.equal(vcpu.getMsrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE), 0x1234n);
      // The host's own CPUID decides which static template does not fit it.
      const hostTable = supportedCpuid(lv.vm.kvmSystem);
      const misfit = cpuVendor(hostTable) === 'AuthenticAMD' ? 'C3' : 'T2A';
      assert.throws(
        () => createLinuxVm(parseVmConfig({ ...base, staticCpuTemplate: misfit }), { serialOutFd: -1 }),
        /Failed to get CPU template: CPU vendor mismatched/,
      );
    } finally {
      await lv.vm.destroy();
    }
  });
});
