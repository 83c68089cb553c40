// virtio-blk through the whole path: a ring-3 guest driver (guests/kit/virtio.h)
// negotiates over modern virtio-pci, sets up a split queue, and moves data; the
// notification goes through the ioeventfd to the I/O thread; completions come back as
// MSI-X interrupts the guest sees pending in its LAPIC.
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { KIT_DATA } from '../../src/layout.js';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { blkControl, openDisk } from '../../src/platform/virtio.js';
import { blkOptions } from '../../src/virtio/blk.js';
import { VIRTIO_BAR } from '../../src/virtio/pci.js';
import { QUEUE_TRANSPORT } from '../../src/virtio/device.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { result, runDriver, virtioTestVm } from './harness.js';

function disk(bytes: number): { path: string; pattern: Buffer } {
  const path = join(tempDir(), 'disk.img');
  const pattern = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 4) pattern.writeUInt32LE((i * 2654435761) >>> 0, i);
  writeFileSync(path, pattern);
  return { path, pattern };
}

function blkDevice(path: string, readOnly = false, serial = 'kiln-test-disk') {
  const fd = openSync(path, readOnly ? 'r' : 'r+');
  return { fd, options: blkOptions(fd, path, readOnly, serial) };
}

const BLK_DRIVER = `#include "blk.h"
void kit_main(void) {
  struct vdev d; struct vq q;
  RESULT(0) = vdev_find(&d, SLOT0);
  RESULT(1) = vdev_negotiate(&d, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_F_INDIRECT_DESC) | (1ULL << 9) | (1ULL << 5) | (1ULL << 6) | (1ULL << 13) | (1ULL << 14));
  RESULT(2) = d.features;
  lapic_enable();
  vdev_msix_enable(&d);
  vdev_msix_route(&d, 0, 0x40, 0);
  RESULT(3) = vq_setup(&d, &q, 0, 0, 0);
  vdev_driver_ok(&d);
  RESULT(4) = rd32(d.device) | ((u64)rd32(d.device + 4) << 32);
  u32 len = 0;
  u64 buf = kit_alloc(8192);
  RESULT(5) = blk_io(&q, 0, 2, buf, 4096, 1, 0, &len);  /* read sectors 2-9 */
  RESULT(6) = len;
  RESULT(7) = buf;
  RESULT(8) = lapic_wait(0x40, 1000000);
  u64 wbuf = kit_alloc(4096);
  for (int i = 0; i < 1024; i++) wr32(wbuf + 4 * i, 0xc0de0000 + i);
  RESULT(9) = blk_io(&q, 1, 16, wbuf, 4096, 0, kit_alloc(4096), &len); /* write sectors 16-23, indirect */
  RESULT(10) = blk_io(&q, 4, 0, 0, 0, 0, 0, &len);                      /* flush */
  u64 id = kit_alloc(64);
  RESULT(11) = blk_io(&q, 8, 0, id, 20, 1, 0, &len);                    /* get id */
  RESULT(12) = id;
  RESULT(13) = blk_io(&q, 0, RESULT(4) - 1, buf, 1024, 1, 0, &len);     /* runs past the end */
  RESULT(14) = blk_io(&q, 99, 0, buf, 512, 1, 0, &len);                 /* unknown type */
  kit_exit(0);
}`;

describe('virtio-blk', { skip: kvmSkip }, () => {
  test('a ring-3 driver reads, writes (indirect), flushes and gets the serial id over virtio-pci with MSI-X', async () => {
    const { path, pattern } = disk(1 << 20);
    const { fd, options } = blkDevice(path);
    const t = virtioTestVm([{ kind: 'blk', options }]);
    t.vm.adoptFd(fd);
    await runDriver(t, BLK_DRIVER, {}, (r) => {
      assert.equal(r.exitCode, 0, r.detail);
      assert.equal(result(t, 0), 0n, 'virtio capabilities found');
      assert.equal(result(t, 1), 0xbn, 'ACKNOWLEDGE | DRIVER | FEATURES_OK accepted');
      assert.equal(result(t, 3), 0n, 'queue enabled');
      assert.equal(result(t, 4), BigInt((1 << 20) / 512), 'capacity in sectors');
      assert.equal(result(t, 5), 0n, 'read status OK');
      assert.equal(result(t, 6), 4097n, 'used length = data + status');
      const got = t.vm.memory.read(Number(result(t, 7)), 4096);
      assert.deepEqual(Buffer.from(got), pattern.subarray(1024, 1024 + 4096), 'sectors 2-9 byte-exact');
      assert.equal(result(t, 8), 1n, 'MSI-X vector 0x40 pending in the LAPIC');
      assert.equal(result(t, 9), 0n, 'write status OK');
      assert.equal(result(t, 10), 0n, 'flush OK');
      assert.equal(result(t, 11), 0n, 'get-id OK');
      assert.equal(Buffer.from(t.vm.memory.read(Number(result(t, 12)), 14)).toString(), 'kiln-test-disk');
      assert.equal(result(t, 13), 1n, 'IOERR past the end of the disk');
      assert.equal(result(t, 14), 2n, 'UNSUPP for an unknown request');
      const rec = t.devices[0]!.state.transportRecord(0);
      assert.equal(
        rec.getUint32(QUEUE_TRANSPORT.eventfdAddr, true),
        t.devices[0]!.barAddress + VIRTIO_BAR.notify,
        'kicks go through an ioeventfd at the notify address',
      );
    });
    const file = readFileSync(path);
    for (let i = 0; i < 1024; i++)
      assert.equal(file.readUInt32LE(16 * 512 + 4 * i), 0xc0de0000 + i, `written word ${i}`);
    assert.deepEqual(file.subarray(0, 16 * 512), pattern.subarray(0, 16 * 512), 'nothing else changed');
    closeSync(openSync(path, 'r'));
  });

  test('a disk file that shrinks under the VM gives the guest I/O errors past the new end; the rest still works', async () => {
    const { path } = disk(1 << 20);
    const { fd, options } = blkDevice(path);
    const t = virtioTestVm([{ kind: 'blk', options }]);
    t.vm.adoptFd(fd);
    await runDriver(
      t,
      `#include "blk.h"
      static u64 io(struct vq *q, u32 type, u64 sector, u64 data) { return blk_io(q, type, sector, data, 4096, type == VIRTIO_BLK_T_IN, 0, 0); }
      void kit_main(void) {
        struct vdev d; struct vq q;
        vdev_find(&d, SLOT0);
        vdev_negotiate(&d, 1ULL << VIRTIO_F_VERSION_1);
        vq_setup(&d, &q, 0, 0, VIRTIO_MSI_NO_VECTOR);
        vdev_driver_ok(&d);
        u64 buf = kit_alloc(4096);
        RESULT(0) = io(&q, 0, 1024, buf);      /* sector 1024 (512 KiB) reads */
        RESULT(9) = 1;
        while (RESULT(10) != 1) __asm__ __volatile__("pause");
        RESULT(1) = io(&q, 0, 1024, buf);      /* the file is 256 KiB now */
        RESULT(2) = io(&q, 0, 8, buf);         /* still inside */
        RESULT(3) = io(&q, 1, 16, buf);        /* writes inside still work */
        RESULT(4) = vdev_status(&d);
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 0n, 'read before the shrink: OK');
        assert.equal(result(t, 1), 1n, 'read past the new end: IOERR');
        assert.equal(result(t, 2), 0n, 'read inside: OK');
        assert.equal(result(t, 3), 0n, 'write inside: OK');
        assert.equal(result(t, 4), 0xfn, 'no NEEDS_RESET: an I/O error is not a broken device');
      },
      async () => {
        for (let i = 0; i < 400 && result(t, 9) !== 1n; i++) await sleep(5);
        truncateSync(path, 256 * 1024);
        t.vm.memory.writeU64(KIT_DATA + 80, 1n);
      },
    );
  });

  test('write-zeroes and discard clear ranges of the file; a read-only drive refuses writes and says RO', async () => {
    const { path, pattern } = disk(1 << 20);
    const rwDisk = blkDevice(path);
    const roPath = `${path}.ro`;
    writeFileSync(roPath, pattern);
    const roDisk = blkDevice(roPath, true);
    const t = virtioTestVm([
      { kind: 'blk', options: rwDisk.options },
      { kind: 'blk', options: roDisk.options },
    ]);
    t.vm.adoptFd(rwDisk.fd);
    t.vm.adoptFd(roDisk.fd);
    await runDriver(
      t,
      `#include "blk.h"
      /* Discard and write-zeroes carry one {sector, num_sectors, flags} range as their data. */
      static u64 ranged(struct vq *q, u32 type, u64 sector, u32 count, u32 flags) {
        u64 range = kit_alloc(16);
        wr64(range, sector); wr32(range + 8, count); wr32(range + 12, flags);
        return blk_io(q, type, 0, range, 16, 0, 0, 0);
      }
      void kit_main(void) {
        struct vdev d, r; struct vq q, rq;
        vdev_find(&d, SLOT0); vdev_find(&r, SLOT1);
        vdev_negotiate(&d, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << 13) | (1ULL << 14));
        RESULT(0) = d.features;
        vq_setup(&d, &q, 0, 0, VIRTIO_MSI_NO_VECTOR); vdev_driver_ok(&d);
        RESULT(1) = ranged(&q, 13, 100, 8, 0);   /* write zeroes, sectors 100-107 */
        RESULT(2) = ranged(&q, 11, 200, 8, 0);   /* discard, sectors 200-207 */
        RESULT(3) = ranged(&q, 13, 2047, 8, 0);  /* past the end */
        RESULT(4) = vdev_device_features(&r);
        vdev_negotiate(&r, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << 5));
        vq_setup(&r, &rq, 0, 0, VIRTIO_MSI_NO_VECTOR); vdev_driver_ok(&r);
        RESULT(5) = blk_io(&rq, VIRTIO_BLK_T_OUT, 0, kit_alloc(512), 512, 0, 0, 0);
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(Number(result(t, 0) >> 13n) & 3, 3, 'DISCARD and WRITE_ZEROES negotiated');
        assert.equal(result(t, 1), 0n, 'write-zeroes OK');
        assert.equal(result(t, 2), 0n, 'discard OK');
        assert.equal(result(t, 3), 1n, 'a range past the end: IOERR');
        assert.equal(Number(result(t, 4) >> 5n) & 1, 1, 'the read-only drive offers VIRTIO_BLK_F_RO');
        assert.equal(Number(result(t, 4) >> 13n) & 3, 0, 'and neither discard nor write-zeroes');
        assert.equal(result(t, 5), 1n, 'a write to the read-only drive: IOERR');
      },
    );
    const file = readFileSync(path);
    assert.deepEqual(file.subarray(100 * 512, 108 * 512), Buffer.alloc(4096), 'write-zeroes cleared the range');
    assert.deepEqual(
      file.subarray(200 * 512, 208 * 512),
      Buffer.alloc(4096),
      'discard punched the range (reads as zeroes)',
    );
    assert.deepEqual(
      file.subarray(108 * 512, 200 * 512),
      pattern.subarray(108 * 512, 200 * 512),
      'nothing around them changed',
    );
    assert.deepEqual(readFileSync(roPath), pattern, 'the read-only image is untouched');
  });

  test('the backing file changes under a running guest (PATCH /drives): new capacity and contents, with a configuration change', async () => {
    const a = disk(1 << 20);
    const { fd, options } = blkDevice(a.path);
    const t = virtioTestVm([{ kind: 'blk', options }]);
    t.vm.adoptFd(fd);
    const bPath = `${a.path}.b`;
    const b = Buffer.alloc(2 << 20, 0x42);
    writeFileSync(bPath, b);
    await runDriver(
      t,
      `#include "blk.h"
      static u64 rd(struct vq *q, u64 sector, u64 data) { return blk_io(q, VIRTIO_BLK_T_IN, sector, data, 512, 1, 0, 0); }
      void kit_main(void) {
        struct vdev d; struct vq q;
        vdev_find(&d, SLOT0);
        vdev_negotiate(&d, 1ULL << VIRTIO_F_VERSION_1);
        vq_setup(&d, &q, 0, 0, VIRTIO_MSI_NO_VECTOR);
        vdev_driver_ok(&d);
        u64 buf = kit_alloc(4096);
        RESULT(0) = rd32(d.device);
        rd(&q, 0, buf);
        RESULT(1) = rd32(buf);
        u8 gen = rd8(d.common + VCOMMON_CFGGEN);
        RESULT(9) = 1;
        long spins = 1000000000L;
        while (rd8(d.common + VCOMMON_CFGGEN) == gen && spins-- > 0) {}
        RESULT(2) = rd32(d.device);
        RESULT(3) = rd(&q, 3000, buf);  /* past the old end, inside the new one */
        RESULT(4) = rd32(buf);
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 2048n, 'old capacity');
        assert.equal(result(t, 1), BigInt(a.pattern.readUInt32LE(0)), 'old contents');
        assert.equal(result(t, 2), 4096n, 'new capacity after the configuration change');
        assert.equal(result(t, 3), 0n, 'a read past the old end succeeds');
        assert.equal(result(t, 4), 0x42424242n, 'new contents');
      },
      async () => {
        for (let i = 0; i < 400 && result(t, 9) !== 1n; i++) await sleep(5);
        const opened = openDisk({ path: bPath }, 0);
        t.vm.adoptFd(opened.fd);
        blkControl(t.devices[0]!).swap(opened.fd, Number(opened.options.sectors));
      },
    );
  });
});
