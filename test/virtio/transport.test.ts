// The virtio-pci transport seen from a ring-3 guest driver: entropy, feature
// negotiation, MSI-X masking and pending delivery, INTx with the ISR, and hostile rings
// that put one device into NEEDS_RESET while the VM and the other devices carry on.
// The function's configuration space is also decoded by `lspci -F`.
import assert from 'node:assert/strict';
import type { VirtioDeviceConfig } from '../../src/virtio/catalogue.js';
import { RNG_MAX_BYTES_PER_REQUEST } from '../../src/virtio/rng.js';
import { execFileSync } from 'node:child_process';
import { openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { blkOptions } from '../../src/virtio/blk.js';
import { VIRTIO_BAR } from '../../src/virtio/pci.js';
import { QUEUE_TRANSPORT } from '../../src/virtio/device.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';
import { result, runDriver, virtioTestVm } from './harness.js';

const WANT = '((1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_F_INDIRECT_DESC) | (1ULL << VIRTIO_F_EVENT_IDX))';

function blkDisk(): { fd: number; options: ReturnType<typeof blkOptions> } {
  const path = join(tempDir(), 'disk.img');
  writeFileSync(path, Buffer.alloc(64 * 1024, 0x5a));
  const fd = openSync(path, 'r+');
  return { fd, options: blkOptions(fd, path, false, 'hostile') };
}

describe('virtio-pci transport', { skip: kvmSkip }, () => {
  test('virtio-rng fills buffers with host entropy', async () => {
    const t = virtioTestVm([{ kind: 'rng', options: {} }]);
    await runDriver(
      t,
      `void kit_main(void) {
        struct vdev d; struct vq q;
        if (vdev_find(&d, SLOT0) || !(vdev_negotiate(&d, ${WANT}) & VIRTIO_STATUS_FEATURES_OK) || vq_setup(&d, &q, 0, 8, VIRTIO_MSI_NO_VECTOR)) kit_exit(3);
        vdev_driver_ok(&d);
        u64 a = kit_alloc(64), b = kit_alloc(64);
        struct vbuf x = { a, 64, 1 }, y = { b, 64, 1 };
        u32 len1 = 0, len2 = 0;
        vq_add(&q, &x, 1, 0); vq_kick(&q); if (vq_wait(&q, &len1, 100000000) < 0) kit_exit(4);
        vq_add(&q, &y, 1, 0); vq_kick(&q); if (vq_wait(&q, &len2, 100000000) < 0) kit_exit(5);
        RESULT(0) = len1; RESULT(1) = len2; RESULT(2) = a; RESULT(3) = b;
        /* A buffer far larger than one request may take: filled up to the cap, promptly. */
        u64 big = kit_alloc(4 << 20); struct vbuf z = { big, 4 << 20, 1 }; u32 len3 = 0;
        vq_add(&q, &z, 1, 0); vq_kick(&q); if (vq_wait(&q, &len3, 100000000) < 0) kit_exit(6);
        RESULT(4) = len3;
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 64n);
        assert.equal(result(t, 1), 64n);
        const a = Buffer.from(t.vm.memory.read(Number(result(t, 2)), 64));
        const b = Buffer.from(t.vm.memory.read(Number(result(t, 3)), 64));
        assert.notDeepEqual(a, Buffer.alloc(64), 'not zeroes');
        assert.notDeepEqual(a, b, 'two reads differ');
        assert.equal(result(t, 4), BigInt(RNG_MAX_BYTES_PER_REQUEST), 'one request gets at most the cap');
      },
    );
  });

  test('features: an unknown bit or a missing VERSION_1 leaves FEATURES_OK clear', async () => {
    const t = virtioTestVm([{ kind: 'rng', options: {} }]);
    await runDriver(
      t,
      `void kit_main(void) {
        struct vdev d;
        vdev_find(&d, SLOT0);
        RESULT(0) = vdev_negotiate(&d, ${WANT});
        /* Write a feature the device never offered. */
        wr8(d.common + VCOMMON_STATUS, 0);
        wr8(d.common + VCOMMON_STATUS, 3);
        wr32(d.common + VCOMMON_GFSELECT, 1); wr32(d.common + VCOMMON_GF, 1 | (1 << 18));
        wr8(d.common + VCOMMON_STATUS, 0xb);
        RESULT(1) = vdev_status(&d);
        RESULT(2) = vdev_negotiate(&d, 1ULL << VIRTIO_F_INDIRECT_DESC);
        RESULT(3) = rd16(d.common + VCOMMON_NUMQ);
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 0xbn, 'accepted');
        assert.equal(result(t, 1), 0x3n, 'unknown feature refused');
        assert.equal(result(t, 2), 0x3n, 'VERSION_1 is required');
        assert.equal(result(t, 3), 1n, 'one queue');
      },
    );
  });

  test('MSI-X: a masked vector stays pending in the PBA and arrives on unmask; without MSI-X the ISR says why', async () => {
    const t = virtioTestVm([{ kind: 'rng', options: {} }]);
    await runDriver(
      t,
      `void kit_main(void) {
        struct vdev d; struct vq q;
        vdev_find(&d, SLOT0);
        vdev_negotiate(&d, ${WANT});
        lapic_enable();
        vdev_msix_enable(&d);
        vdev_msix_route(&d, 0, 0x51, 1);
        vq_setup(&d, &q, 0, 8, 0);
        vdev_driver_ok(&d);
        u64 a = kit_alloc(16);
        struct vbuf x = { a, 16, 1 };
        vq_add(&q, &x, 1, 0); vq_kick(&q); vq_wait(&q, 0, 100000000);
        RESULT(0) = lapic_wait(0x51, 20000);
        u32 pba = 0x5000;
        RESULT(1) = rd32(d.bar + pba) & 1;
        wr32(d.msix_table + 12, 0);
        RESULT(2) = lapic_wait(0x51, 1000000);
        RESULT(3) = rd32(d.bar + pba) & 1;
        /* A vector number past the table reads back as NO_VECTOR. */
        wr16(d.common + VCOMMON_MSIX, 7);
        RESULT(4) = rd16(d.common + VCOMMON_MSIX);
        /* INTx: MSI-X off, the ISR's queue bit is set, and reading it clears it. */
        pci_wr16(d.slot, d.msix_cap + 2, 0);
        vq_set_used_event(&q, q.last_used); /* EVENT_IDX: interrupt for the next one */
        vq_add(&q, &x, 1, 0); vq_kick(&q); vq_wait(&q, 0, 100000000);
        RESULT(5) = rd8(d.isr);
        RESULT(6) = rd8(d.isr);
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 0n, 'masked: not delivered');
        assert.equal(result(t, 1), 1n, 'masked: pending bit set');
        assert.equal(result(t, 2), 1n, 'unmasked: delivered');
        assert.equal(result(t, 3), 0n, 'pending bit cleared');
        assert.equal(result(t, 4), 0xffffn, 'NO_VECTOR');
        assert.equal(result(t, 5), 1n, 'ISR: queue interrupt');
        assert.equal(result(t, 6), 0n, 'ISR cleared by the read');
      },
    );
  });

  test('a looping chain and a bad queue put one device in NEEDS_RESET; after a reset it works, and the other device never stopped', async () => {
    const disk = blkDisk();
    const logged: string[] = [];
    const t = virtioTestVm(
      [
        { kind: 'blk', options: disk.options },
        { kind: 'rng', options: {} },
      ],
      undefined,
      (line) => logged.push(line),
    );
    t.vm.adoptFd(disk.fd);
    await runDriver(
      t,
      `#include "blk.h"
      static int read_ok(struct vdev *d, struct vq *q) {
        u64 buf = kit_alloc(512);
        return blk_io(q, VIRTIO_BLK_T_IN, 0, buf, 512, 1, 0, 0) == 0 && rd8(buf) == 0x5a;
      }
      void kit_main(void) {
        struct vdev d, e; struct vq q, rq;
        vdev_find(&d, SLOT0); vdev_find(&e, SLOT1);
        vdev_negotiate(&e, ${WANT}); vq_setup(&e, &rq, 0, 8, VIRTIO_MSI_NO_VECTOR); vdev_driver_ok(&e);
        lapic_enable();
        vdev_negotiate(&d, ${WANT});
        vdev_msix_enable(&d);
        vdev_msix_route(&d, 1, 0x61, 0);
        wr16(d.common + VCOMMON_MSIX, 1);
        vq_setup(&d, &q, 0, 16, VIRTIO_MSI_NO_VECTOR);
        vdev_driver_ok(&d);
        /* Descriptor 0 -> 1 -> 0: a loop. */
        struct virtq_desc *t0 = vq_desc(&q, 0), *t1 = vq_desc(&q, 1);
        t0->addr = kit_alloc(64); t0->len = 16; t0->flags = VIRTQ_DESC_F_NEXT; t0->next = 1;
        t1->addr = t0->addr; t1->len = 16; t1->flags = VIRTQ_DESC_F_NEXT; t1->next = 0;
        wr16(q.avail + 4, 0); barrier(); wr16(q.avail + 2, 1); vq_kick(&q);
        long spins = 100000000;
        while (!(vdev_status(&d) & VIRTIO_STATUS_NEEDS_RESET) && spins-- > 0) {}
        RESULT(0) = vdev_status(&d);
        RESULT(1) = lapic_wait(0x61, 1000000);
        /* The entropy device still answers. */
        u64 a = kit_alloc(16); struct vbuf x = { a, 16, 1 };
        vq_add(&rq, &x, 1, 0); vq_kick(&rq); RESULT(2) = vq_wait(&rq, 0, 100000000) >= 0;
        /* Reset and start over: the disk reads again. */
        vdev_negotiate(&d, ${WANT});
        vq_setup(&d, &q, 0, 16, VIRTIO_MSI_NO_VECTOR);
        vdev_driver_ok(&d);
        RESULT(3) = vdev_status(&d);
        RESULT(4) = read_ok(&d, &q);
        /* A queue size that is not a power of two is refused when enabled. */
        vdev_negotiate(&d, ${WANT});
        wr16(d.common + VCOMMON_Q_SELECT, 0);
        wr16(d.common + VCOMMON_Q_SIZE, 3);
        wr16(d.common + VCOMMON_Q_ENABLE, 1);
        RESULT(5) = rd16(d.common + VCOMMON_Q_ENABLE);
        RESULT(6) = vdev_status(&d);
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(Number(result(t, 0)) & 0x40, 0x40, 'NEEDS_RESET set');
        assert.equal(result(t, 1), 1n, 'configuration-change vector raised');
        assert.equal(result(t, 2), 1n, 'rng kept working');
        assert.equal(result(t, 3), 0xfn, 'reset cleared NEEDS_RESET');
        assert.equal(result(t, 4), 1n, 'the disk reads after the reset');
        assert.equal(result(t, 5), 0n, 'bad queue not enabled');
        assert.equal(Number(result(t, 6)) & 0x40, 0x40, 'bad queue: NEEDS_RESET');
      },
    );
    // Both threads' lines reached the VM's one log sink, named by device (I/O thread: the ring; vCPU thread: the queue layout).
    assert.ok(
      logged.some((l) => /^virtio0: virtio-blk: .*the device needs a reset/.test(l)),
      logged.join('\n'),
    );
    assert.ok(
      logged.some((l) => /^virtio0: virtio-blk: queue \d: .*the device needs a reset/.test(l)),
      logged.join('\n'),
    );
  });

  test('a BAR the guest moves is followed: registers and kicks work at the new address', async () => {
    const t = virtioTestVm([{ kind: 'rng', options: {} }]);
    await runDriver(
      t,
      `void kit_main(void) {
        struct vdev d; struct vq q;
        vdev_find(&d, SLOT0);
        u64 old = d.bar;
        /* Memory decoding off, BAR 0 to the top of the window, decoding on again. */
        pci_wr16(d.slot, 0x04, 0);
        pci_wr32(d.slot, 0x10, NEW_BAR);
        pci_wr16(d.slot, 0x04, 0x6);
        vdev_find(&d, SLOT0);
        RESULT(0) = d.bar;
        RESULT(1) = rd32(old + VCOMMON_DF) ;        /* nothing there any more */
        if (!(vdev_negotiate(&d, ${WANT}) & VIRTIO_STATUS_FEATURES_OK) || vq_setup(&d, &q, 0, 8, VIRTIO_MSI_NO_VECTOR)) kit_exit(3);
        vdev_driver_ok(&d);
        u64 a = kit_alloc(32); struct vbuf x = { a, 32, 1 }; u32 len = 0;
        vq_add(&q, &x, 1, 0); vq_kick(&q);
        RESULT(2) = vq_wait(&q, &len, 100000000) >= 0 ? len : 0;
        kit_exit(0);
      }`,
      { NEW_BAR: 0xcfff8000 },
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 0xcfff8000n, 'the BAR reads back where the guest put it');
        assert.equal(result(t, 1), 0xffffffffn, 'the old address decodes nothing');
        assert.equal(result(t, 2), 32n, 'a request through the moved notify address');
        const rec = t.devices[0]!.state.transportRecord(0);
        assert.equal(
          rec.getUint32(QUEUE_TRANSPORT.eventfdAddr, true),
          0xcfff8000 + VIRTIO_BAR.notify,
          'the ioeventfd moved with the BAR',
        );
      },
    );
  });

  test('fuzz from the guest: random rings and registers never stop the VMM; the device works after a reset', async () => {
    const t = virtioTestVm([
      { kind: 'rng', options: {} },
      { kind: 'rng', options: {} },
    ]);
    await runDriver(
      t,
      `static u64 s = 0x1234567887654321ULL;
      static u64 rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
      void kit_main(void) {
        struct vdev d, e; struct vq q, eq;
        vdev_find(&d, SLOT0); vdev_find(&e, SLOT1);
        vdev_negotiate(&e, ${WANT}); vq_setup(&e, &eq, 0, 8, VIRTIO_MSI_NO_VECTOR); vdev_driver_ok(&e);
        u64 resets = 0;
        for (int round = 0; round < 300; round++) {
          if (vdev_status(&d) & VIRTIO_STATUS_NEEDS_RESET || round % 50 == 0) {
            resets++;
            vdev_negotiate(&d, ${WANT} | (1ULL << VIRTIO_F_EVENT_IDX));
            vq_setup(&d, &q, 0, 16, VIRTIO_MSI_NO_VECTOR);
            vdev_driver_ok(&d);
          }
          /* Random descriptors (addresses mostly in RAM, sometimes anywhere), random avail entries. */
          for (int i = 0; i < 16; i++) {
            struct virtq_desc *x = vq_desc(&q, i);
            x->addr = (rnd() & 3) ? (rnd() % (60ULL << 20)) : rnd();
            x->len = (rnd() & 3) ? (u32)(rnd() % 8192) : (u32)rnd();
            x->flags = rnd() & 7;
            x->next = (rnd() & 3) ? (u16)(rnd() % 16) : (u16)rnd();
          }
          u16 idx = rd16(q.avail + 2);
          int n = 1 + rnd() % 4;
          for (int i = 0; i < n; i++) wr16(q.avail + 4 + 2 * ((idx + i) % 16), (rnd() & 7) ? rnd() % 16 : (u16)rnd());
          barrier();
          wr16(q.avail + 2, (rnd() % 8) ? idx + n : (u16)rnd());
          vq_kick(&q);
          /* Random writes to the common configuration, now and then. */
          if (rnd() % 10 == 0) wr16(d.common + (rnd() % 0x3c & ~1), (u16)rnd());
          for (volatile int w = 0; w < 2000; w++) {}
        }
        RESULT(0) = resets;
        /* The other device served throughout; this one works after a clean reset. */
        u64 a = kit_alloc(16); struct vbuf x = { a, 16, 1 };
        vq_add(&eq, &x, 1, 0); vq_kick(&eq); RESULT(1) = vq_wait(&eq, 0, 100000000) >= 0;
        vdev_negotiate(&d, ${WANT}); vq_setup(&d, &q, 0, 16, VIRTIO_MSI_NO_VECTOR); vdev_driver_ok(&d);
        vq_add(&q, &x, 1, 0); vq_kick(&q); RESULT(2) = vq_wait(&q, 0, 100000000) >= 0;
        kit_exit(0);
      }`,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.ok(
          result(t, 0) > 6n,
          `the fuzzer drove the device into NEEDS_RESET repeatedly (${result(t, 0)} resets)`,
        );
        assert.equal(result(t, 1), 1n, 'the other device kept working');
        assert.equal(result(t, 2), 1n, 'the fuzzed device works after a reset');
      },
    );
  });

  test(
    'lspci -F decodes the virtio capabilities and MSI-X of every virtio device type',
    { skip: toolAvailable('lspci', '--version') ? false : 'needs lspci (apt-get install pciutils)' },
    async () => {
      const disk = blkDisk();
      // Configuration space only: no VM runs, so the host ends need not be live.
      const kinds: Array<{ device: VirtioDeviceConfig; id: number; vectors: number }> = [
        { device: { kind: 'blk', options: disk.options }, id: 0x1042, vectors: 2 },
        {
          device: { kind: 'net', options: { fd: -1, mac: '06:00:00:00:00:07', backend: 'tap' } },
          id: 0x1041,
          vectors: 3,
        },
        { device: { kind: 'console', options: {} }, id: 0x1043, vectors: 3 },
        { device: { kind: 'rng', options: {} }, id: 0x1044, vectors: 2 },
        { device: { kind: 'balloon', options: { targetPages: 0, deflateOnOom: false } }, id: 0x1045, vectors: 5 },
        {
          device: { kind: 'vsock', options: { guestCid: 3, udsPath: '/nonexistent', listenFd: -1 } },
          id: 0x1053,
          vectors: 4,
        },
      ];
      const t = virtioTestVm(kinds.map((k) => k.device));
      t.vm.adoptFd(disk.fd);
      try {
        const dir = tempDir();
        const lines: string[] = [];
        for (const dev of t.devices) {
          const dump = [...t.pci.root.dump(dev.slot, 256)];
          lines.push(`00:${dev.slot.toString(16).padStart(2, '0')}.0 Unknown device`);
          for (let i = 0; i < 256; i += 16)
            lines.push(
              `${i.toString(16).padStart(2, '0')}: ${dump
                .slice(i, i + 16)
                .map((b) => b.toString(16).padStart(2, '0'))
                .join(' ')}`,
            );
          lines.push('');
        }
        writeFileSync(join(dir, 'dump'), `${lines.join('\n')}\n`);
        const out = execFileSync('lspci', ['-F', join(dir, 'dump'), '-vvv', '-nn'], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'ignore'],
        });
        const sections = out.split(/\n(?=00:)/);
        assert.equal(sections.length, kinds.length, 'one function per device');
        kinds.forEach((k, i) => {
          const sec = sections[i]!;
          const dev = t.devices[i]!;
          assert.match(sec, new RegExp(`\\[1af4:${k.id.toString(16)}\\]`), `${k.device.kind}: modern virtio device ID`);
          assert.match(
            sec,
            new RegExp(
              `Region 0: Memory at ${dev.barAddress.toString(16)} \\(32-bit, non-prefetchable\\) \\[disabled\\]`,
            ),
            `${k.device.kind}: BAR 0 (memory decoding off until a driver enables it)`,
          );
          for (const cfg of ['CommonCfg', 'ISR', 'DeviceCfg', 'Notify'])
            assert.match(sec, new RegExp(`VirtIO: ${cfg}`), `${k.device.kind}: ${cfg}`);
          assert.match(
            sec,
            new RegExp(`MSI-X: Enable- Count=${k.vectors} Masked-`),
            `${k.device.kind}: one vector per queue + config`,
          );
          assert.match(sec, /Vector table: BAR=0 offset=00004000/);
          assert.match(sec, /PBA: BAR=0 offset=00005000/);
          assert.match(sec, /Interrupt: pin A/);
        });
      } finally {
        await t.vm.destroy();
      }
    },
  );
});
