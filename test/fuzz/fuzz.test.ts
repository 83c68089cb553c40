// CI's slice of the fuzzer: every target, a few hundred seeded inputs each, with the same
// time and memory oracles as `npm run fuzz` (generous bounds: they catch hangs and leaks).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { allTargets, fuzzTarget } from './targets.js';

const SEED = 20261130;

for (const target of allTargets()) {
  test(`fuzz: ${target.name} (seeded slice)`, async () => {
    const r = await fuzzTarget(target, { runs: 300, seed: SEED, timeBoundMs: 5_000, memoryBoundMiB: 128 });
    assert.equal(r.finding, null, r.finding ?? '');
  });
}
