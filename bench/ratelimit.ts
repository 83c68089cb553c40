// `npm run bench -- ratelimit`: a guest reading a disk through a drive rate limiter of
// 10 MiB/s (Firecracker's bandwidth bucket: size 10 MiB, refill_time 1000 ms), next to
// the same guest without a limiter in the same run. The ring-3 driver in
// guests/bench/blk.c keeps 8 requests of 1 MiB in flight; time is the vCPU's run time
// (the driver polls, so that is wall-clock time). The bucket starts full, so the first
// 10 MiB pass at once: the sustained rate is what came after, over the time it took.
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MiB } from '../src/layout.js';
import { RateLimiterCells } from '../src/virtio/rate-limiter.js';
import { guestRun } from './blk.js';
import { median, type BenchContext } from './util.js';

const LIMIT_MIB_S = 10;
const TOTAL_MIB = 50;

export async function benchRatelimit(ctx: BenchContext): Promise<void> {
  const path = join(ctx.dir, 'disk.img');
  const fd = openSync(path, 'w');
  for (let i = 0; i < 64; i++) writeFileSync(fd, Buffer.alloc(MiB, 0x5a));
  closeSync(fd);
  const sustained: number[] = [];
  const unlimited: number[] = [];
  for (let round = 0; round < 3; round++) {
    const cells = new RateLimiterCells();
    cells.write({ bandwidth: { size: LIMIT_MIB_S * MiB, refillTimeMs: 1000 } });
    const limited = await guestRun(path, 0, MiB, TOTAL_MIB, false, cells.shared);
    const rate = (limited.requests - LIMIT_MIB_S) / limited.seconds;
    sustained.push(rate);
    const free = await guestRun(path, 0, MiB, TOTAL_MIB, false);
    unlimited.push(free.requests / free.seconds);
    ctx.log(
      `round ${round + 1}: limited ${limited.requests} MiB in ${limited.seconds.toFixed(2)} s (sustained ${rate.toFixed(2)} MiB/s, ${cells.throttled} throttled events); unlimited ${unlimited[round]!.toFixed(0)} MiB/s`,
    );
  }
  const s = median(sustained);
  ctx.result(
    `ratelimit limit_mib_s=${LIMIT_MIB_S} sustained_mib_s=${s.toFixed(2)} error_pct=${((100 * (s - LIMIT_MIB_S)) / LIMIT_MIB_S).toFixed(1)} unlimited_mib_s=${median(unlimited).toFixed(0)}`,
  );
}
