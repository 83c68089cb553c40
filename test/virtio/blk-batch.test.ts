// virtio-blk's reads and writes when many wait at once (the I/O thread moves a drain's
// reads and writes together, through one io_uring submit where the host has io_uring),
// driven without a guest by test/virtio/fake-driver.ts: more requests than one batch
// holds, of every shape (data and status apart or in one buffer, data in pieces, a
// request of more pieces than a batched one may have), mixed with requests that are not
// batched (GET_ID, a flush, a range past the end): each gets its own data and status, and
// writes reach the file before the flush after them is answered.
import assert from 'node:assert/strict';
import { openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import {
  blkOptions,
  SECTOR_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from '../../src/virtio/blk.js';
import { tempDir } from '../helpers.js';
import { FakeDevice } from './fake-driver.js';

const DISK_BYTES = 1 << 20;
const REQUESTS = 40;
const PIECES = 40; // more than a batched request may have: it is done alone, in its turn

function header(type: number, sector: number): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeBigUInt64LE(BigInt(sector), 8);
  return h;
}

function diskWithPattern(): { path: string; pattern: Buffer } {
  const path = join(tempDir(), 'disk.img');
  const pattern = Buffer.alloc(DISK_BYTES);
  for (let i = 0; i < DISK_BYTES; i += 4) pattern.writeUInt32LE((i * 2654435761) >>> 0, i);
  writeFileSync(path, pattern);
  return { path, pattern };
}

/** The status byte of the request at `head`: the last byte of its last writable buffer. */
function statusOf(dev: FakeDevice, head: number): number {
  const last = dev.writableOf(0, head).at(-1)!;
  return dev.mem.read(last.addr + last.len - 1, 1)[0]!;
}

function device(path: string, readOnly = false): { dev: FakeDevice; fd: number } {
  const fd = openSync(path, readOnly ? 'r' : 'r+');
  return { dev: new FakeDevice({ kind: 'blk', options: blkOptions(fd, path, readOnly, 'batch-disk') }), fd };
}

/** Writable buffers for `bytes` of data and the status byte, in the shape numbered `shape`. */
function readShape(shape: number, bytes: number): Array<{ write: number }> {
  switch (shape % 4) {
    case 0:
      return [{ write: bytes }, { write: 1 }];
    case 1:
      return [{ write: 1000 }, { write: bytes - 1000 }, { write: 1 }];
    case 2:
      return [{ write: bytes + 1 }]; // data and status in one buffer
    default:
      return Array.from({ length: PIECES }, (_, k) => ({ write: k < PIECES - 1 ? bytes / (PIECES - 1) : 1 }));
  }
}

describe('virtio-blk with many requests waiting', () => {
  test('reads of every shape, more than one batch, among GET_ID and a bad range: each its own data and status', () => {
    const { path, pattern } = diskWithPattern();
    const { dev, fd } = device(path);
    try {
      const expect = new Map<number, { status: number; data?: Buffer }>();
      for (let i = 0; i < REQUESTS; i++) {
        const bytes = i % 4 === 3 ? (PIECES - 1) * SECTOR_BYTES : 4096;
        const sector = (i * 37) % (DISK_BYTES / SECTOR_BYTES - 64);
        const head = dev.offer(0, [{ read: header(VIRTIO_BLK_T_IN, sector) }, ...readShape(i, bytes)]);
        expect.set(head, { status: VIRTIO_BLK_S_OK, data: pattern.subarray(sector * 512, sector * 512 + bytes) });
        if (i === 10) {
          const id = dev.offer(0, [{ read: header(VIRTIO_BLK_T_GET_ID, 0) }, { write: 20 }, { write: 1 }]);
          expect.set(id, { status: VIRTIO_BLK_S_OK, data: Buffer.from('batch-disk'.padEnd(20, '\0')) });
        }
        if (i === 25) {
          const past = dev.offer(0, [
            { read: header(VIRTIO_BLK_T_IN, DISK_BYTES / SECTOR_BYTES - 4) },
            { write: 4096 },
            { write: 1 },
          ]);
          expect.set(past, { status: VIRTIO_BLK_S_IOERR });
        }
      }
      dev.notify(0);
      const used = dev.used(0);
      assert.equal(used.length, expect.size, 'every request came back once');
      for (const u of used) {
        const e = expect.get(u.id)!;
        assert.ok(e, `head ${u.id} was offered`);
        assert.equal(statusOf(dev, u.id), e.status, `head ${u.id}'s status`);
        if (e.data) {
          assert.equal(u.len, e.data.length + 1, `head ${u.id}'s length`);
          assert.ok(u.written.subarray(0, e.data.length).equals(e.data), `head ${u.id}'s data`);
        }
      }
      assert.deepEqual(dev.logged, []);
    } finally {
      dev.close();
      libc.close(fd);
    }
  });

  test('writes, more than one batch, then a flush: all on the disk, each its status; a read-only disk refuses them', () => {
    const { path, pattern } = diskWithPattern();
    const { dev, fd } = device(path);
    const expected = Buffer.from(pattern);
    try {
      for (let i = 0; i < REQUESTS; i++) {
        const sector = i * 16;
        const data = Buffer.alloc(i % 4 === 3 ? (PIECES - 1) * SECTOR_BYTES : 4096, 0x40 + (i % 64));
        data.writeUInt32LE(i, 0);
        data.copy(expected, sector * SECTOR_BYTES);
        const pieces =
          i % 4 === 3
            ? Array.from({ length: PIECES - 1 }, (_, k) => ({ read: data.subarray(k * 512, (k + 1) * 512) }))
            : [{ read: data.subarray(0, 512) }, { read: data.subarray(512) }];
        dev.offer(0, [{ read: header(VIRTIO_BLK_T_OUT, sector) }, ...pieces, { write: 1 }]);
      }
      const flush = dev.offer(0, [{ read: header(VIRTIO_BLK_T_FLUSH, 0) }, { write: 1 }]);
      dev.notify(0);
      const used = dev.used(0);
      assert.equal(used.length, REQUESTS + 1);
      for (const u of used) assert.equal(statusOf(dev, u.id), VIRTIO_BLK_S_OK, `head ${u.id}'s status`);
      assert.equal(used.at(-1)!.id, flush, 'the flush is answered after the writes before it');
      assert.ok(readFileSync(path).equals(expected), 'the disk holds every write, and nothing else changed');
    } finally {
      dev.close();
      libc.close(fd);
    }

    const ro = device(path, true);
    try {
      const head = ro.dev.offer(0, [
        { read: header(VIRTIO_BLK_T_OUT, 0) },
        { read: Buffer.alloc(512, 0xee) },
        { write: 1 },
      ]);
      ro.dev.notify(0);
      assert.equal(ro.dev.used(0).length, 1);
      assert.equal(statusOf(ro.dev, head), VIRTIO_BLK_S_IOERR);
      assert.ok(readFileSync(path).equals(expected), 'a read-only disk is not written');
    } finally {
      ro.dev.close();
      libc.close(ro.fd);
    }
  });
});
