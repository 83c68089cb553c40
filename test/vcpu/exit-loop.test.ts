// The vCPU exit loop allocates nothing per exit: a run with 300x the exits triggers no
// more young-generation collections (V8 scavenges) than a short one.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { kvmSkip } from '../helpers.js';

const probe = fileURLToPath(new URL('./gc-probe.js', import.meta.url));

function scavenges(exits: number): number {
  const out = execFileSync(process.execPath, ['--trace-gc', probe, String(exits)], { encoding: 'utf8' });
  assert.match(out, new RegExp(`exits=${exits + 1}\\b`));
  return out.split('\n').filter((line) => line.includes('Scavenge')).length;
}

test('the exit loop allocates nothing per exit', { skip: kvmSkip }, () => {
  const short = scavenges(1_000);
  const long = scavenges(300_000);
  // 16 bytes per exit would be ~4.8 MB here: several scavenges. One of slack for timing.
  assert.ok(long <= short + 1, `${long} scavenges for 300000 exits vs ${short} for 1000`);
});
