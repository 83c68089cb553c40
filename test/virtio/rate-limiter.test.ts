// Rate limiters: the token buckets on a fake clock, then the devices that use them
// (virtio-rng, virtio-blk, virtio-net's tx and rx) driven by a fake driver: a request
// the limiter holds back stays in the ring, the queue is woken when it would pass, a
// change of configuration (PATCH) takes effect at the next request, and throttled
// events are counted for the metrics.
import assert from 'node:assert/strict';
import { openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import * as libc from '../../src/kvm/libc.js';
import { blkOptions, VIRTIO_BLK_T_IN } from '../../src/virtio/blk.js';
import { VIRTIO_NET_HDR_BYTES } from '../../src/virtio/net.js';
import { RateLimiter, RateLimiterCells } from '../../src/virtio/rate-limiter.js';
import { BLK_COUNTERS, DeviceCounters } from '../../src/virtio/counters.js';
import { tempDir } from '../helpers.js';
import { FakeDevice } from './fake-driver.js';

describe('token buckets', () => {
  test('bandwidth: a full bucket, then its refill rate; the wait is how long the refill takes', () => {
    let now = 0;
    const l = new RateLimiter({ bandwidth: { size: 1000, refillTimeMs: 100 } }, () => now);
    assert.ok(l.consume(600));
    assert.ok(!l.consume(600), 'only 400 left');
    assert.equal(l.waitMs(600), 20, '200 tokens more at 10 per ms');
    now += 20;
    assert.ok(l.consume(600));
    now += 1000;
    assert.ok(l.consume(1000), 'refilled to the size, not beyond');
    assert.ok(!l.consume(1));
  });

  test('ops, one_time_burst, and a request larger than the bucket (passes when full, leaves a debt)', () => {
    let now = 0;
    const ops = new RateLimiter({ ops: { size: 2, refillTimeMs: 1000 } }, () => now);
    assert.ok(ops.consume(1e9) && ops.consume(0));
    assert.ok(!ops.consume(0), 'two operations per second');
    now += 500;
    assert.ok(ops.consume(0));
    const burst = new RateLimiter({ bandwidth: { size: 100, oneTimeBurst: 500, refillTimeMs: 1000 } }, () => now);
    assert.ok(burst.consume(500), 'the burst first');
    assert.ok(burst.consume(100) && !burst.consume(1), 'then the bucket; the burst never comes back');
    const big = new RateLimiter({ bandwidth: { size: 100, refillTimeMs: 100 } }, () => now);
    assert.ok(big.consume(300), 'larger than the bucket, the bucket full: passes');
    now += 100;
    assert.ok(!big.consume(1), 'the debt (200) is paid first');
    now += 200;
    assert.ok(big.consume(1));
    const off = new RateLimiter({ bandwidth: { size: 0, refillTimeMs: 100 }, ops: { size: 5, refillTimeMs: 0 } });
    assert.equal(off.limited, false, 'size or refill_time 0 turns a bucket off');
  });

  test('shared cells: a new configuration is seen once, whole; throttled events are counted', () => {
    const writer = new RateLimiterCells();
    const reader = new RateLimiterCells(writer.shared);
    writer.write({ bandwidth: { size: 10, oneTimeBurst: 5, refillTimeMs: 7 } });
    assert.deepEqual(reader.changed(), {
      bandwidth: { size: 10, oneTimeBurst: 5, refillTimeMs: 7 },
      ops: { size: 0, oneTimeBurst: 0, refillTimeMs: 0 },
    });
    assert.equal(reader.changed(), null, 'nothing new');
    reader.countThrottled();
    reader.countThrottled();
    assert.equal(writer.throttled, 2);
  });
});

describe('rate-limited devices', () => {
  test('virtio-rng: requests past the bandwidth wait in the ring and are woken when the bucket has refilled; PATCH lifts it', async () => {
    const cells = new RateLimiterCells();
    cells.write({ bandwidth: { size: 4096, refillTimeMs: 400 } });
    const dev = new FakeDevice({ kind: 'rng', options: { limiter: cells.shared } });
    after(() => dev.close());
    for (let i = 0; i < 4; i++) dev.offer(0, [{ write: 2048 }]);
    dev.notify(0);
    assert.equal(dev.used(0).length, 2, 'the bucket held two requests');
    assert.equal(dev.timedKicks.length, 1, 'the queue asked to be woken later');
    assert.ok(dev.timedKicks[0]!.ms >= 150 && dev.timedKicks[0]!.ms <= 210, `wait ${dev.timedKicks[0]!.ms} ms`);
    assert.equal(cells.throttled, 1);
    dev.notify(0);
    assert.equal(dev.used(0).length, 0, 'a kick before the refill serves nothing');
    await sleep(dev.timedKicks.at(-1)!.ms + 20);
    dev.notify(0);
    assert.equal(dev.used(0).length, 1, 'woken when the bucket allows the next one');
    cells.write(undefined);
    dev.notify(0);
    assert.equal(dev.used(0).length, 1, 'no limiter any more: the rest at once');
  });

  test('virtio-blk: the drive limiter counts each request once, by its data bytes', () => {
    const dir = tempDir();
    const path = join(dir, 'disk.img');
    writeFileSync(path, Buffer.alloc(1 << 20));
    const fd = openSync(path, 'r+');
    const cells = new RateLimiterCells();
    cells.write({ bandwidth: { size: 8192, refillTimeMs: 3_600_000 }, ops: { size: 100, refillTimeMs: 3_600_000 } });
    const counters = new DeviceCounters(BLK_COUNTERS);
    const dev = new FakeDevice({
      kind: 'blk',
      options: { ...blkOptions(fd, path, false, 'rl'), limiter: cells.shared, counters: counters.shared },
    });
    after(() => {
      dev.close();
      libc.close(fd);
    });
    const header = (sector: number) => {
      const h = Buffer.alloc(16);
      h.writeUInt32LE(VIRTIO_BLK_T_IN, 0);
      h.writeBigUInt64LE(BigInt(sector), 8);
      return h;
    };
    for (let i = 0; i < 3; i++) dev.offer(0, [{ read: header(i * 8) }, { write: 4096 }, { write: 1 }]);
    dev.notify(0);
    const used = dev.used(0);
    assert.equal(used.length, 2, '8192 bytes: two 4 KiB reads');
    assert.equal(dev.timedKicks.length, 1);
    assert.equal(cells.throttled, 1);
    assert.deepEqual(
      counters.read(),
      { read_count: 2, write_count: 0, read_bytes: 8192, write_bytes: 0, flush_count: 0 },
      "the metrics' block counters",
    );
  });

  test('virtio-net: tx frames past the ops bucket wait in the ring; rx frames past it are held and the host end is not read', () => {
    const sv = new Int32Array(2);
    assert.equal(libc.socketpair(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC, 0, sv), 0);
    const [kilnEnd, passtEnd] = [sv[0]!, sv[1]!];
    const rx = new RateLimiterCells();
    const tx = new RateLimiterCells();
    rx.write({ ops: { size: 1, refillTimeMs: 3_600_000 } });
    tx.write({ ops: { size: 2, refillTimeMs: 3_600_000 } });
    const dev = new FakeDevice({
      kind: 'net',
      options: { fd: kilnEnd, mac: '06:00:00:00:00:01', backend: 'passt', rxLimiter: rx.shared, txLimiter: tx.shared },
    });
    after(() => {
      dev.close();
      libc.close(passtEnd);
    });
    for (let i = 0; i < 5; i++)
      dev.offer(1, [{ read: Buffer.alloc(VIRTIO_NET_HDR_BYTES) }, { read: Buffer.alloc(60, i) }]);
    dev.notify(1);
    assert.equal(dev.used(1).length, 2, 'two frames sent');
    const sent = Buffer.alloc(4096);
    assert.equal(libc.read(passtEnd, sent, sent.length), 2 * 64, 'two [length][frame] records reached the host end');
    assert.equal(tx.throttled, 1);
    // Three frames from the host; the guest has buffers for all of them, the limiter lets one through.
    const record = (fill: number) => {
      const r = Buffer.alloc(4 + 60, fill);
      r.writeUInt32BE(60, 0);
      return r;
    };
    const stream = Buffer.concat([record(1), record(2), record(3)]);
    assert.equal(libc.write(passtEnd, stream, stream.length), stream.length);
    for (let i = 0; i < 4; i++) dev.offer(0, [{ write: 2048 }]);
    dev.notify(0);
    dev.poll(50);
    const got = dev.used(0);
    assert.equal(got.length, 1, 'one frame delivered');
    assert.equal(dev.interestIn(kilnEnd)?.read, false, 'the host end is not read while a frame is held');
    assert.ok(
      dev.timedKicks.some((k) => k.q === 0),
      'the rx queue asked to be woken',
    );
    rx.write(undefined);
    dev.notify(0);
    dev.poll(50);
    assert.equal(dev.used(0).length, 2, 'the held frame and the next once the limiter is lifted');
  });
});
