// virtio-balloon (virtio 1.2, 5.5): the host asks for a size (num_pages), the guest
// gives pages back (inflate) or takes them again (deflate), sends memory statistics, and
// reports free pages. Pages given back or reported are dropped from the VMM's mapping
// with madvise(MADV_DONTNEED), so their host memory is freed at once (RSS falls) and
// they read as zeroes when the guest touches them again: overcommit is real.
//
// Queues, in Linux's numbering (absent ones take no index): inflate 0, deflate 1, then
// stats (if STATS_VQ was negotiated), then reporting (if PAGE_REPORTING was).
import { array, struct } from '../kvm/struct.js';
import { MailboxLayout, type Mailbox } from './mailbox.js';
import * as libc from '../kvm/libc.js';
import { bit, type VirtioBackend, type VirtioDeviceType, type VirtioQueues } from './device.js';
import { BALLOON_COUNTERS, DeviceCounters } from './counters.js';

export const VIRTIO_BALLOON_F_STATS_VQ = 1n;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2n;
export const VIRTIO_BALLOON_F_PAGE_REPORTING = 5n;
export const BALLOON_CONFIG = { numPages: 0, actual: 4, freePageHintCmdId: 8, poisonVal: 12, bytes: 16 } as const;
export const BALLOON_PAGE_BYTES = 4096;
/** Page frame numbers one inflate buffer may carry (Linux sends at most 256). */
export const MAX_INFLATE_PFNS = 4096;
/** Inflate, deflate or report buffers handled per I/O-thread turn before other work. */
const BALLOON_BUFFERS_PER_TURN = 64;
/** struct virtio_balloon_stat: u16 tag, u64 value, packed. */
const STAT_BYTES = 10;
export const BALLOON_STAT_TAGS = 16;
/**
 * Shared state after the config. What the I/O thread reports to the host: the last
 * statistics (a u64 per tag), published by an Atomics.store of the update count, and
 * the pages returned to the host. Then the host's requests, one mailbox each
 * (mailbox.ts): a new target, and "send statistics".
 */
export const BALLOON_REPORT = struct('balloon_report', [
  ['statsUpdates', 'i32'],
  ['_pad', 'u32'],
  ['pagesReturned', 'u64'],
  ['stats', array('u64', BALLOON_STAT_TAGS)],
]);
export const BALLOON_TARGET = new MailboxLayout('balloon_target', { pages: 'u32' });
export const BALLOON_STATS_REQUEST = new MailboxLayout('balloon_stats_request', {});
const align8 = (n: number) => Math.ceil(n / 8) * 8;
const TARGET_AT = align8(BALLOON_REPORT.size);
const STATS_REQUEST_AT = TARGET_AT + align8(BALLOON_TARGET.bytes);
const SHARED_BYTES = STATS_REQUEST_AT + align8(BALLOON_STATS_REQUEST.bytes);
const STATS_AT = BALLOON_REPORT.offsetOf('stats');

/** The balloon's shared regions, from any thread. */
class BalloonShared {
  readonly report: DataView;
  readonly updates: Int32Array;
  readonly target: Mailbox<typeof BALLOON_TARGET.fields>;
  readonly statsRequest: Mailbox<typeof BALLOON_STATS_REQUEST.fields>;

  constructor(state: { readonly state: SharedArrayBuffer; readonly extraAt: number }) {
    this.report = new DataView(state.state, state.extraAt, BALLOON_REPORT.size);
    this.updates = new Int32Array(state.state, state.extraAt + BALLOON_REPORT.offsetOf('statsUpdates'), 1);
    this.target = BALLOON_TARGET.open(state.state, state.extraAt + TARGET_AT);
    this.statsRequest = BALLOON_STATS_REQUEST.open(state.state, state.extraAt + STATS_REQUEST_AT);
  }
}

/** What a balloon starts with. */
export interface BalloonOptions {
  readonly targetPages: number;
  readonly deflateOnOom: boolean;
  /** Where the I/O thread counts the driver's buffers for the metrics (counters.ts). */
  readonly counters?: SharedArrayBuffer;
}

export const balloonType: VirtioDeviceType<BalloonOptions> = {
  deviceId: 5,
  name: 'balloon',
  maxQueueSize: 256,
  queues: () => 4,
  features: (o) =>
    bit(VIRTIO_BALLOON_F_STATS_VQ) |
    bit(VIRTIO_BALLOON_F_PAGE_REPORTING) |
    (o.deflateOnOom ? bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) : 0n),
  configBytes: () => BALLOON_CONFIG.bytes,
  initConfig: (config, o) => config.setUint32(BALLOON_CONFIG.numPages, o.targetPages, true),
  // The driver writes only `actual` (how many pages the balloon holds).
  configWrite(config, offset, data) {
    for (let i = 0; i < data.length; i++)
      if (offset + i >= BALLOON_CONFIG.actual && offset + i < BALLOON_CONFIG.actual + 4)
        config.setUint8(offset + i, data[i]!);
  },
  controlChannel: true,
  extraBytes: () => SHARED_BYTES,
};

export class BalloonBackend implements VirtioBackend {
  private readonly shared: BalloonShared;
  private heldStats = -1;
  readonly pollFds;

  private readonly counters: DeviceCounters<(typeof BALLOON_COUNTERS)[number]> | null;

  constructor(
    private readonly rt: VirtioQueues,
    private readonly controlFd: number,
    options: BalloonOptions,
  ) {
    this.counters = options.counters ? new DeviceCounters(BALLOON_COUNTERS, options.counters) : null;
    this.shared = new BalloonShared(rt.state);
    this.pollFds = [{ fd: controlFd, ready: () => this.control() }];
  }

  private role(q: number): 'inflate' | 'deflate' | 'stats' | 'reporting' | null {
    if (q === 0) return 'inflate';
    if (q === 1) return 'deflate';
    const stats = this.rt.state.negotiated(VIRTIO_BALLOON_F_STATS_VQ);
    if (q === 2 && stats) return 'stats';
    if (q === (stats ? 3 : 2) && this.rt.state.negotiated(VIRTIO_BALLOON_F_PAGE_REPORTING)) return 'reporting';
    return null;
  }

  queueNotified(q: number): void {
    const role = this.role(q);
    if (role === 'stats') return this.takeStats(q);
    if (role === null) return;
    const queue = this.rt.queue(q);
    // A budget per turn: a driver that keeps refilling the queue shares the I/O thread.
    const done = queue.drain(
      this.rt.chain,
      (chain) => {
        this.counters?.add(
          role === 'inflate' ? 'inflate_count' : role === 'deflate' ? 'deflate_count' : 'free_page_report_count',
        );
        if (role === 'inflate') this.inflate();
        else if (role === 'reporting')
          for (let i = 0; i < chain.count; i++) this.drop(chain.region[i]!, chain.offset[i]!, chain.length[i]!);
        // Deflate needs nothing: the pages come back when the guest touches them.
        queue.push(chain.head, 0);
      },
      BALLOON_BUFFERS_PER_TURN,
    );
    if (done > 0) this.rt.notifyUsed(q);
    if (queue.leftOver) this.rt.kickLater(q);
  }

  /**
   * An inflate buffer: 32-bit page frame numbers; runs of consecutive ones are dropped
   * together. Linux sends at most 256 per buffer; past MAX_INFLATE_PFNS the rest of a
   * buffer is ignored, so one request costs bounded work whatever its length.
   */
  private inflate(): void {
    const chain = this.rt.chain;
    let runStart = -1;
    let runPages = 0;
    const flush = () => {
      if (runPages > 0) this.dropGuestRange(runStart * BALLOON_PAGE_BYTES, runPages * BALLOON_PAGE_BYTES);
      runPages = 0;
    };
    let budget = MAX_INFLATE_PFNS;
    for (let i = 0; i < chain.count && budget > 0; i++) {
      if (chain.writable[i]) continue;
      const bytes = this.rt.mem.regionBytes(chain.region[i]!);
      const view = new DataView(
        bytes.buffer,
        bytes.byteOffset + chain.offset[i]!,
        Math.min(chain.length[i]! - (chain.length[i]! % 4), budget * 4),
      );
      budget -= view.byteLength / 4;
      for (let at = 0; at < view.byteLength; at += 4) {
        const pfn = view.getUint32(at, true);
        if (runPages > 0 && pfn === runStart + runPages) runPages++;
        else {
          flush();
          runStart = pfn;
          runPages = 1;
        }
      }
    }
    flush();
  }

  private dropGuestRange(gpa: number, length: number): void {
    // Pages outside RAM (a confused or hostile driver) are ignored, as the spec allows.
    const region = this.rt.mem.findRegion(gpa, length);
    if (region >= 0) this.drop(region, gpa - this.rt.mem.regions[region]!.guestPhysAddr, length);
  }

  /** madvise(DONTNEED) on whole pages of one region's host mapping. */
  private drop(region: number, offset: number, length: number): void {
    const start = Math.ceil(offset / BALLOON_PAGE_BYTES) * BALLOON_PAGE_BYTES;
    const end = Math.floor((offset + length) / BALLOON_PAGE_BYTES) * BALLOON_PAGE_BYTES;
    if (end <= start) return;
    const host = this.rt.mem.regions[region]!.hostAddr + BigInt(start);
    // Dropped pages read back as zeros (or as the snapshot's memory file): they changed.
    this.rt.mem.markWritten(region, start, end - start);
    const dropped = libc.madvise(host, end - start, libc.MADV_DONTNEED) === 0;
    // Again once dropped: a live migration's pre-copy may have taken the first mark.
    this.rt.mem.markWritten(region, start, end - start);
    if (dropped) {
      const at = BALLOON_REPORT.offsetOf('pagesReturned');
      const report = this.shared.report;
      report.setBigUint64(at, report.getBigUint64(at, true) + BigInt((end - start) / BALLOON_PAGE_BYTES), true);
    }
  }

  /** The stats buffer: record it, keep it until the host wants fresh numbers (5.5.6.3). */
  private takeStats(q: number): void {
    const queue = this.rt.queue(q);
    const chain = this.rt.chain;
    while (queue.pop(chain)) {
      if (this.heldStats >= 0) queue.push(this.heldStats, 0);
      this.heldStats = chain.head;
      for (let i = 0; i < chain.count; i++) {
        if (chain.writable[i]) continue;
        const bytes = this.rt.mem.regionBytes(chain.region[i]!);
        const view = new DataView(bytes.buffer, bytes.byteOffset + chain.offset[i]!, chain.length[i]!);
        for (let at = 0; at + STAT_BYTES <= view.byteLength; at += STAT_BYTES) {
          const tag = view.getUint16(at, true);
          if (tag < BALLOON_STAT_TAGS)
            this.shared.report.setBigUint64(STATS_AT + 8 * tag, view.getBigUint64(at + 2, true), true);
        }
      }
      // Published: the host reads the statistics once it sees the new count.
      Atomics.add(this.shared.updates, 0, 1);
      this.counters?.add('stats_updates_count');
    }
    if (this.shared.statsRequest.pending) this.releaseStats(q);
  }

  private releaseStats(q: number): void {
    if (this.heldStats < 0) return;
    this.shared.statsRequest.take();
    this.rt.queue(q).push(this.heldStats, 0);
    this.heldStats = -1;
    this.rt.notifyUsed(q);
  }

  /** The host asked for something (BalloonControl): a new target, or statistics. */
  private control(): void {
    libc.drainEventfd(this.controlFd);
    const target = this.shared.target.take();
    if (target) {
      this.rt.state.config().setUint32(BALLOON_CONFIG.numPages, target.pages, true);
      this.rt.configChanged();
    }
    if (this.shared.statsRequest.pending && this.rt.state.negotiated(VIRTIO_BALLOON_F_STATS_VQ)) this.releaseStats(2);
  }

  reset(): void {
    this.heldStats = -1;
  }
}

/** The host's handle on a balloon: set its target, ask for statistics, read them. */
export class BalloonControl {
  private readonly shared: BalloonShared;
  private readonly config: DataView;

  constructor(
    state: { readonly state: SharedArrayBuffer; readonly extraAt: number; config(): DataView },
    private readonly controlFd: number,
  ) {
    this.shared = new BalloonShared(state);
    this.config = state.config();
  }

  setTargetPages(pages: number): void {
    this.shared.target.post({ pages });
    libc.signalEventfd(this.controlFd);
  }

  requestStats(): void {
    this.shared.statsRequest.post({});
    libc.signalEventfd(this.controlFd);
  }

  get actualPages(): number {
    return this.config.getUint32(BALLOON_CONFIG.actual, true);
  }

  get pagesReturned(): number {
    return Number(this.shared.report.getBigUint64(BALLOON_REPORT.offsetOf('pagesReturned'), true));
  }

  get statsUpdates(): number {
    return Atomics.load(this.shared.updates, 0);
  }

  /** The last value the guest sent for a statistic tag (5.5.6.3: 0 swap in ... 10 hugetlb). */
  stat(tag: number): bigint {
    return this.shared.report.getBigUint64(STATS_AT + 8 * tag, true);
  }
}
