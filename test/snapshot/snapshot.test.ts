// Snapshots of a running machine: a ring-3 guest in the middle of a long computation
// (integer state in general registers, floating-point state on the x87 stack, progress
// in memory) is paused and saved, then restored in a fresh process, where it finishes
// with exactly the results the original reaches and a plain computation predicts. Bad
// state and memory files are refused with the reason before anything is restored.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { loadProgram } from '../../src/guest/kit.js';
import * as layout from '../../src/layout.js';
import { writeFileAtomically, writeAll } from '../../src/atomic-file.js';
import { decodeStateFile, encodeStateFile, SNAPSHOT_VERSION } from '../../src/snapshot/format.js';
import { openMemoryFile, writeMemoryFile } from '../../src/snapshot/memory-file.js';
import { createTestVm, kvmSkip, tempDir } from '../helpers.js';

const CHILD = fileURLToPath(new URL('./restore-child.js', import.meta.url));
const ITERATIONS = 1 << 28;

const GUEST = `
#include "kit.h"
static const u64 three = 3;
void kit_main(void) {
  u32 h = 1;
  /* The x87 stack: st(0) = 1, st(1) = 3; each iteration adds st(1) to st(0). */
  __asm__ volatile("fninit; fildll %0; fld1" : : "m"(three));
  for (u64 i = 0; i < ITERATIONS; i++) {
    h = h * 31 + (u32)i;
    __asm__ volatile("fadd %st(1), %st");
    if ((i & 0xffff) == 0) RESULT(0) = i;
  }
  RESULT(1) = h;
  u64 f;
  __asm__ volatile("fistpll %0" : "=m"(f));
  RESULT(2) = f;
  RESULT(3) = 0x5a5a;
  kit_exit(0);
}
`;

/** What the guest computes, computed here. */
function expected(): { h: bigint; f: bigint } {
  let h = 1;
  for (let i = 0; i < ITERATIONS; i++) h = (Math.imul(h, 31) + i) >>> 0;
  return { h: BigInt(h), f: 1n + 3n * BigInt(ITERATIONS) };
}

interface ChildResult {
  exitCode: number | null;
  reason: string;
  detail: string;
  atRestore: string[];
  after: string[];
}

function restoreInChild(statePath: string, memPath: string, paused = false): ChildResult {
  const r = spawnSync(process.execPath, [CHILD, statePath, memPath, ...(paused ? ['paused'] : [])], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  assert.equal(r.status, 0, `restore child: ${r.stderr}`);
  return JSON.parse(r.stdout) as ChildResult;
}

describe('snapshot and restore of a ring-3 guest', { skip: kvmSkip }, () => {
  test('restored in a fresh process, the guest continues where it was paused and finishes byte-exact', async () => {
    const dir = tempDir();
    const statePath = join(dir, 'vm.snap');
    const memPath = join(dir, 'vm.mem');
    const memoryBytes = 16 * layout.MiB;
    const t = createTestVm({ irqchip: true, memoryBytes });
    loadProgram(t.vm, {
      mode: 'long64',
      cpl: 3,
      source: 'call kit_main\nud2',
      c: [GUEST],
      defines: { ITERATIONS },
    });
    const read = (i: number) => t.vm.memory.readU64(layout.KIT_DATA + 8 * i);
    let written = 0;
    let progressAtSnapshot: bigint;
    try {
      await t.vm.start();
      for (let i = 0; i < 200 && read(0) === 0n; i++) await sleep(5);
      await t.vm.pause();
      progressAtSnapshot = read(0);
      const machine = await t.vm.saveMachine(() => {
        written = writeMemoryFile(memPath, t.vm.memory).written;
      });
      writeFileAtomically(statePath, (fd) => writeAll(fd, encodeStateFile({ machine, memoryBytes, vcpus: 1 })));
      assert.ok(
        progressAtSnapshot > 0n && progressAtSnapshot < BigInt(ITERATIONS),
        `paused mid-way (${progressAtSnapshot})`,
      );
      // The original goes on to its end.
      t.vm.resume();
      const original = await t.vm.wait();
      assert.equal(original.exitCode, 0, original.detail);
    } finally {
      await t.vm.destroy();
    }
    const want = expected();
    // The memory file is the guest's RAM, sparse: only the pages it touched were written.
    assert.equal(statSync(memPath).size, memoryBytes);
    assert.ok(written > 0 && written < memoryBytes / 4, `${written} bytes written of ${memoryBytes}`);

    const restored = restoreInChild(statePath, memPath);
    assert.equal(restored.exitCode, 0, `${restored.reason}: ${restored.detail}`);
    assert.equal(restored.atRestore[0], progressAtSnapshot.toString(), 'RAM came back from the memory file');
    assert.equal(restored.atRestore[3], '0', 'the guest had not finished at the snapshot');
    assert.equal(BigInt(restored.after[1]!), want.h, 'integer state (general registers) continued exactly');
    assert.equal(BigInt(restored.after[2]!), want.f, 'floating-point state (the x87 stack) continued exactly');
    assert.equal(restored.after[3], String(0x5a5a));

    // Restored paused (Firecracker's resume_vm: false): nothing runs until it is resumed.
    const paused = restoreInChild(statePath, memPath, true);
    assert.equal(paused.exitCode, 0);
    assert.equal(paused.atRestore[4], progressAtSnapshot.toString(), 'no progress while paused');
    assert.equal(BigInt(paused.after[1]!), want.h);
  });

  test('a bad state or memory file is refused with the reason', () => {
    const dir = tempDir();
    const good = encodeStateFile({ hello: new Uint8Array([1, 2, 3]), big: 0xffff_ffff_ffff_fffen });
    assert.deepEqual(decodeStateFile(good), { hello: new Uint8Array([1, 2, 3]), big: 0xffff_ffff_ffff_fffen });
    const corrupt = Buffer.from(good);
    corrupt[30] = corrupt[30]! ^ 1;
    assert.throws(() => decodeStateFile(corrupt), /is corrupted \(its checksum does not match\)/);
    assert.throws(() => decodeStateFile(good.subarray(0, good.length - 5)), /is truncated or has extra bytes/);
    const newer = Buffer.from(good);
    newer.writeUInt32LE(SNAPSHOT_VERSION + 1, 8);
    assert.throws(
      () => decodeStateFile(newer),
      new RegExp(`is snapshot format version ${SNAPSHOT_VERSION + 1}; this Kiln reads version ${SNAPSHOT_VERSION}`),
    );
    assert.throws(() => decodeStateFile(Buffer.from('not a snapshot at all, just text')), /is not a Kiln snapshot/);
    const mem = join(dir, 'mem');
    writeFileSync(mem, Buffer.alloc(8192));
    assert.throws(() => openMemoryFile(mem, 16384), /is 8192 bytes; the snapshot's guest has 16384 bytes of RAM/);
    truncateSync(mem, 0);
    assert.throws(() => openMemoryFile(join(dir, 'none'), 4096), /cannot open the memory file .*ENOENT/);
    assert.throws(() => openMemoryFile(dir, 4096), /is not a regular file/);
    assert.equal(readFileSync(mem).length, 0, 'nothing written by a refused open');
  });
});
