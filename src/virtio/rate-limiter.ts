// Firecracker's rate limiters: two token buckets, one counting bytes (bandwidth) and one
// counting requests or frames (ops). A bucket holds up to `size` tokens and refills
// `size` tokens every `refillTimeMs`, evenly; `oneTimeBurst` tokens more are there at the
// start and never come back. A request larger than the bucket passes when the bucket is
// full and leaves it in debt, so the average rate still holds. A device whose request
// does not pass leaves it in the ring and asks the I/O thread to wake it when it would
// (`waitMs`); the guest sees slower I/O, never an error.
//
// The configuration lives in shared memory (`RateLimiterCells`): the API thread writes a
// new one (PATCH /drives, PATCH /network-interfaces) and bumps a sequence; the device
// sees it at its next request. The throttled-event count lives there too, for the metrics.
import type { DescriptorChain, SplitQueue } from './queue.js';

export interface BucketConfig {
  /** Tokens the bucket holds (bytes or operations); 0 turns the bucket off. */
  readonly size: number;
  /** Tokens more at the start, spent first and never refilled. */
  readonly oneTimeBurst?: number | undefined;
  /** Milliseconds to refill a whole bucket; 0 turns the bucket off. */
  readonly refillTimeMs: number;
}

export interface RateLimiterConfig {
  readonly bandwidth?: BucketConfig | undefined;
  readonly ops?: BucketConfig | undefined;
}

class TokenBucket {
  private tokens: number;
  private burst: number;
  private last: number;

  constructor(
    private readonly config: BucketConfig,
    now: number,
  ) {
    this.tokens = config.size;
    this.burst = config.oneTimeBurst ?? 0;
    this.last = now;
  }

  private refill(now: number): void {
    const elapsed = now - this.last;
    this.last = now;
    if (elapsed > 0)
      this.tokens = Math.min(this.config.size, this.tokens + (this.config.size * elapsed) / this.config.refillTimeMs);
  }

  /** Whether `n` tokens are there now (without taking them). */
  can(n: number, now: number): boolean {
    this.refill(now);
    if (this.burst >= n) return true;
    const need = n - this.burst;
    // Larger than the bucket: passes when the bucket is full, leaving it in debt.
    return need > this.config.size ? this.tokens >= this.config.size : this.tokens >= need;
  }

  take(n: number): void {
    const fromBurst = Math.min(this.burst, n);
    this.burst -= fromBurst;
    this.tokens -= n - fromBurst;
  }

  /** Milliseconds until `n` tokens would pass. */
  waitMs(n: number, now: number): number {
    this.refill(now);
    const need = Math.min(Math.max(0, n - this.burst), this.config.size);
    return Math.max(0, ((need - this.tokens) * this.config.refillTimeMs) / this.config.size);
  }
}

const active = (b: BucketConfig | undefined): b is BucketConfig => !!b && b.size > 0 && b.refillTimeMs > 0;

/** One device direction's limiter (a drive, a NIC's rx or tx, the entropy device). */
export class RateLimiter {
  private bandwidth: TokenBucket | null = null;
  private ops: TokenBucket | null = null;

  constructor(
    config: RateLimiterConfig = {},
    private readonly now: () => number = () => performance.now(),
  ) {
    this.configure(config);
  }

  configure(config: RateLimiterConfig): void {
    const t = this.now();
    this.bandwidth = active(config.bandwidth) ? new TokenBucket(config.bandwidth, t) : null;
    this.ops = active(config.ops) ? new TokenBucket(config.ops, t) : null;
  }

  get limited(): boolean {
    return this.bandwidth !== null || this.ops !== null;
  }

  /** Takes `bytes` and one operation if both buckets have them; false (taking nothing) if not. */
  consume(bytes: number): boolean {
    if (!this.limited) return true;
    const t = this.now();
    if (this.bandwidth && !this.bandwidth.can(bytes, t)) return false;
    if (this.ops && !this.ops.can(1, t)) return false;
    this.bandwidth?.take(bytes);
    this.ops?.take(1);
    return true;
  }

  /** Milliseconds until consume(bytes) would pass (at least 1). */
  waitMs(bytes: number): number {
    const t = this.now();
    return Math.max(1, Math.ceil(Math.max(this.bandwidth?.waitMs(bytes, t) ?? 0, this.ops?.waitMs(1, t) ?? 0)));
  }
}

// Shared layout: Int32 [0] a sequence (odd while the API thread writes), [1] the
// throttled-event count; then Float64 from byte 8: the bandwidth bucket (size, burst,
// refill ms) and the ops bucket (the same).
const SEQ = 0;
const THROTTLED = 1;
const BW = 0;
const OPS = 3;
const BYTES = 8 + 6 * 8;

/** A rate limiter's configuration and counter in shared memory, as the API thread and the device see it. */
export class RateLimiterCells {
  private readonly words: Int32Array;
  private readonly values: Float64Array;
  private seen = 0;

  constructor(readonly shared: SharedArrayBuffer = new SharedArrayBuffer(BYTES)) {
    this.words = new Int32Array(shared, 0, 2);
    this.values = new Float64Array(shared, 8, 6);
  }

  /** The API thread: a new configuration, seen by the device at its next request. */
  write(config: RateLimiterConfig | undefined): void {
    const put = (at: number, b: BucketConfig | undefined) => {
      this.values[at] = b?.size ?? 0;
      this.values[at + 1] = b?.oneTimeBurst ?? 0;
      this.values[at + 2] = b?.refillTimeMs ?? 0;
    };
    Atomics.add(this.words, SEQ, 1);
    put(BW, config?.bandwidth);
    put(OPS, config?.ops);
    Atomics.add(this.words, SEQ, 1);
  }

  /** The device: the configuration when it changed since the last call (and is not being written), else null. */
  changed(): RateLimiterConfig | null {
    const seq = Atomics.load(this.words, SEQ);
    if (seq === this.seen || seq % 2 !== 0) return null;
    const get = (at: number): BucketConfig => ({
      size: this.values[at]!,
      oneTimeBurst: this.values[at + 1]!,
      refillTimeMs: this.values[at + 2]!,
    });
    const config = { bandwidth: get(BW), ops: get(OPS) };
    if (Atomics.load(this.words, SEQ) !== seq) return null;
    this.seen = seq;
    return config;
  }

  countThrottled(): void {
    Atomics.add(this.words, THROTTLED, 1);
  }

  /** Requests or frames held back by the limiter so far. */
  get throttled(): number {
    return Atomics.load(this.words, THROTTLED);
  }
}

/** A device's limiter following its shared cells: reconfigured when the API changes them. */
export class SharedRateLimiter {
  private readonly limiter = new RateLimiter();
  private readonly cells: RateLimiterCells;

  constructor(shared: SharedArrayBuffer) {
    this.cells = new RateLimiterCells(shared);
  }

  /** Takes a configuration the API thread wrote since the last look. */
  private refresh(): void {
    const config = this.cells.changed();
    if (config) this.limiter.configure(config);
  }

  /** Whether the limiter limits anything now (after taking any new configuration): devices skip it when not. */
  get active(): boolean {
    this.refresh();
    return this.limiter.limited;
  }

  /** consume(), after taking any new configuration; a refusal is counted. */
  consume(bytes: number): boolean {
    this.refresh();
    if (this.limiter.consume(bytes)) return true;
    this.cells.countThrottled();
    return false;
  }

  waitMs(bytes: number): number {
    return this.limiter.waitMs(bytes);
  }
}

/** The parts of a device's queue access drainLimited needs (VirtioQueues has them). */
interface LimitedQueues {
  readonly chain: DescriptorChain;
  queue(q: number): SplitQueue;
  kickLater(q: number): void;
  kickAfter(q: number, ms: number): void;
}

/**
 * Serves queue `q` as SplitQueue.drain does, each request first passing `limiter` with
 * the size `bytesOf` gives it: a request the limiter holds back stays in the ring, and
 * the queue is woken again when it would pass. Returns how many requests were served.
 */
export function drainLimited(
  rt: LimitedQueues,
  q: number,
  limiter: SharedRateLimiter,
  bytesOf: (chain: DescriptorChain) => number,
  handle: (chain: DescriptorChain) => void,
  budget: number,
): number {
  const queue = rt.queue(q);
  const chain = rt.chain;
  let done = 0;
  while (done < budget && queue.peek(chain)) {
    const bytes = bytesOf(chain);
    if (!limiter.consume(bytes)) {
      rt.kickAfter(q, limiter.waitMs(bytes));
      return done;
    }
    if (!queue.pop(chain)) break;
    handle(chain);
    done++;
  }
  if (done >= budget && queue.pending() > 0) rt.kickLater(q);
  return done;
}

/** The bytes of a chain's buffers of one direction (the device-writable ones or the others). */
export function chainBytes(chain: DescriptorChain, writable: boolean): number {
  let n = 0;
  for (let i = 0; i < chain.count; i++) if ((chain.writable[i] === 1) === writable) n += chain.length[i]!;
  return n;
}
