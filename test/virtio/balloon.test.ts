// virtio-balloon from a ring-3 driver: pages the guest touched and then gives back
// (inflate) or reports free leave the VMM's memory (its RSS falls by about as much),
// reported pages read back as zeroes, statistics reach the host when it asks, and a new
// target reaches the guest with a configuration change.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { KIT_DATA, MiB } from '../../src/layout.js';
import { balloonControl } from '../../src/platform/virtio.js';
import { kvmSkip } from '../helpers.js';
import { result, runDriver, virtioTestVm } from './harness.js';

const rssBytes = () => Number(readFileSync('/proc/self/statm', 'utf8').split(' ')[1]) * 4096;

const DRIVER = `
#define PHASE(n) do { RESULT(10) = n; while (RESULT(11) != n) __asm__ __volatile__("pause"); } while (0)
#define TOUCH_BYTES (32ULL << 20)
void kit_main(void) {
  struct vdev d; struct vq inflate, deflate, stats, report;
  if (vdev_find(&d, SLOT0)) kit_exit(3);
  if (!(vdev_negotiate(&d, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << 1) | (1ULL << 5)) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(4);
  if (vq_setup(&d, &inflate, 0, 8, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &deflate, 1, 8, VIRTIO_MSI_NO_VECTOR) ||
      vq_setup(&d, &stats, 2, 8, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &report, 3, 8, VIRTIO_MSI_NO_VECTOR)) kit_exit(5);
  vdev_driver_ok(&d);
  /* Statistics first (5.5.6.3): tag 4 = free memory, tag 5 = total memory. */
  u64 st = kit_alloc(64);
  wr16(st, 4); wr64(st + 2, 12345678); wr16(st + 10, 5); wr64(st + 12, 64ULL << 20);
  struct vbuf sb = { st, 20, 0 };
  vq_add(&stats, &sb, 1, 0); vq_kick(&stats);
  /* Touch 32 MiB. */
  u64 mem = kit_alloc(TOUCH_BYTES);
  for (u64 p = 0; p < TOUCH_BYTES; p += 4096) wr8(mem + p, 0xab);
  PHASE(1);
  /* Inflate: hand the first 16 MiB back, as page frame numbers. */
  u64 pfns = kit_alloc(16384);
  int n = (16 << 20) / 4096;
  for (int i = 0; i < n; i++) wr32(pfns + 4 * i, (u32)((mem >> 12) + i));
  struct vbuf ib = { pfns, 4 * n, 0 };
  vq_add(&inflate, &ib, 1, 0); vq_kick(&inflate);
  if (vq_wait(&inflate, 0, 100000000) < 0) kit_exit(6);
  wr32(d.device + 4, n); /* actual */
  PHASE(2);
  /* Free page reporting: the second 16 MiB, as one device-writable buffer. */
  struct vbuf rb = { mem + (16 << 20), 16 << 20, 1 };
  vq_add(&report, &rb, 1, 0); vq_kick(&report);
  if (vq_wait(&report, 0, 100000000) < 0) kit_exit(7);
  RESULT(0) = rd8(mem + (16 << 20)) | ((u64)rd8(mem + TOUCH_BYTES - 4096) << 8);
  PHASE(3);
  /* The host asked for statistics: the device returned our buffer; send fresh ones. */
  if (vq_wait(&stats, 0, 100000000) < 0) kit_exit(8);
  wr64(st + 2, 87654321);
  vq_add(&stats, &sb, 1, 0); vq_kick(&stats);
  /* The host set a new target: num_pages changes and the config generation moves. */
  u8 gen = rd8(d.common + VCOMMON_CFGGEN);
  PHASE(4);
  long spins = 1000000000L;
  while (rd8(d.common + VCOMMON_CFGGEN) == gen && spins-- > 0) {}
  RESULT(1) = rd32(d.device);
  kit_exit(0);
}`;

describe('virtio-balloon', { skip: kvmSkip }, () => {
  test('inflate and free page reporting return memory to the host; statistics and the target travel both ways', async () => {
    const t = virtioTestVm([{ kind: 'balloon', options: { targetPages: 0, deflateOnOom: false } }], 96 * MiB);
    const ctl = balloonControl(t.devices[0]!);
    const rss: number[] = [];
    await runDriver(
      t,
      DRIVER,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 0n, 'reported pages read back as zeroes');
        assert.equal(result(t, 1), 1000n, 'new target seen by the guest');
      },
      async () => {
        const phase = async (n: number) => {
          for (let i = 0; i < 2000 && t.vm.memory.readU64(KIT_DATA + 80) !== BigInt(n); i++) await sleep(5);
          assert.equal(t.vm.memory.readU64(KIT_DATA + 80), BigInt(n), `guest reached phase ${n}`);
        };
        const go = (n: number) => t.vm.memory.writeU64(KIT_DATA + 88, BigInt(n));
        await phase(1);
        rss.push(rssBytes());
        go(1);
        await phase(2);
        rss.push(rssBytes());
        go(2);
        await phase(3);
        rss.push(rssBytes());
        assert.equal(ctl.stat(4), 12345678n, 'free memory statistic');
        assert.equal(ctl.stat(5), 64n << 20n, 'total memory statistic');
        ctl.requestStats();
        go(3);
        for (let i = 0; i < 400 && ctl.stat(4) !== 87654321n; i++) await sleep(5);
        assert.equal(ctl.stat(4), 87654321n, 'fresh statistics after the request');
        await phase(4);
        ctl.setTargetPages(1000);
        go(4);
      },
    );
    const [touched, inflated, reported] = rss as [number, number, number];
    const MiB16 = 16 * MiB;
    assert.ok(
      touched - inflated > MiB16 * 0.9,
      `inflate freed ${((touched - inflated) / MiB).toFixed(1)} MiB of host memory (16 MiB given back)`,
    );
    assert.ok(
      inflated - reported > MiB16 * 0.9,
      `reporting freed ${((inflated - reported) / MiB).toFixed(1)} MiB (16 MiB reported)`,
    );
    assert.equal(ctl.pagesReturned, 8192, 'pages dropped from the mapping');
    assert.equal(ctl.actualPages, 4096, 'actual as the driver wrote it');
  });
});
