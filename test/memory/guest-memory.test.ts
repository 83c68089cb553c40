import assert from 'node:assert/strict';
import { test } from 'node:test';
import { KvmSystem } from '../../src/kvm/kvm.js';
import { GiB, HIGH_RAM_START, MiB, MMIO_HOLE_START } from '../../src/layout.js';
import {
  GuestMemory,
  MAX_REGION_SIZE,
  OwnedGuestMemory,
  ramRanges,
  validateMemorySize,
} from '../../src/memory/guest-memory.js';
import { kvmSkip } from '../helpers.js';

const limits = { memslots: 32, physAddrBits: 40, hostBytes: 64 * GiB };

test('RAM is split around the 32-bit MMIO hole into slots of at most 2 GiB', () => {
  assert.deepEqual(ramRanges(128 * MiB), [{ guestPhysAddr: 0, size: 128 * MiB }]);
  const big = ramRanges(6 * GiB);
  assert.deepEqual(big, [
    { guestPhysAddr: 0, size: MAX_REGION_SIZE },
    { guestPhysAddr: 2 * GiB, size: MMIO_HOLE_START - 2 * GiB },
    { guestPhysAddr: HIGH_RAM_START, size: 2 * GiB },
    { guestPhysAddr: HIGH_RAM_START + 2 * GiB, size: 1 * GiB },
  ]);
  assert.equal(
    big.reduce((n, r) => n + r.size, 0),
    6 * GiB,
  );
  for (const r of big)
    assert.ok(r.guestPhysAddr + r.size <= MMIO_HOLE_START || r.guestPhysAddr >= HIGH_RAM_START, 'no RAM in the hole');
});

test('memory sizes that cannot work are refused with one line each', () => {
  assert.throws(() => validateMemorySize(0, limits), /must be a positive number of bytes \(got 0\)/);
  assert.throws(() => validateMemorySize(1001 * 1024, limits), /is not a multiple of the 4096-byte page size/);
  assert.throws(
    () => validateMemorySize(128 * GiB, limits),
    /larger than this host can map: it has 65536 MiB of RAM and swap/,
  );
  assert.throws(
    () => validateMemorySize(2 * 1024 * GiB, { ...limits, hostBytes: Infinity }),
    /its 40-bit physical addresses allow/,
  );
  assert.throws(
    () => validateMemorySize(60 * GiB, { ...limits, memslots: 8 }),
    /needs 31 KVM memory slots; this host allows 8/,
  );
  assert.doesNotThrow(() => validateMemorySize(128 * MiB, limits));
});

test('guest memory is registered, shared between views, and bounds-checked', { skip: kvmSkip }, () => {
  const kvm = KvmSystem.open();
  const vm = kvm.createVm();
  const memory = OwnedGuestMemory.create(vm, 4 * MiB, limits);
  try {
    memory.writeU64(0x1000, 0x1122334455667788n);
    memory.writeU32(0x2000, 0xdeadbeef);
    // A second view built from the descriptor (as a worker does) sees the same bytes.
    const other = GuestMemory.attach(memory.descriptor);
    assert.equal(other.readU64(0x1000), 0x1122334455667788n);
    assert.equal(other.readU32(0x2000), 0xdeadbeef);
    assert.deepEqual([...other.read(0x2000, 4)], [0xef, 0xbe, 0xad, 0xde]);
    other.write(0x3000, Uint8Array.of(1, 2, 3));
    assert.deepEqual([...memory.slice(0x3000, 3)], [1, 2, 3]);
    // The last byte of RAM is reachable; one past it, or a range crossing the end, is not.
    memory.writeU8(4 * MiB - 1, 0x5a);
    assert.equal(memory.readU8(4 * MiB - 1), 0x5a);
    assert.throws(() => memory.readU8(4 * MiB), /guest address 0x400000 is not RAM/);
    assert.throws(() => memory.readU32(4 * MiB - 2), /crosses the end of the RAM region at 0x0/);
    assert.throws(() => memory.slice(MMIO_HOLE_START, 1), /is not RAM/);
    assert.throws(() => memory.read(-1, 1), /bad guest memory access/);
  } finally {
    vm.close();
    memory.destroy();
    kvm.close();
  }
});
