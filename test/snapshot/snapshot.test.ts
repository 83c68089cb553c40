// Snapshots of a running machine: a ring-3 guest in the middle of a long computation
// (integer state in general registers, floating-point state on the x87 stack, progress
// in memory) is paused and saved, then restored in a fresh process, where it finishes
// with exactly the results the original reaches and a plain computation predicts. Bad
// state and memory files are refused with the reason before anything is restored.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, openSync, readFileSync, truncateSync, writeFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { loadProgram } from '../../src/guest/kit.js';
import * as layout from '../../src/layout.js';
import { writeFileAtomically, writeAll } from '../../src/atomic-file.js';
import { decodeStateFile, encodeStateFile, SNAPSHOT_VERSION } from '../../src/snapshot/format.js';
import {
  dataRanges,
  openMemoryFile,
  rebaseMemoryFile,
  writeDiffMemoryFile,
  writeMemoryFile,
} from '../../src/snapshot/memory-file.js';
import { restoreVmState, saveVmState } from '../../src/snapshot/vm-state.js';
import { fixZeroTscDeadline } from '../../src/snapshot/vcpu-state.js';
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

  test("a Diff holds what changed since the last snapshot, the guest's writes and Kiln's own; laid over the Full before it, it is the Full after it", async () => {
    const dir = tempDir();
    const memoryBytes = 16 * layout.MiB;
    const ARENA = 0x400000;
    const PAGES = 64;
    // Built without tracking: it starts at the first Full snapshot, as kiln-vmm's does.
    const t = createTestVm({ irqchip: true, memoryBytes });
    // The guest fills its arena a page at a time (4096 one-byte writes per page, never zero).
    loadProgram(t.vm, {
      mode: 'long64',
      cpl: 3,
      source: 'call kit_main\nud2',
      c: [
        `#include "kit.h"
        void kit_main(void) {
          volatile u8 *arena = (volatile u8 *)ARENA;
          for (u64 i = 1;; i++) {
            arena[((i >> 12) % PAGES) * 4096 + (i & 4095)] = (u8)(i | 1);
            if ((i & 0xfff) == 0) RESULT(0) = i;
          }
        }`,
      ],
      defines: { ARENA, PAGES },
    });
    const progress = () => t.vm.memory.readU64(layout.KIT_DATA);
    const full = (path: string) =>
      t.vm.saveMachine(() => {
        if (t.vm.tracksDirtyPages) t.vm.takeDirtyPages();
        else t.vm.startTrackingDirtyPages();
        writeMemoryFile(path, t.vm.memory);
      });
    const OWN = 0x800000;
    const CLEARED = 0x900000;
    t.vm.memory.fill(CLEARED, layout.PAGE_SIZE, 0xaa);
    let diff = { bytes: 0, written: 0 };
    try {
      await t.vm.start();
      for (let i = 0; i < 400 && progress() < 4096n * 2n; i++) await sleep(5);
      await t.vm.pause();
      assert.throws(() => t.vm.takeDirtyPages(), /does not track dirty pages/);
      await full(join(dir, 'a.mem'));
      const atA = progress();
      // Kiln's own writes after A (as a device's would be): bytes into one page, and a
      // page that was 0xaa made zero again (a diff must carry a page that became zero).
      t.vm.memory.write(OWN + 100, new Uint8Array([1, 2, 3]));
      t.vm.memory.fill(CLEARED, layout.PAGE_SIZE, 0);
      t.vm.resume();
      for (let i = 0; i < 400 && progress() < atA + 4096n * 4n; i++) await sleep(5);
      await t.vm.pause();
      assert.ok(progress() >= atA + 4096n * 4n, `the guest went on after A (${atA} -> ${progress()})`);
      await t.vm.saveMachine(() => {
        diff = writeDiffMemoryFile(join(dir, 'b.diff'), t.vm.memory, t.vm.takeDirtyPages());
      });
      await full(join(dir, 'c.mem'));
    } finally {
      await t.vm.destroy();
    }
    assert.equal(diff.bytes, memoryBytes);
    assert.equal(statSync(join(dir, 'b.diff')).size, memoryBytes, 'a diff is as long as the RAM (holes between)');
    assert.ok(
      diff.written > 0 && diff.written <= (PAGES + 64) * layout.PAGE_SIZE,
      `only what changed is in the diff (${diff.written} bytes)`,
    );
    const fd = openSync(join(dir, 'b.diff'), 'r');
    let ranges: Array<{ offset: number; length: number }>;
    try {
      ranges = dataRanges(fd, memoryBytes);
    } finally {
      closeSync(fd);
    }
    const inDiff = (gpa: number) => ranges.some((r) => gpa >= r.offset && gpa < r.offset + r.length);
    assert.ok(inDiff(OWN) && inDiff(CLEARED), "Kiln's own writes are in the diff");
    assert.ok(inDiff(layout.KIT_DATA), "the guest's writes (its progress) are in the diff");
    assert.ok(!inDiff(layout.KIT_CODE), 'pages nobody wrote are holes');
    // The Full before, with the Diff laid over it, is byte for byte the Full after.
    copyFileSync(join(dir, 'a.mem'), join(dir, 'merged.mem'));
    assert.equal(rebaseMemoryFile(join(dir, 'merged.mem'), join(dir, 'b.diff')), diff.written);
    assert.ok(
      readFileSync(join(dir, 'merged.mem')).equals(readFileSync(join(dir, 'c.mem'))),
      'the Full before + the Diff = the Full after',
    );
    assert.ok(!readFileSync(join(dir, 'a.mem')).equals(readFileSync(join(dir, 'c.mem'))), 'memory did change');
    // A diff of another VM's size is refused before anything is written.
    writeFileSync(join(dir, 'small.mem'), Buffer.alloc(8192, 9));
    assert.throws(() => rebaseMemoryFile(join(dir, 'small.mem'), join(dir, 'b.diff')), /they are not of one VM/);
    assert.ok(readFileSync(join(dir, 'small.mem')).equals(Buffer.alloc(8192, 9)));
    assert.throws(() => rebaseMemoryFile(join(dir, 'none'), join(dir, 'b.diff')), /cannot open the base memory file/);
  });

  test('clock_realtime moves the restored kvmclock on by the wall-clock time since the snapshot; by default it stands still', async () => {
    const a = createTestVm({ irqchip: true });
    const b = createTestVm({ irqchip: true });
    const c = createTestVm({ irqchip: true });
    try {
      const saved = saveVmState(a.vm.vmFd);
      const hourAgo = { ...saved, wallNs: saved.wallNs! - 3600n * 1_000_000_000n };
      const clockOf = (bytes: Uint8Array) => Buffer.from(bytes).readBigUInt64LE(0);
      restoreVmState(b.vm.vmFd, hourAgo, { clockRealtime: true });
      restoreVmState(c.vm.vmFd, hourAgo);
      const moved = Number(clockOf(b.vm.vmFd.getClock()) - clockOf(saved.clock)) / 1e9;
      const still = Number(clockOf(c.vm.vmFd.getClock()) - clockOf(saved.clock)) / 1e9;
      assert.ok(moved >= 3600 && moved < 3600 + 30, `moved on by the hour (${moved} s)`);
      assert.ok(still >= 0 && still < 30, `stood still (${still} s)`);
    } finally {
      await Promise.all([a, b, c].map((x) => x.vm.destroy()));
    }
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
    // Large arrays (device state, mostly zeros) are deflated, and come back exact; one that
    // would inflate past 16 MiB (a hostile file with a valid checksum) is refused.
    const state = new Uint8Array(256 * 1024);
    state.set([1, 2, 3], 4096);
    const packed = encodeStateFile({ state });
    assert.ok(packed.length < 4096, `${packed.length} bytes for 256 KiB of mostly zeros`);
    assert.deepEqual(decodeStateFile(packed), { state });
    assert.throws(() => decodeStateFile(encodeStateFile({ bomb: new Uint8Array(32 * 1024 * 1024) })), /cannot be read/);
    const mem = join(dir, 'mem');
    writeFileSync(mem, Buffer.alloc(8192));
    assert.throws(() => openMemoryFile(mem, 16384), /is 8192 bytes; the snapshot's guest has 16384 bytes of RAM/);
    truncateSync(mem, 0);
    assert.throws(() => openMemoryFile(join(dir, 'none'), 4096), /cannot open the memory file .*ENOENT/);
    assert.throws(() => openMemoryFile(dir, 4096), /is not a regular file/);
    assert.equal(readFileSync(mem).length, 0, 'nothing written by a refused open');
  });
});

test('the TSC-deadline fix-up: an armed TSC-deadline LAPIC timer saved with a deadline of 0 is restored to fire at once', () => {
  const lapic = (lvtt: number) => {
    const page = Buffer.alloc(1024);
    page.writeUInt32LE(lvtt, 0x320);
    return new Uint8Array(page);
  };
  const DEADLINE_MODE = 2 << 17;
  const saved = (deadline: bigint): Array<[number, bigint]> => [
    [0x10, 12345n],
    [0x6e0, deadline],
  ];
  const fixed = saved(0n);
  assert.equal(fixZeroTscDeadline(fixed, lapic(DEADLINE_MODE | 0xec)), true);
  assert.deepEqual(fixed, [
    [0x10, 12345n],
    [0x6e0, 1n],
  ]);
  // Left alone: a deadline still ahead, a masked timer, a periodic timer, no LAPIC.
  for (const [msrs, page] of [
    [saved(99n), lapic(DEADLINE_MODE)],
    [saved(0n), lapic(DEADLINE_MODE | (1 << 16))],
    [saved(0n), lapic(1 << 17)],
    [saved(0n), undefined],
  ] as const) {
    const copy = msrs.map(([i, v]): [number, bigint] => [i, v]);
    assert.equal(fixZeroTscDeadline(copy, page), false);
    assert.deepEqual(copy, msrs);
  }
});
