// A custom CPU template survives GET /vm/config: whatever PUT /cpu-config accepts,
// exporting it and parsing that again gives the same configuration (fast-check).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { exportCpuConfig, parseCpuConfig } from '../../src/api/resources.js';
import type { VmConfig } from '../../src/config/vm-config.js';

const bits = (n: number) =>
  fc.array(fc.constantFrom('0', '1', 'x'), { minLength: n, maxLength: n }).map((b) => `0b${b.join('')}`);

const template = fc.record({
  cpuid_modifiers: fc.array(
    fc.record({
      leaf: fc.integer({ min: 0, max: 0xffff_ffff }),
      subleaf: fc.integer({ min: 0, max: 0xffff_ffff }),
      flags: fc.integer({ min: 0, max: 1 }),
      modifiers: fc.array(fc.record({ register: fc.constantFrom('eax', 'ebx', 'ecx', 'edx'), bitmap: bits(32) }), {
        minLength: 1,
        maxLength: 4,
      }),
    }),
    { maxLength: 5 },
  ),
  msr_modifiers: fc.array(fc.record({ addr: fc.integer({ min: 0, max: 0xffff_ffff }), bitmap: bits(64) }), {
    maxLength: 4,
  }),
});

const apply = (body: unknown) => {
  const input: Record<string, unknown> = {};
  parseCpuConfig(body)(input);
  return input;
};

test('a custom CPU template exported as cpu-config parses back to the same configuration', () => {
  fc.assert(
    fc.property(template, (body) => {
      const once = apply(body);
      const again = apply(exportCpuConfig(once as unknown as VmConfig));
      assert.deepEqual(again.cpuidModifiers, once.cpuidModifiers);
      assert.deepEqual(again.msrModifiers, once.msrModifiers);
    }),
    { numRuns: 300, seed: 15 },
  );
});
