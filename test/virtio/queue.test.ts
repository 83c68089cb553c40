// The split virtqueue from the device's side, on plain host memory: well-formed chains,
// every kind of hostile ring the spec forbids, and a seeded fuzzer that throws random
// rings at it (anything but a VirtqueueError, or a segment outside guest RAM, fails).
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import {
  DescriptorChain,
  QUEUE_RECORD,
  SplitQueue,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VirtqueueError,
} from '../../src/virtio/queue.js';

const HALF = 512 * 1024;
// Two regions, contiguous in guest-physical space but separate host mappings, like RAM
// split into memslots: a buffer may legitimately span both.
const maps = [0, 1].map(() =>
  libc.mmap(null, HALF, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0),
);
after(() => maps.forEach((m) => libc.munmap(m, HALF)));
const mem = GuestMemory.attach({
  regions: maps.map((hostAddr, i) => ({ slot: i, guestPhysAddr: i * HALF, size: HALF, hostAddr })),
});

const SIZE = 16;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;

function freshQueue(eventIdx = false): SplitQueue {
  mem.fill(0, 0x4000, 0);
  const rec = new DataView(new SharedArrayBuffer(QUEUE_RECORD.bytes));
  rec.setUint16(QUEUE_RECORD.size, SIZE, true);
  rec.setUint32(QUEUE_RECORD.desc, DESC, true);
  rec.setUint32(QUEUE_RECORD.driver, AVAIL, true);
  rec.setUint32(QUEUE_RECORD.device, USED, true);
  rec.setUint16(QUEUE_RECORD.enable, 1, true);
  const q = new SplitQueue(mem, rec, () => eventIdx);
  q.load();
  return q;
}

function desc(table: number, i: number, addr: number, len: number, flags: number, next = 0): void {
  const at = table + 16 * i;
  mem.writeU32(at, addr % 2 ** 32);
  mem.writeU32(at + 4, Math.floor(addr / 2 ** 32));
  mem.writeU32(at + 8, len);
  mem.writeU16(at + 12, flags);
  mem.writeU16(at + 14, next);
}

function offer(...heads: number[]): void {
  let idx = mem.readU16(AVAIL + 2);
  for (const h of heads) {
    mem.writeU16(AVAIL + 4 + 2 * (idx % SIZE), h);
    idx = (idx + 1) & 0xffff;
  }
  mem.writeU16(AVAIL + 2, idx);
}

function rejects(setup: () => void, pattern: RegExp): void {
  const q = freshQueue();
  setup();
  assert.throws(
    () => q.pop(new DescriptorChain()),
    (err: unknown) => err instanceof VirtqueueError && pattern.test(err.message),
  );
}

describe('split virtqueue', () => {
  test('pops a readable-then-writable chain, pushes it to the used ring', () => {
    const q = freshQueue(true);
    desc(DESC, 0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 5);
    desc(DESC, 5, 0x11000, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 7);
    desc(DESC, 7, 0x12000, 1, VIRTQ_DESC_F_WRITE);
    offer(0);
    const c = new DescriptorChain();
    assert.equal(q.pop(c), true);
    assert.equal(c.head, 0);
    assert.equal(c.count, 3);
    assert.deepEqual([...c.length.subarray(0, 3)], [16, 4096, 1]);
    assert.deepEqual([...c.writable.subarray(0, 3)], [0, 1, 1]);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 4097);
    assert.equal(mem.readU16(USED + 4 + 8 * SIZE), 1, 'EVENT_IDX: avail_event asks for the next request');
    assert.equal(q.pop(c), false, 'ring empty');
    q.push(0, 4097);
    assert.equal(mem.readU16(USED + 2), 1, 'used.idx');
    assert.equal(mem.readU32(USED + 4), 0, 'used id');
    assert.equal(mem.readU32(USED + 8), 4097, 'used len');
  });

  test('drain with a budget: stops after it with work left and kicks still suppressed; the next turn finishes', () => {
    const q = freshQueue();
    for (let i = 0; i < 5; i++) desc(DESC, i, 0x10000 + 0x1000 * i, 16, VIRTQ_DESC_F_WRITE);
    offer(0, 1, 2, 3, 4);
    const chain = new DescriptorChain();
    const served: number[] = [];
    const handle = (c: DescriptorChain) => {
      served.push(c.head);
      q.push(c.head, 0);
    };
    assert.equal(q.drain(chain, handle, 2), 2);
    assert.equal(q.leftOver, true);
    assert.equal(mem.readU16(USED) & 1, 1, 'VIRTQ_USED_F_NO_NOTIFY: the device will come back by itself');
    assert.equal(q.drain(chain, handle, 2), 2);
    assert.equal(q.drain(chain, handle, 2), 1);
    assert.equal(q.leftOver, false);
    assert.equal(mem.readU16(USED) & 1, 0, 'kicks wanted again once the queue is empty');
    assert.deepEqual(served, [0, 1, 2, 3, 4]);
    assert.equal(mem.readU16(USED + 2), 5, 'used.idx');
  });

  test('a buffer spanning two RAM regions becomes two segments', () => {
    const q = freshQueue();
    desc(DESC, 0, HALF - 100, 300, VIRTQ_DESC_F_WRITE);
    offer(0);
    const c = new DescriptorChain();
    q.pop(c);
    assert.equal(c.count, 2);
    assert.deepEqual([c.region[0], c.offset[0], c.length[0]], [0, HALF - 100, 100]);
    assert.deepEqual([c.region[1], c.offset[1], c.length[1]], [1, 0, 200]);
  });

  test('chain copies: readable bytes out from an offset, writable bytes in, across segments and regions', () => {
    const q = freshQueue();
    desc(DESC, 0, 0x10000, 10, VIRTQ_DESC_F_NEXT, 1);
    desc(DESC, 1, HALF - 6, 12, VIRTQ_DESC_F_NEXT, 2); // spans the two regions
    desc(DESC, 2, 0x20000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3);
    desc(DESC, 3, 0x30000, 8, VIRTQ_DESC_F_WRITE);
    mem.write(
      0x10000,
      Uint8Array.from({ length: 10 }, (_, i) => i),
    );
    mem.write(
      HALF - 6,
      Uint8Array.from({ length: 6 }, (_, i) => 10 + i),
    );
    mem.write(
      HALF,
      Uint8Array.from({ length: 6 }, (_, i) => 16 + i),
    );
    offer(0);
    const c = new DescriptorChain();
    q.pop(c);
    const out = new Uint8Array(16);
    assert.equal(c.readInto(mem, 4, out, 16), 16);
    assert.deepEqual(
      [...out],
      Array.from({ length: 16 }, (_, i) => 4 + i),
    );
    assert.equal(c.readInto(mem, 20, out, 16), 2, 'only what is left after the offset');
    assert.equal(c.writeFrom(mem, 5, Uint8Array.from([1, 2, 3, 4, 5, 6]), 6), 6);
    assert.deepEqual([...mem.read(0x20005, 3)], [1, 2, 3]);
    assert.deepEqual([...mem.read(0x30000, 3)], [4, 5, 6]);
    assert.equal(c.writeFrom(mem, 0, new Uint8Array(40), 40), 16, 'no more than the writable bytes');
  });

  test('indirect tables are followed', () => {
    const q = freshQueue();
    const table = 0x8000;
    desc(table, 0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 1);
    desc(table, 1, 0x11000, 512, VIRTQ_DESC_F_WRITE);
    desc(DESC, 3, table, 32, VIRTQ_DESC_F_INDIRECT);
    offer(3);
    const c = new DescriptorChain();
    q.pop(c);
    assert.equal(c.head, 3);
    assert.equal(c.count, 2);
    assert.equal(c.writableBytes, 512);
  });

  test('hostile rings are refused with a reason', () => {
    rejects(() => offer(SIZE), /past the queue size/);
    rejects(() => {
      desc(DESC, 0, 0x10000, 8, VIRTQ_DESC_F_NEXT, SIZE + 3);
      offer(0);
    }, /links to 19/);
    rejects(() => {
      desc(DESC, 0, 0x10000, 8, VIRTQ_DESC_F_NEXT, 1);
      desc(DESC, 1, 0x10000, 8, VIRTQ_DESC_F_NEXT, 0);
      offer(0);
    }, /loops/);
    rejects(() => {
      desc(0x8000, 0, 0x9000, 16, VIRTQ_DESC_F_INDIRECT);
      desc(DESC, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT);
      offer(0);
    }, /inside an indirect table/);
    rejects(() => {
      desc(DESC, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1);
      offer(0);
    }, /both INDIRECT and NEXT/);
    rejects(() => {
      desc(DESC, 0, 0x8000, 24, VIRTQ_DESC_F_INDIRECT);
      offer(0);
    }, /ragged/);
    rejects(() => {
      desc(DESC, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT);
      desc(0x8000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 0);
      offer(0);
    }, /loops|longer/);
    rejects(() => {
      desc(DESC, 0, 2 * HALF - 10, 100, VIRTQ_DESC_F_WRITE);
      offer(0);
    }, /not in guest RAM|runs out/);
    rejects(() => {
      desc(DESC, 0, 2 ** 52, 100, 0);
      offer(0);
    }, /not in guest RAM/);
    rejects(() => {
      desc(DESC, 0, 0x10000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
      desc(DESC, 1, 0x10000, 1, 0);
      offer(0);
    }, /readable buffer after a device-writable/);
    rejects(() => mem.writeU16(AVAIL + 2, SIZE + 1), /more than the queue size/);
  });

  test('EVENT_IDX: interrupts only when used_event is crossed', () => {
    const q = freshQueue(true);
    for (let i = 0; i < 4; i++) desc(DESC, i, 0x10000, 1, VIRTQ_DESC_F_WRITE);
    offer(0, 1, 2, 3);
    const c = new DescriptorChain();
    mem.writeU16(AVAIL + 4 + 2 * SIZE, 2); // used_event: interrupt once used.idx passes 2
    q.pop(c);
    q.push(c.head, 1);
    assert.equal(q.shouldInterrupt(), true, 'the first interrupt is always sent');
    q.pop(c);
    q.push(c.head, 1); // used.idx 2
    assert.equal(q.shouldInterrupt(), false, 'used_event 2 not yet passed');
    q.pop(c);
    q.push(c.head, 1); // used.idx 3: crossed 2 -> 3
    assert.equal(q.shouldInterrupt(), true);
  });

  test('fuzz: random rings give chains inside RAM or a VirtqueueError, nothing else', () => {
    let seed = 0x2545f491;
    const rand = () => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return seed >>> 0;
    };
    const c = new DescriptorChain();
    let chains = 0;
    let refused = 0;
    for (let round = 0; round < 3000; round++) {
      const q = freshQueue(round % 2 === 0);
      for (let i = 0; i < SIZE; i++) {
        // Mostly plausible values, sometimes wild ones.
        const addr = rand() % 4 === 0 ? rand() * 2 ** 20 + rand() : rand() % (2 * HALF);
        const len = rand() % 3 === 0 ? rand() : rand() % 8192;
        desc(DESC, i, addr, len, rand() & 7, rand() % 4 === 0 ? rand() & 0xffff : rand() % SIZE);
      }
      for (let i = 0; i < 32; i++) desc(0x8000, i, rand() % (2 * HALF), rand() % 4096, rand() & 7, rand() % 40);
      for (let i = 0; i < SIZE; i++)
        mem.writeU16(AVAIL + 4 + 2 * i, rand() % 5 === 0 ? rand() & 0xffff : rand() % SIZE);
      mem.writeU16(AVAIL + 2, rand() % 3 === 0 ? rand() & 0xffff : rand() % (SIZE + 1));
      try {
        while (q.pop(c)) {
          chains++;
          for (let s = 0; s < c.count; s++)
            assert.ok(
              c.offset[s]! + c.length[s]! <= HALF && c.region[s]! >= 0 && c.region[s]! < 2,
              'segment inside its region',
            );
          q.push(c.head, 0);
        }
      } catch (err) {
        if (!(err instanceof VirtqueueError)) throw err;
        refused++;
      }
    }
    assert.ok(chains > 100 && refused > 100, `both outcomes exercised (${chains} chains, ${refused} refused)`);
  });
});
