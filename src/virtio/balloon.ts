// virtio-balloon (virtio 1.2, 5.5): the host asks for a size (num_pages), the guest
// gives pages back (inflate) or takes them again (deflate), sends memory statistics, and
// reports free pages. Pages given back or reported are dropped from the VMM's mapping
// with madvise(MADV_DONTNEED), so their host memory is freed at once (RSS falls) and
// they read as zeroes when the guest touches them again: overcommit is real.
//
// Free page hinting (FREE_PAGE_HINT, offered when configured): the host writes a new
// command ID into the configuration; the driver answers with that ID on the hinting queue,
// then sends free pages it has taken from its allocator and holds (Kiln drops them as it
// drops inflated pages), then the STOP ID; the host's DONE ID lets it put them back.
//
// Queues, in Linux's numbering (absent ones take no index): inflate 0, deflate 1, then
// stats (if STATS_VQ was negotiated), then hinting (if FREE_PAGE_HINT was), then reporting
// (if PAGE_REPORTING was).
import { array, struct } from '../kvm/struct.js';
import { MailboxLayout, type Mailbox } from './mailbox.js';
import * as libc from '../kvm/libc.js';
import { bit, type VirtioBackend, type VirtioDeviceType, type VirtioQueues } from './device.js';
import { BALLOON_COUNTERS, DeviceCounters } from './counters.js';

export const VIRTIO_BALLOON_F_STATS_VQ = 1n;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2n;
export const VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3n;
export const VIRTIO_BALLOON_F_PAGE_REPORTING = 5n;
export const BALLOON_CONFIG = { numPages: 0, actual: 4, freePageHintCmdId: 8, poisonVal: 12, bytes: 16 } as const;
export const BALLOON_PAGE_BYTES = 4096;
/** Free page hinting's reserved command IDs (virtio 1.2, 5.5.6.7): a run's ID is 2 or more. */
export const HINT_CMD_STOP = 0;
export const HINT_CMD_DONE = 1;
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
  // Free page hinting: the host's last command ID, the guest's (valid when guestCmdSeen is
  // 1), the last run's ID (the next run takes the one after it), the serial of the last
  // hint command posted (host) and applied (I/O thread: a snapshot restores both, so a
  // restored process never applies an old command twice), and whether the run applied
  // answers the driver's STOP with DONE.
  ['hostCmd', 'u32'],
  ['guestCmd', 'u32'],
  ['guestCmdSeen', 'u32'],
  ['lastRun', 'u32'],
  ['hintPosted', 'u32'],
  ['hintApplied', 'u32'],
  ['ackOnStop', 'u32'],
]);
export const BALLOON_TARGET = new MailboxLayout('balloon_target', { pages: 'u32' });
export const BALLOON_STATS_REQUEST = new MailboxLayout('balloon_stats_request', {});
/** A hinting command for the driver: a run's ID (ackOnStop 1: answer its STOP with DONE), or DONE. */
export const BALLOON_HINT = new MailboxLayout('balloon_hint', { cmd: 'u32', ackOnStop: 'u32', serial: 'u32' });
const align8 = (n: number) => Math.ceil(n / 8) * 8;
const TARGET_AT = align8(BALLOON_REPORT.size);
const STATS_REQUEST_AT = TARGET_AT + align8(BALLOON_TARGET.bytes);
const HINT_AT = STATS_REQUEST_AT + align8(BALLOON_STATS_REQUEST.bytes);
const SHARED_BYTES = HINT_AT + align8(BALLOON_HINT.bytes);
const HOST_CMD_AT = BALLOON_REPORT.offsetOf('hostCmd');
const GUEST_CMD_AT = BALLOON_REPORT.offsetOf('guestCmd');
const GUEST_CMD_SEEN_AT = BALLOON_REPORT.offsetOf('guestCmdSeen');
const LAST_RUN_AT = BALLOON_REPORT.offsetOf('lastRun');
const HINT_POSTED_AT = BALLOON_REPORT.offsetOf('hintPosted');
const HINT_APPLIED_AT = BALLOON_REPORT.offsetOf('hintApplied');
const ACK_ON_STOP_AT = BALLOON_REPORT.offsetOf('ackOnStop');
const STATS_AT = BALLOON_REPORT.offsetOf('stats');

/** The balloon's shared regions, from any thread. */
class BalloonShared {
  readonly report: DataView;
  readonly updates: Int32Array;
  readonly target: Mailbox<typeof BALLOON_TARGET.fields>;
  readonly statsRequest: Mailbox<typeof BALLOON_STATS_REQUEST.fields>;
  readonly hint: Mailbox<typeof BALLOON_HINT.fields>;

  constructor(state: { readonly state: SharedArrayBuffer; readonly extraAt: number }) {
    this.report = new DataView(state.state, state.extraAt, BALLOON_REPORT.size);
    this.updates = new Int32Array(state.state, state.extraAt + BALLOON_REPORT.offsetOf('statsUpdates'), 1);
    this.target = BALLOON_TARGET.open(state.state, state.extraAt + TARGET_AT);
    this.statsRequest = BALLOON_STATS_REQUEST.open(state.state, state.extraAt + STATS_REQUEST_AT);
    this.hint = BALLOON_HINT.open(state.state, state.extraAt + HINT_AT);
  }
}

/** What a balloon starts with. */
export interface BalloonOptions {
  readonly targetPages: number;
  readonly deflateOnOom: boolean;
  /** Offer free page hinting (Firecracker's free_page_hinting): host-started runs that free the guest's free pages. */
  readonly freePageHinting?: boolean;
  /** Where the I/O thread counts the driver's buffers for the metrics (counters.ts). */
  readonly counters?: SharedArrayBuffer;
}

export const balloonType: VirtioDeviceType<BalloonOptions> = {
  deviceId: 5,
  name: 'balloon',
  maxQueueSize: 256,
  queues: (o) => (o.freePageHinting ? 5 : 4),
  features: (o) =>
    bit(VIRTIO_BALLOON_F_STATS_VQ) |
    bit(VIRTIO_BALLOON_F_PAGE_REPORTING) |
    (o.deflateOnOom ? bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) : 0n) |
    (o.freePageHinting ? bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT) : 0n),
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

  private role(q: number): 'inflate' | 'deflate' | 'stats' | 'hinting' | 'reporting' | null {
    if (q === 0) return 'inflate';
    if (q === 1) return 'deflate';
    let next = 2;
    for (const [feature, role] of [
      [VIRTIO_BALLOON_F_STATS_VQ, 'stats'],
      [VIRTIO_BALLOON_F_FREE_PAGE_HINT, 'hinting'],
      [VIRTIO_BALLOON_F_PAGE_REPORTING, 'reporting'],
    ] as const) {
      if (!this.rt.state.negotiated(feature)) continue;
      if (q === next) return role;
      next++;
    }
    return null;
  }

  queueNotified(q: number): void {
    const role = this.role(q);
    if (role === 'stats') return this.takeStats(q);
    if (role === 'hinting') return this.takeHints(q);
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

  /** madvise(DONTNEED), or REMOVE for shared guest memory, on whole pages of one region's host mapping. */
  private drop(region: number, offset: number, length: number): void {
    const start = Math.ceil(offset / BALLOON_PAGE_BYTES) * BALLOON_PAGE_BYTES;
    const end = Math.floor((offset + length) / BALLOON_PAGE_BYTES) * BALLOON_PAGE_BYTES;
    if (end <= start) return;
    const host = this.rt.mem.regions[region]!.hostAddr + BigInt(start);
    // Dropped pages read back as zeros (or as the snapshot's memory file): they changed.
    this.rt.mem.markWritten(region, start, end - start);
    // Shared guest memory (a memfd) keeps its pages through DONTNEED: they are punched out of the file.
    const advice = this.rt.mem.shared ? libc.MADV_REMOVE : libc.MADV_DONTNEED;
    const dropped = libc.madvise(host, end - start, advice) === 0;
    // Again once dropped: a live migration's pre-copy may have taken the first mark.
    this.rt.mem.markWritten(region, start, end - start);
    if (dropped) {
      const at = BALLOON_REPORT.offsetOf('pagesReturned');
      const report = this.shared.report;
      report.setBigUint64(at, report.getBigUint64(at, true) + BigInt((end - start) / BALLOON_PAGE_BYTES), true);
    }
  }

  private get report(): DataView {
    return this.shared.report;
  }

  /**
   * The hinting queue: a device-readable 4-byte buffer is the driver's command ID (its
   * answer to a run's ID, or STOP when it has sent all it found); device-writable buffers
   * are free pages the driver holds, dropped while they belong to the host's current run
   * (hints of an older run, or after DONE, are left alone: the guest may be using them).
   */
  private takeHints(q: number): void {
    const queue = this.rt.queue(q);
    const chain = this.rt.chain;
    let stopped = false;
    const done = queue.drain(
      chain,
      () => {
        for (let i = 0; i < chain.count; i++) {
          if (!chain.writable[i]) {
            if (chain.length[i] !== 4) continue;
            const bytes = this.rt.mem.regionBytes(chain.region[i]!);
            const cmd = new DataView(bytes.buffer, bytes.byteOffset + chain.offset[i]!, 4).getUint32(0, true);
            this.report.setUint32(GUEST_CMD_AT, cmd, true);
            this.report.setUint32(GUEST_CMD_SEEN_AT, 1, true);
            stopped = cmd === HINT_CMD_STOP || cmd === HINT_CMD_DONE;
            continue;
          }
          const host = this.report.getUint32(HOST_CMD_AT, true);
          const seen = this.report.getUint32(GUEST_CMD_SEEN_AT, true) === 1;
          if (host <= HINT_CMD_DONE || !seen || this.report.getUint32(GUEST_CMD_AT, true) !== host) continue;
          this.counters?.add('free_page_hint_count');
          this.counters?.add('free_page_hint_freed', chain.length[i]!);
          this.drop(chain.region[i]!, chain.offset[i]!, chain.length[i]!);
        }
        queue.push(chain.head, 0);
      },
      BALLOON_BUFFERS_PER_TURN,
    );
    if (done > 0) this.rt.notifyUsed(q);
    if (queue.leftOver) this.rt.kickLater(q);
    // The driver has sent all it found: with acknowledge_on_stop, let it have its pages back.
    if (
      stopped &&
      this.report.getUint32(ACK_ON_STOP_AT, true) === 1 &&
      this.report.getUint32(HOST_CMD_AT, true) > HINT_CMD_DONE
    )
      this.sendHintCmd(HINT_CMD_DONE);
  }

  private sendHintCmd(cmd: number): void {
    this.report.setUint32(HOST_CMD_AT, cmd, true);
    this.rt.state.config().setUint32(BALLOON_CONFIG.freePageHintCmdId, cmd, true);
    this.rt.configChanged();
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
    const hint = this.shared.hint.take();
    if (hint && hint.serial !== this.report.getUint32(HINT_APPLIED_AT, true)) {
      this.report.setUint32(HINT_APPLIED_AT, hint.serial, true);
      this.report.setUint32(ACK_ON_STOP_AT, hint.ackOnStop, true);
      this.sendHintCmd(hint.cmd);
    }
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

  /**
   * Starts a free page hinting run: a new command ID (2 or more) for the driver; with
   * `ackOnStop` the device answers the driver's STOP with DONE itself. Returns the ID.
   */
  startHinting(ackOnStop: boolean): number {
    const report = this.shared.report;
    let cmd = (report.getUint32(LAST_RUN_AT, true) + 1) >>> 0;
    if (cmd <= HINT_CMD_DONE) cmd = HINT_CMD_DONE + 1;
    report.setUint32(LAST_RUN_AT, cmd, true);
    this.sendHint(cmd, ackOnStop);
    return cmd;
  }

  /** Ends a run: DONE lets the driver put the pages it holds back into use. */
  stopHinting(): void {
    this.sendHint(HINT_CMD_DONE, false);
  }

  private sendHint(cmd: number, ackOnStop: boolean): void {
    // Shown at once by hintingStatus; the I/O thread writes it too (and DONE on an acknowledged stop).
    const report = this.shared.report;
    report.setUint32(HOST_CMD_AT, cmd, true);
    const serial = (report.getUint32(HINT_POSTED_AT, true) + 1) >>> 0;
    report.setUint32(HINT_POSTED_AT, serial, true);
    this.shared.hint.post({ cmd, ackOnStop: ackOnStop ? 1 : 0, serial });
    libc.signalEventfd(this.controlFd);
  }

  /** Firecracker's hinting status: the host's last command ID, and the guest's if it sent one. */
  hintingStatus(): { hostCmd: number; guestCmd: number | null } {
    const report = this.shared.report;
    return {
      hostCmd: report.getUint32(HOST_CMD_AT, true),
      guestCmd: report.getUint32(GUEST_CMD_SEEN_AT, true) === 1 ? report.getUint32(GUEST_CMD_AT, true) : null,
    };
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
