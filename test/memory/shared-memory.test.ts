// Shared guest memory files (kiln upgrade's hand-over), with no VM: a file another process
// made is found among its open files, opened again and mapped, and both processes see
// each other's writes (no copy); the file cannot be resized under a mapping; a snapshot
// reads only the pages the file holds; anything that is not a guest memory file (an
// ordinary file, an unsealed memfd, a closed fd, another VMM's file, one of the wrong
// size) is refused with the reason.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, ftruncateSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { writeMemoryFile } from '../../src/snapshot/memory-file.js';
import {
  checkGuestMemoryFile,
  checkSameMemoryFile,
  createGuestMemoryFile,
  fileDataRanges,
  memoryFileIdentity,
  openGuestMemoryOf,
  type MemoryFileIdentity,
} from '../../src/memory/shared-memory.js';
import { tempDir } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;
const SHARED = new URL('../../src/memory/shared-memory.js', import.meta.url).href;
const LIBC = new URL('../../src/kvm/libc.js', import.meta.url).href;

/** Maps `fd`'s first `size` bytes shared; returns a view and the unmapper. */
function mapShared(fd: number, size: number): { bytes: Uint8Array; unmap: () => void } {
  const addr = libc.mmap(null, size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, 0);
  assert.notEqual(addr, libc.MAP_FAILED, `mmap: ${libc.errnoName(libc.errno())}`);
  return { bytes: new Uint8Array(libc.view(addr, size)), unmap: () => libc.munmap(addr, size) };
}

test("another process's guest memory file is found, opened again and shared both ways, never copied", async () => {
  assert.equal(openGuestMemoryOf(process.pid, SIZE), null, 'a process without one: null');
  // The "old VMM": makes the file, writes into it, tells its identity, then shows what it reads.
  const child = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `const sm = await import(${JSON.stringify(SHARED)});
       const libc = await import(${JSON.stringify(LIBC)});
       const fd = sm.createGuestMemoryFile(${SIZE}, false);
       const addr = libc.mmap(null, ${SIZE}, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, 0);
       const bytes = new Uint8Array(libc.view(addr, ${SIZE}));
       bytes.set(Buffer.from('written by the old VMM'), ${MiB});
       process.stdout.write(JSON.stringify(sm.memoryFileIdentity(fd)) + '\\n');
       process.stdin.once('data', () => {
         process.stdout.write(Buffer.from(bytes.subarray(${2 * MiB}, ${2 * MiB + 22})).toString() + '\\n');
         process.exit(0);
       });`,
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  try {
    const identity = JSON.parse((await lines.next()).value as string) as MemoryFileIdentity;
    assert.equal(identity.bytes, SIZE);
    assert.throws(() => openGuestMemoryOf(child.pid!, 2 * SIZE), /holds 4194304 bytes of memory; the VM has 8388608/);
    const fd = openGuestMemoryOf(child.pid!, SIZE);
    assert.ok(fd !== null, "the old process's file is found among its open files");
    try {
      checkSameMemoryFile(fd, 'the handed fd', identity);
      const { bytes, unmap } = mapShared(fd, SIZE);
      assert.equal(Buffer.from(bytes.subarray(MiB, MiB + 22)).toString(), 'written by the old VMM');
      bytes.set(Buffer.from('written by the new VMM'), 2 * MiB);
      child.stdin!.write('go\n');
      assert.equal((await lines.next()).value, 'written by the new VMM', 'the old process sees the write');
      unmap();
      // Sealed: nobody can shrink it under the other's mapping (which would SIGBUS it) or grow it.
      assert.throws(() => ftruncateSync(fd, MiB), /EPERM/);
      assert.throws(() => ftruncateSync(fd, 2 * SIZE), /EPERM/);
    } finally {
      closeSync(fd);
    }
  } finally {
    child.kill('SIGKILL');
  }
});

test('what is not the guest memory file it should be is refused with the reason', () => {
  const file = join(tempDir(), 'ram');
  writeFileSync(file, Buffer.alloc(SIZE));
  const ordinary = openSync(file, 'r+');
  const unsealed = libc.memfdCreate('kiln-guest-ram', libc.MFD_CLOEXEC);
  ftruncateSync(unsealed, SIZE);
  const mine = createGuestMemoryFile(SIZE, false);
  const another = createGuestMemoryFile(SIZE, false);
  try {
    assert.throws(
      () => checkGuestMemoryFile(ordinary, 'fd A'),
      /fd A is not a guest memory file \(it is not an unlinked memfd\)/,
    );
    assert.throws(() => checkGuestMemoryFile(unsealed, 'fd B'), /fd B is not a guest memory file \(it is not sealed/);
    assert.throws(() => checkGuestMemoryFile(9999, 'fd C'), /fd C is not an open file \(EBADF\)/);
    assert.throws(
      () => checkGuestMemoryFile(mine, 'fd D', 2 * SIZE),
      /fd D holds 4194304 bytes of memory; the VM has 8388608/,
    );
    assert.deepEqual(checkGuestMemoryFile(mine, 'fd D', SIZE), memoryFileIdentity(mine));
    assert.throws(
      () => checkSameMemoryFile(another, 'fd E', memoryFileIdentity(mine)),
      /fd E is another file than the source's guest memory/,
    );
  } finally {
    for (const fd of [ordinary, unsealed, mine, another]) closeSync(fd);
  }
});

test('a shared memory file is written to a memory file without reading its holes, which would allocate them', () => {
  const fd = createGuestMemoryFile(SIZE, false);
  const { bytes, unmap } = mapShared(fd, SIZE);
  try {
    const allocated = () => Number(fstatSync(fd).blocks) * 512;
    bytes.fill(0x11, MiB, MiB + 8192);
    bytes.fill(0x22, 3 * MiB, 3 * MiB + 4096);
    assert.deepEqual(fileDataRanges(fd, 0, SIZE), [
      { offset: MiB, length: 8192 },
      { offset: 3 * MiB, length: 4096 },
    ]);
    // Two regions back to back, as guest RAM is laid out in the file.
    const addr = libc.mmap(null, SIZE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, 0);
    const memory = GuestMemory.attach(
      {
        regions: [
          { slot: 0, guestPhysAddr: 0, size: 2 * MiB, hostAddr: addr },
          { slot: 1, guestPhysAddr: 8 * MiB, size: 2 * MiB, hostAddr: addr + BigInt(2 * MiB) },
        ],
        shared: true,
      },
      fd,
    );
    assert.deepEqual(memory.allocatedRanges(1), [{ offset: MiB, length: 4096 }], "a region's ranges are its own");
    const before = allocated();
    const out = join(tempDir(), 'memory');
    const { written } = writeMemoryFile(out, memory);
    assert.equal(allocated(), before, 'the holes were not read (a read of one allocates a page)');
    assert.equal(written, 8192 + 4096);
    const file = readFileSync(out);
    assert.ok(file.subarray(MiB, MiB + 8192).every((b) => b === 0x11));
    assert.ok(file.subarray(3 * MiB, 3 * MiB + 4096).every((b) => b === 0x22));
    // Why it matters: reading through the mapping allocates.
    void bytes[2 * MiB + 100];
    assert.ok(allocated() > before, 'a read of a hole allocated a page');
    libc.munmap(addr, SIZE);
  } finally {
    unmap();
    closeSync(fd);
  }
});
