// An I/O thread that dies under a running VM fails the VM visibly (its virtio devices
// could never answer again), instead of leaving the guest hanging without a word.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadProgram } from '../../src/guest/kit.js';
import { kvmSkip } from '../helpers.js';
import { virtioTestVm } from './harness.js';

test('the I/O thread dies: the VM stops with an error that says so', { skip: kvmSkip }, async () => {
  const lines: string[] = [];
  const t = virtioTestVm([{ kind: 'rng', options: {} }], undefined, (l) => lines.push(l));
  try {
    loadProgram(t.vm, { mode: 'long64', cpl: 3, source: '1: pause\n jmp 1b' });
    await t.vm.start();
    await t.vm.crashIoThread();
    const result = await Promise.race([t.vm.wait(), sleep(60_000, null, { ref: false })]);
    assert.ok(result !== null, 'the VM ended');
    assert.equal(result.reason, 'error');
    assert.match(result.detail, /the I\/O thread died/);
    assert.ok(
      lines.some((l) => /the I\/O thread died .*stopping the VM/.test(l)),
      lines.join('\n'),
    );
  } finally {
    await t.vm.destroy();
  }
});
