// vCPU exits that end a guest (HLT, triple fault), several vCPUs at once, and the
// host's control of a running guest: pause, resume and stop while it spins with no exits.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadProgram } from '../../src/guest/kit.js';
import { KIT_CODE, KIT_DATA } from '../../src/layout.js';
import { createTestVm, kvmSkip, runProgram } from '../helpers.js';

/** Each vCPU increments its own 64-bit counter at KIT_DATA + 64 * index, forever. */
const spinSource = `
    mov %rdi, %rbx
    shl $6, %rbx
    add $KIT_DATA, %rbx
  1:
    incq (%rbx)
    jmp 1b
`;
const counter = (t: ReturnType<typeof createTestVm>, vcpu: number) => t.vm.memory.readU64(KIT_DATA + 64 * vcpu);

/** Waits (bounded) until `check` holds; fails the test with `what` if it never does. */
async function until(check: () => boolean, what: string, limitMs = 10_000): Promise<void> {
  const end = Date.now() + limitMs;
  while (!check()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

describe('guest exits', { skip: kvmSkip }, () => {
  test('HLT with no interrupt controller ends the vCPU and reports its registers', async () => {
    const result = await runProgram({ mode: 'long64', cpl: 0, source: 'mov $0x1234, %rax\n hlt' });
    assert.equal(result.reason, 'hlt');
    const regs = result.vcpus[0]!.regs!;
    assert.equal(regs.rax, 0x1234n);
    // RIP points past the 7-byte mov and the 1-byte hlt.
    assert.equal(regs.rip, BigInt(KIT_CODE + 8));
  });

  test('a triple fault is reported as a shutdown with the faulting state', async () => {
    // No IDT: #UD cannot be delivered, #DF cannot either, and the CPU shuts down.
    const result = await runProgram({ mode: 'long64', cpl: 0, source: 'mov $0x77, %rcx\n ud2' });
    assert.equal(result.reason, 'shutdown');
    assert.match(result.detail, /triple-faulted/);
    assert.equal(result.vcpus[0]!.regs!.rcx, 0x77n);
    assert.equal(result.exitCode, null);
  });
});

describe('running guests', { skip: kvmSkip }, () => {
  test('two vCPUs run at the same time, each on its own thread', async () => {
    const t = createTestVm({ vcpus: 2 });
    try {
      loadProgram(t.vm, { mode: 'long64', cpl: 3, source: spinSource });
      await t.vm.start();
      const tids = t.vm.vcpuThreadIds;
      assert.equal(new Set(tids).size, 2);
      for (const [i, tid] of tids.entries()) {
        assert.equal(readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim(), `fc_vcpu ${i}`);
      }
      await until(() => counter(t, 0) > 0n && counter(t, 1) > 0n, 'both vCPUs to count');
      // Both counters advance across the same interval.
      const before = [counter(t, 0), counter(t, 1)];
      await sleep(50);
      assert.ok(counter(t, 0) > before[0]! && counter(t, 1) > before[1]!, 'both vCPUs advanced together');
      const result = await t.vm.stop();
      assert.deepEqual(
        result.vcpus.map((v) => v.reason),
        ['stopped', 'stopped'],
      );
    } finally {
      await t.vm.destroy();
    }
  });

  for (const cpl of [3, 0] as const) {
    test(`pause, resume and stop a vCPU spinning at CPL${cpl} without exits`, async () => {
      const t = createTestVm();
      try {
        loadProgram(t.vm, { mode: 'long64', cpl, source: spinSource });
        await t.vm.start();
        await until(() => counter(t, 0) > 0n, 'the guest to start counting');
        await t.vm.pause();
        const paused = counter(t, 0);
        await sleep(100);
        assert.equal(counter(t, 0), paused, 'no progress while paused');
        // A paused vCPU is outside KVM_RUN: the host can read its registers.
        const rip = t.vm.vcpus[0]!.getRegs().rip as bigint;
        assert.ok(rip >= BigInt(KIT_CODE) && rip < BigInt(KIT_CODE + 32), `rip 0x${rip.toString(16)} inside the loop`);
        t.vm.resume();
        await until(() => counter(t, 0) > paused, 'progress after resume');
        const result = await t.vm.stop();
        assert.equal(result.reason, 'stopped');
        assert.equal(result.vcpus[0]!.reason, 'stopped');
      } finally {
        await t.vm.destroy();
      }
    });
  }

  test('a guest exit on one vCPU stops the others', async () => {
    const source = `
      test %rdi, %rdi
      jnz 2f
      mov $PORT_DEBUG_EXIT, %dx
      mov $9, %al
    1: cmpq $1000, KIT_DATA + 64
      jb 1b
      out %al, %dx
    2: incq KIT_DATA + 64
      jmp 2b
    `;
    const result = await runProgram({ mode: 'long64', cpl: 0, source }, undefined, undefined, { vcpus: 2 });
    assert.equal(result.reason, 'guest-exit');
    assert.equal(result.exitCode, 9);
    assert.deepEqual(
      result.vcpus.map((v) => v.reason),
      ['guest-exit', 'stopped'],
    );
  });
});

describe('teardown', { skip: kvmSkip }, () => {
  test('destroying a VM closes every file descriptor and unmaps every mapping', async () => {
    // Warm up once so that lazily opened descriptors (koffi, worker support) exist before the snapshot.
    await runProgram({ mode: 'long64', cpl: 0, source: 'hlt' });
    const fds = () => readdirSync('/proc/self/fd').sort();
    const before = fds();
    const t = createTestVm({ vcpus: 2 });
    const regions = t.vm.memory.regions.map((r) => r.hostAddr.toString(16));
    loadProgram(t.vm, { mode: 'long64', cpl: 3, source: spinSource });
    await t.vm.start();
    await until(() => counter(t, 1) > 0n, 'the guest to run');
    const during = readFileSync('/proc/self/maps', 'utf8');
    assert.match(during, /kvm-vcpu/, 'kvm_run is mapped while running');
    for (const addr of regions) assert.ok(during.includes(`${addr}-`), `guest RAM at ${addr} is mapped`);
    assert.ok(fds().length > before.length);
    await t.vm.destroy();
    await until(() => fds().length === before.length, 'descriptors to close');
    assert.deepEqual(fds(), before);
    const after = readFileSync('/proc/self/maps', 'utf8');
    assert.doesNotMatch(after, /kvm-vcpu|anon_inode:kvm/);
    for (const addr of regions) assert.ok(!after.includes(`${addr}-`), `guest RAM at ${addr} is unmapped`);
  });
});
