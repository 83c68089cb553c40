// The balloon's metrics counters (Firecracker's `balloon` group), driven through the
// device with no VM (fake-driver.ts): each buffer the driver sends on the inflate,
// deflate, statistics and free-page-reporting queues is counted once, on the I/O thread.
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { BALLOON_COUNTERS, DeviceCounters } from '../../src/virtio/counters.js';
import { FakeDevice } from './fake-driver.js';

const INFLATE = 0;
const DEFLATE = 1;
const STATS = 2;
const REPORTING = 3;

const pfns = (...n: number[]) => {
  const b = Buffer.alloc(4 * n.length);
  n.forEach((pfn, i) => b.writeUInt32LE(pfn, 4 * i));
  return b;
};

test("the balloon counts the driver's inflate, deflate, statistics and free-page-report buffers", () => {
  const counters = new DeviceCounters(BALLOON_COUNTERS);
  const dev = new FakeDevice({
    kind: 'balloon',
    options: { targetPages: 0, deflateOnOom: false, counters: counters.shared },
  });
  after(() => dev.close());
  assert.equal(dev.queues, 4, 'statistics and free page reporting were negotiated');
  for (let i = 0; i < 3; i++) dev.offer(INFLATE, [{ read: pfns(0x300 + 2 * i, 0x301 + 2 * i) }]);
  dev.notify(INFLATE);
  dev.offer(DEFLATE, [{ read: pfns(0x300, 0x301) }]);
  dev.notify(DEFLATE);
  // One statistic (tag 4, free memory), as a driver sends them.
  const stat = Buffer.alloc(10);
  stat.writeUInt16LE(4, 0);
  stat.writeBigUInt64LE(123n << 20n, 2);
  dev.offer(STATS, [{ read: stat }]);
  dev.notify(STATS);
  dev.offer(REPORTING, [{ write: 4096 }]);
  dev.offer(REPORTING, [{ write: 4096 }]);
  dev.notify(REPORTING);
  assert.equal(dev.used(INFLATE).length, 3);
  assert.deepEqual(counters.read(), {
    inflate_count: 3,
    deflate_count: 1,
    stats_updates_count: 1,
    free_page_report_count: 2,
    free_page_hint_count: 0,
    free_page_hint_freed: 0,
  });
});
