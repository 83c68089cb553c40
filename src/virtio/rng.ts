// virtio-rng (virtio 1.2, 5.4): fills every device-writable buffer the driver offers
// with bytes from the host's getrandom(2).
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import type { VirtioBackend, VirtioDeviceType, VirtioQueues } from './device.js';
import type { DescriptorChain } from './queue.js';
import { chainBytes, drainLimited, SharedRateLimiter } from './rate-limiter.js';

/** The entropy device's options: its rate limiter, if any. */
export interface RngOptions {
  readonly limiter?: SharedArrayBuffer;
}

export const rngType: VirtioDeviceType<RngOptions> = {
  deviceId: 4,
  name: 'rng',
  maxQueueSize: 256,
  queues: () => 1,
  features: () => 0n,
  configBytes: () => 0,
  initConfig: () => undefined,
};

/**
 * The most one request gets (virtio 1.2, 5.4.6.1: the device may fill less than the
 * buffer). Without a cap a guest could ask for terabytes in one descriptor chain and hold
 * the I/O thread, and every other device of the VM, for hours.
 */
export const RNG_MAX_BYTES_PER_REQUEST = 64 * 1024;
/** Requests served per I/O-thread turn; the rest after the other devices' ready work. */
const RNG_REQUESTS_PER_TURN = 64;

export class RngBackend implements VirtioBackend {
  private readonly limiter: SharedRateLimiter | null;

  constructor(
    private readonly rt: VirtioQueues,
    options: RngOptions = {},
  ) {
    this.limiter = options.limiter ? new SharedRateLimiter(options.limiter) : null;
  }

  queueNotified(q: number): void {
    if (this.limiter?.active) {
      const bytesOf = (chain: DescriptorChain) => Math.min(chainBytes(chain, true), RNG_MAX_BYTES_PER_REQUEST);
      if (drainLimited(this.rt, q, this.limiter, bytesOf, (chain) => this.fill(chain), RNG_REQUESTS_PER_TURN) > 0)
        this.rt.notifyUsed(q);
      return;
    }
    const queue = this.rt.queue(q);
    const done = queue.drain(this.rt.chain, (chain) => this.fill(chain), RNG_REQUESTS_PER_TURN);
    if (done > 0) this.rt.notifyUsed(q);
    if (queue.leftOver) this.rt.kickLater(q);
  }

  /** One request: up to RNG_MAX_BYTES_PER_REQUEST of its writable bytes filled from getrandom. */
  private fill(chain: DescriptorChain): void {
    let filled = 0;
    for (let i = 0; i < chain.count; i++) {
      if (!chain.writable[i] || filled >= RNG_MAX_BYTES_PER_REQUEST) continue;
      const bytes = this.rt.mem.regionBytes(chain.region[i]!);
      const len = Math.min(chain.length[i]!, RNG_MAX_BYTES_PER_REQUEST - filled);
      this.rt.mem.markWritten(chain.region[i]!, chain.offset[i]!, len);
      for (let got = 0; got < len;) {
        const n = libc.getrandom(bytes.subarray(chain.offset[i]! + got, chain.offset[i]! + len), len - got, 0);
        if (n < 0) {
          if (libc.errno() === libc.EINTR) continue;
          throw new KilnError(`getrandom failed: ${libc.errnoName(libc.errno())}`);
        }
        got += n;
      }
      // Again once written: a live migration's pre-copy may have taken the first mark.
      this.rt.mem.markWritten(chain.region[i]!, chain.offset[i]!, len);
      filled += len;
    }
    this.rt.queue(0).push(chain.head, filled);
  }
}
