// virtio-blk (virtio 1.2, 5.2) over a raw image file: read, write, flush, get-id,
// discard and write-zeroes, read-only drives. Data moves between the file and guest
// memory with no copy (pread/pwrite into the guest's own pages). A write is acknowledged
// after pwrite returns; a flush is acknowledged after fdatasync, so a guest that asks
// for durability gets it before it is told so.
import { fdatasyncSync, fstatSync, readSync, writeSync } from 'node:fs';
import { ioc } from '../kvm/ioctl.js';
import { struct } from '../kvm/struct.js';
import { MailboxLayout, type Mailbox } from './mailbox.js';
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import { bit, type VirtioBackend, type VirtioDeviceType, type VirtioQueues } from './device.js';
import { SlotSegments, VirtqueueError, writeIovec, type DescriptorChain, type SplitQueue } from './queue.js';
import { IORING_OP_READV, IoRing } from './uring.js';
import { chainBytes, drainLimited, SharedRateLimiter } from './rate-limiter.js';
import { BLK_COUNTERS, DeviceCounters } from './counters.js';

export const VIRTIO_BLK_F_SEG_MAX = 2n;
export const VIRTIO_BLK_F_RO = 5n;
export const VIRTIO_BLK_F_BLK_SIZE = 6n;
export const VIRTIO_BLK_F_FLUSH = 9n;
export const VIRTIO_BLK_F_DISCARD = 13n;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14n;

export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
export const VIRTIO_BLK_ID_BYTES = 20;
export const SECTOR_BYTES = 512;
/** The most iovecs one preadv/pwritev takes (Linux's IOV_MAX). */
const MAX_IOV = 1024;

/** struct virtio_blk_config (5.2.4), the fields Kiln fills. */
export const BLK_CONFIG = {
  capacity: 0,
  sizeMax: 8,
  segMax: 12,
  blkSize: 20,
  maxDiscardSectors: 36,
  maxDiscardSeg: 40,
  discardSectorAlignment: 44,
  maxWriteZeroesSectors: 48,
  maxWriteZeroesSeg: 52,
  writeZeroesMayUnmap: 56,
  bytes: 60,
} as const;

const QUEUE_SIZE = 256;
/** Segments per discard/write-zeroes request (struct virtio_blk_discard_write_zeroes, 16 bytes each). */
const MAX_RANGE_SEGMENTS = 64;
const RANGE_BYTES = 16;
/** Largest discard or write-zeroes range, in sectors (4 GiB). */
const MAX_RANGE_SECTORS = 0x80_0000;

/** <linux/virtio_blk.h>'s request header (virtio 1.2, 5.2.6), little-endian. */
export const virtio_blk_outhdr = struct('virtio_blk_outhdr', [
  ['type', 'u32'],
  ['ioprio', 'u32'],
  ['sector', 'u64'],
]);
const OUTHDR_TYPE = virtio_blk_outhdr.offsetOf('type');
const OUTHDR_SECTOR = virtio_blk_outhdr.offsetOf('sector');

/** What a virtio-blk device is made of (blkOptions makes it from an opened disk). */
export interface BlkOptions {
  readonly fd: number;
  readonly path: string;
  readonly readOnly: boolean;
  readonly serial: string;
  readonly sectors: number;
  /**
   * Where the I/O thread records which chunks of a writable disk the guest changed,
   * while the host asks it to (a live migration copying the disk): a flag word, then one
   * bit per DISK_CHUNK_BYTES (DiskWrites reads and clears it).
   */
  readonly written?: SharedArrayBuffer;
  /** The drive's rate limiter (rate-limiter.ts's shared cells; PATCH /drives changes it live). */
  readonly limiter?: SharedArrayBuffer;
  /** Where the I/O thread counts requests and bytes for the metrics (counters.ts). */
  readonly counters?: SharedArrayBuffer;
}

/** The granularity of a disk's write record (a migration copies whole chunks). */
export const DISK_CHUNK_BYTES = 1024 * 1024;

/** Marks [offset, offset+length) of a disk changed in `written`, when it is recording. */
export function markDiskWritten(written: Int32Array | null, offset: number, length: number): void {
  if (written === null || length <= 0 || Atomics.load(written, 0) === 0) return;
  const last = Math.min(Math.floor((offset + length - 1) / DISK_CHUNK_BYTES), (written.length - 1) * 32 - 1);
  for (let c = Math.floor(offset / DISK_CHUNK_BYTES); c <= last; c++) Atomics.or(written, 1 + (c >>> 5), 1 << (c & 31));
}

/**
 * A live media change (Firecracker's PATCH /drives after the start): the host posts the
 * new file's fd and size in the shared state's mailbox (mailbox.ts).
 */
export const BLK_MEDIA_CHANGE = new MailboxLayout('blk_media_change', { fd: 'i32', sectors: 'u64' });

export const blkType: VirtioDeviceType<BlkOptions> = {
  deviceId: 2,
  name: 'blk',
  maxQueueSize: QUEUE_SIZE,
  queues: () => 1,
  features: (o) =>
    bit(VIRTIO_BLK_F_SEG_MAX) |
    bit(VIRTIO_BLK_F_BLK_SIZE) |
    bit(VIRTIO_BLK_F_FLUSH) |
    (o.readOnly ? bit(VIRTIO_BLK_F_RO) : bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
  configBytes: () => BLK_CONFIG.bytes,
  controlChannel: true,
  extraBytes: () => BLK_MEDIA_CHANGE.bytes,
  initConfig(config, o) {
    const sectors = o.sectors;
    config.setUint32(BLK_CONFIG.capacity, sectors % 2 ** 32, true);
    config.setUint32(BLK_CONFIG.capacity + 4, Math.floor(sectors / 2 ** 32), true);
    config.setUint32(BLK_CONFIG.segMax, QUEUE_SIZE - 2, true);
    config.setUint32(BLK_CONFIG.blkSize, SECTOR_BYTES, true);
    config.setUint32(BLK_CONFIG.maxDiscardSectors, MAX_RANGE_SECTORS, true);
    config.setUint32(BLK_CONFIG.maxDiscardSeg, MAX_RANGE_SEGMENTS, true);
    config.setUint32(BLK_CONFIG.discardSectorAlignment, 1, true);
    config.setUint32(BLK_CONFIG.maxWriteZeroesSectors, MAX_RANGE_SECTORS, true);
    config.setUint32(BLK_CONFIG.maxWriteZeroesSeg, MAX_RANGE_SEGMENTS, true);
    config.setUint8(BLK_CONFIG.writeZeroesMayUnmap, 1);
  },
};

/** Checks a disk image and returns the options a blk device needs (run on the main thread, before the VM starts). */
/** BLKGETSIZE64 (<linux/fs.h>: _IOR(0x12, 114, size_t)): a block device's size in bytes. */
export const BLKGETSIZE64 = ioc(2, 0x12, 114, 8);

/** A disk's size in bytes: the file's, or for a block device what the kernel says (fstat gives 0). */
function diskBytes(fd: number, isBlockDevice: boolean, size: number, path: string): number {
  if (!isBlockDevice) return size;
  const out = Buffer.alloc(8);
  if (libc.ioctlPtr(fd, BLKGETSIZE64, out) < 0)
    throw new KilnError(`cannot size block device ${path}: ${libc.errnoName(libc.errno())}`);
  return Number(out.readBigUint64LE(0));
}

/**
 * Locks a disk for this VM as QEMU does, with an open-file-description lock over the
 * whole file: a write lock for a read-write drive, a read lock for a read-only one. Two
 * VMs (or two drives of one) cannot both write an image, nor one read what another writes.
 */
export function lockDisk(fd: number, path: string, readOnly: boolean): void {
  const type = readOnly ? libc.F_RDLCK : libc.F_WRLCK;
  const e = libc.ofdLockWholeFile(fd, type);
  if (e === 0) return;
  if (e !== libc.EAGAIN && e !== libc.EACCES) throw new KilnError(`cannot lock disk ${path}: ${libc.errnoName(e)}`);
  const held = libc.ofdConflict(fd, type);
  const holder = held.type === libc.F_WRLCK ? 'a read-write' : held.type === libc.F_RDLCK ? 'a read-only' : 'a';
  throw new KilnError(
    `disk ${path} is in use: ${holder} lock on it is held${held.pid > 0 ? ` by process ${held.pid}` : ' by another VM or program'}` +
      ` (${readOnly ? 'a read-only drive needs no writer' : 'a read-write drive needs it to itself'})`,
  );
}

/** Checks and locks a disk image and returns the options a blk device needs (run on the main thread, before the VM starts). */
export function blkOptions(fd: number, path: string, readOnlyDrive: boolean, serial: string, lock = true): BlkOptions {
  const st = fstatSync(fd);
  if (!st.isFile() && !st.isBlockDevice()) throw new KilnError(`disk ${path} is not a regular file or block device`);
  const bytes = diskBytes(fd, st.isBlockDevice(), st.size, path);
  if (bytes % SECTOR_BYTES !== 0)
    throw new KilnError(`disk ${path} is ${bytes} bytes, not a whole number of 512-byte sectors`);
  if (Buffer.byteLength(serial) > VIRTIO_BLK_ID_BYTES)
    throw new KilnError(`disk serial '${serial}' is longer than ${VIRTIO_BLK_ID_BYTES} bytes`);
  if (lock) lockDisk(fd, path, readOnlyDrive);
  const chunks = Math.ceil(bytes / DISK_CHUNK_BYTES);
  return {
    fd,
    path,
    readOnly: readOnlyDrive,
    serial,
    sectors: bytes / SECTOR_BYTES,
    ...(readOnlyDrive ? {} : { written: new SharedArrayBuffer(4 + Math.ceil(chunks / 32) * 4) }),
  };
}

/** Requests served per wake-up before the I/O thread turns to its other ready work. */
export const BLK_REQUESTS_PER_TURN = 64;
/** Reads one io_uring submit carries, and the data segments each may have (a longer one goes alone). */
const BATCH_SLOTS = 16;
const BATCH_IOV = 32;

export class BlkBackend implements VirtioBackend {
  private readonly header = new Uint8Array(virtio_blk_outhdr.size);
  private readonly headerView = new DataView(this.header.buffer);
  private readonly ranges = new Uint8Array(RANGE_BYTES * MAX_RANGE_SEGMENTS);
  private readonly rangesView = new DataView(this.ranges.buffer);
  private readonly zeroes = new Uint8Array(64 * 1024);
  /** One request's data segments (as many as its chain can have) and their iovecs (IOV_MAX at most; more go one by one). */
  private segRegion = new Int32Array(QUEUE_SIZE);
  private segOffset = new Float64Array(QUEUE_SIZE);
  private segLength = new Float64Array(QUEUE_SIZE);
  private readonly iov = Buffer.alloc(MAX_IOV * 16);
  /** Reads of one drain, submitted together (null: no io_uring here, one call each). */
  private readonly ring: IoRing | null;
  private readonly batch = new PendingRequests(BATCH_SLOTS, BATCH_IOV);
  /** The queue whose drain is batching now (null: requests are done one at a time). */
  private batchQueue: SplitQueue | null = null;
  private fd: number;
  private sectors: number;
  private readonly readOnly: boolean;
  private readonly serial: Uint8Array;
  private errorLogged = false;
  /** The record of changed chunks a migration reads (BlkOptions.written). */
  private readonly written: Int32Array | null;
  private readonly mediaChange: Mailbox<typeof BLK_MEDIA_CHANGE.fields>;
  readonly pollFds: Array<{ fd: number; ready(): void }>;

  constructor(
    private readonly rt: VirtioQueues,
    options: BlkOptions,
    private readonly controlFd: number,
  ) {
    this.fd = options.fd;
    this.sectors = options.sectors;
    this.written = options.written ? new Int32Array(options.written) : null;
    this.readOnly = options.readOnly;
    this.serial = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    this.serial.set(Buffer.from(options.serial).subarray(0, VIRTIO_BLK_ID_BYTES));
    this.mediaChange = BLK_MEDIA_CHANGE.open(rt.state.state, rt.state.extraAt);
    this.pollFds = [{ fd: controlFd, ready: () => this.swapMedia() }];
    this.limiter = options.limiter ? new SharedRateLimiter(options.limiter) : null;
    this.counters = options.counters ? new DeviceCounters(BLK_COUNTERS, options.counters) : null;
    // Made here, before the I/O thread's seccomp filter (which lets it enter a ring, not make one).
    this.ring = IoRing.open(BATCH_SLOTS, BATCH_IOV);
  }

  private readonly counters: DeviceCounters<(typeof BLK_COUNTERS)[number]> | null;

  private readonly limiter: SharedRateLimiter | null;

  /** The host changed the backing file: requests from now on go to it; the guest sees the new capacity. */
  private swapMedia(): void {
    libc.drainEventfd(this.controlFd);
    const change = this.mediaChange.take();
    if (!change) return;
    // What the guest wrote to the old file reaches it before the new one takes over.
    this.sync('before the media change');
    this.fd = change.fd;
    this.sectors = Number(change.sectors);
    const config = this.rt.state.config();
    config.setUint32(BLK_CONFIG.capacity, this.sectors % 2 ** 32, true);
    config.setUint32(BLK_CONFIG.capacity + 4, Math.floor(this.sectors / 2 ** 32), true);
    this.rt.configChanged();
  }

  /** fdatasync of a writable disk; a failure is logged (the guest has been told of its writes already). */
  private sync(when: string): void {
    if (this.readOnly) return;
    try {
      fdatasyncSync(this.fd);
    } catch (err) {
      this.rt.log(`virtio-blk: fdatasync ${when} failed: ${(err as Error).message}`);
    }
  }

  /** An orderly end of the VM: what the guest wrote is on the disk before Kiln exits. */
  close(): void {
    this.sync('at shutdown');
    this.ring?.close();
  }

  queueNotified(q: number): void {
    const queue = this.rt.queue(q);
    const handle = (chain: DescriptorChain) => {
      const written = this.handle(chain);
      // Negative: a read waiting in the batch; finishBatch returns it.
      if (written >= 0) queue.push(chain.head, written);
    };
    if (this.limiter?.active) {
      // Each request's data (less its header and status byte) passes the drive's limiter first.
      const served = drainLimited(
        this.rt,
        q,
        this.limiter!,
        (chain) => Math.max(0, chainBytes(chain, true) + chainBytes(chain, false) - virtio_blk_outhdr.size - 1),
        handle,
        BLK_REQUESTS_PER_TURN,
      );
      if (served > 0) this.rt.notifyUsed(q);
      return;
    }
    let served: number;
    if (this.ring) {
      this.batchQueue = queue;
      this.batch.count = 0;
      try {
        served = queue.drain(this.rt.chain, handle, BLK_REQUESTS_PER_TURN, () => this.finishBatch());
      } finally {
        this.batchQueue = null;
      }
    } else served = queue.drain(this.rt.chain, handle, BLK_REQUESTS_PER_TURN);
    if (served > 0) this.rt.notifyUsed(q);
    if (queue.leftOver) this.rt.kickLater(q);
  }

  private ioError(what: string, err: unknown): number {
    if (!this.errorLogged) {
      this.errorLogged = true;
      this.rt.log(
        `virtio-blk: ${what}: ${err instanceof Error ? err.message : String(err)} (the guest sees an I/O error; further ones not logged)`,
      );
    }
    return VIRTIO_BLK_S_IOERR;
  }

  /**
   * Handles one request; returns the bytes written into the driver's buffers, or -1 for a
   * read left in the batch (finishBatch returns it to the driver).
   */
  private handle(chain: DescriptorChain): number {
    if (chain.readableBytes < virtio_blk_outhdr.size || chain.writableBytes < 1)
      throw new VirtqueueError(`virtio-blk request at head ${chain.head} has no header or no status byte`);
    chain.readInto(this.rt.mem, 0, this.header, virtio_blk_outhdr.size);
    const type = this.headerView.getUint32(OUTHDR_TYPE, true);
    // Two halves: getBigUint64 would allocate a BigInt per request.
    const sector =
      this.headerView.getUint32(OUTHDR_SECTOR, true) + this.headerView.getUint32(OUTHDR_SECTOR + 4, true) * 2 ** 32;
    // The status is the chain's last writable byte.
    let last = chain.count - 1;
    while (chain.length[last] === 0) last--;
    const statusRegion = chain.region[last]!;
    const statusOffset = chain.offset[last]! + chain.length[last]! - 1;
    let status: number;
    let written = 1;
    // Reads wait in the batch; writes are done at once (a buffered write through io_uring
    // goes to a kernel worker when it cannot finish inline, which costs more than the
    // call it saves: 32.6 against 46 µs per 128 KiB write measured here).
    if (this.batchQueue && type === VIRTIO_BLK_T_IN && this.enqueue(chain, sector, statusRegion, statusOffset))
      return -1;
    // Anything done now comes after what the batch holds (a write after the reads before it).
    if (this.batch.count > 0) this.finishBatch();
    switch (type) {
      case VIRTIO_BLK_T_IN: {
        const bytes = chain.writableBytes - 1;
        status = this.transfer(chain, sector, bytes, false);
        if (status === VIRTIO_BLK_S_OK) {
          written += bytes;
          this.counters?.add('read_count');
          this.counters?.add('read_bytes', bytes);
        }
        break;
      }
      case VIRTIO_BLK_T_OUT: {
        const bytes = chain.readableBytes - virtio_blk_outhdr.size;
        status = this.readOnly ? VIRTIO_BLK_S_IOERR : this.transfer(chain, sector, bytes, true);
        // Once written (even in part): a migration's copy sent before must be sent again.
        if (!this.readOnly) markDiskWritten(this.written, sector * SECTOR_BYTES, bytes);
        if (status === VIRTIO_BLK_S_OK) {
          this.counters?.add('write_count');
          this.counters?.add('write_bytes', bytes);
        }
        break;
      }
      case VIRTIO_BLK_T_FLUSH:
        try {
          fdatasyncSync(this.fd);
          status = VIRTIO_BLK_S_OK;
          this.counters?.add('flush_count');
        } catch (err) {
          status = this.ioError('flush', err);
        }
        break;
      case VIRTIO_BLK_T_GET_ID: {
        const room = Math.min(chain.writableBytes - 1, VIRTIO_BLK_ID_BYTES);
        chain.writeFrom(this.rt.mem, 0, this.serial, room);
        written += room;
        status = VIRTIO_BLK_S_OK;
        break;
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        status = this.readOnly ? VIRTIO_BLK_S_IOERR : this.ranged(chain, type);
        break;
      default:
        status = VIRTIO_BLK_S_UNSUPP;
    }
    this.rt.mem.regionBytes(statusRegion)[statusOffset] = status;
    this.rt.mem.markWritten(statusRegion, statusOffset, 1);
    return written;
  }

  /**
   * Reads into the writable data segments, or writes from the readable ones after the
   * header: one preadv/pwritev over all of them (guest memory is the iovecs' target, no
   * copy), then, if that moved less, the rest segment by segment.
   */
  private transfer(chain: DescriptorChain, sector: number, bytes: number, write: boolean): number {
    if (bytes % SECTOR_BYTES !== 0) return VIRTIO_BLK_S_IOERR;
    if (sector + bytes / SECTOR_BYTES > this.sectors) return VIRTIO_BLK_S_IOERR;
    const { count, left } = this.segments(chain, bytes, write);
    return this.move(count, bytes - left, sector * SECTOR_BYTES, write, sector);
  }

  /**
   * The request's data segments into this.seg*, in order: the data descriptors, the
   * header skipped from the first ones of a write, `bytes` at most; how many, and the
   * bytes the chain lacked.
   */
  private segments(chain: DescriptorChain, bytes: number, write: boolean): { count: number; left: number } {
    if (chain.count > this.segRegion.length) {
      this.segRegion = new Int32Array(chain.count);
      this.segOffset = new Float64Array(chain.count);
      this.segLength = new Float64Array(chain.count);
    }
    // The segments, in order: the data descriptors, the header skipped from the first ones of a write.
    let skip = write ? 16 : 0;
    let left = bytes;
    let count = 0;
    for (let i = 0; i < chain.count && left > 0; i++) {
      if ((chain.writable[i] === 1) !== !write) continue;
      let len = chain.length[i]!;
      let offset = chain.offset[i]!;
      if (skip > 0) {
        const s = Math.min(skip, len);
        skip -= s;
        len -= s;
        offset += s;
      }
      len = Math.min(len, left);
      if (len === 0) continue;
      this.segRegion[count] = chain.region[i]!;
      this.segOffset[count] = offset;
      this.segLength[count] = len;
      count++;
      left -= len;
    }
    return { count, left };
  }

  /**
   * Moves the first `count` segments (this.seg*, `total` bytes) from or to the file at
   * `position`: one preadv/pwritev, the rest (if it moved less) segment by segment.
   * `already`: bytes a batched call moved (no vectored call then; -1: none was made).
   */
  private move(count: number, total: number, position: number, write: boolean, sector: number, already = -1): number {
    const mem = this.rt.mem;
    // Marked before the read (one that fails half-way has still changed the pages) and
    // again after it: a live migration's pre-copy may take the record in between, and a
    // write it did not see must be marked after it (migration/send.ts).
    if (!write) this.markSegments(count);
    let done = Math.max(0, already);
    try {
      if (already < 0 && count > 0 && count <= MAX_IOV) {
        this.segmentIovecs(this.iov, count);
        const n = write
          ? libc.pwritev(this.fd, this.iov, count, position)
          : libc.preadv(this.fd, this.iov, count, position);
        if (n < 0) throw new Error(`${libc.errnoName(libc.errno())} (${libc.strerror(libc.errno())})`);
        done = n;
      }
      // What a short vectored transfer (or a chain of more than MAX_IOV segments) left.
      let at = 0;
      for (let k = 0; k < count && done < total; k++) {
        const len = this.segLength[k]!;
        if (done >= at + len) {
          at += len;
          continue;
        }
        const bytesOfRegion = mem.regionBytes(this.segRegion[k]!);
        const offset = this.segOffset[k]!;
        for (let from = done - at; from < len;) {
          const n = write
            ? writeSync(this.fd, bytesOfRegion, offset + from, len - from, position + at + from)
            : readSync(this.fd, bytesOfRegion, offset + from, len - from, position + at + from);
          // A short read at end of file: the image shrank under the VM.
          if (n <= 0)
            return this.ioError(
              `${write ? 'write' : 'read'} at sector ${sector}`,
              new Error('the image is shorter than the disk the guest was given'),
            );
          from += n;
          done += n;
        }
        at += len;
      }
    } catch (err) {
      return this.ioError(`${write ? 'write' : 'read'} at sector ${sector}`, err);
    } finally {
      if (!write) this.markSegments(count);
    }
    return VIRTIO_BLK_S_OK;
  }

  /** The first `count` segments (this.seg*) as struct iovec entries in `iov`. */
  private segmentIovecs(iov: Buffer, count: number): void {
    const hostBase = this.rt.mem.hostBase;
    for (let k = 0; k < count; k++)
      writeIovec(iov, k, hostBase[this.segRegion[k]!]! + this.segOffset[k]!, this.segLength[k]!);
  }

  /**
   * Puts a read in the batch (its bytes move at finishBatch); false when it does not go
   * there (a bad range, too many segments): the caller does it now.
   */
  private enqueue(chain: DescriptorChain, sector: number, statusRegion: number, statusOffset: number): boolean {
    const ring = this.ring!;
    const bytes = chain.writableBytes - 1;
    if (bytes % SECTOR_BYTES !== 0 || sector + bytes / SECTOR_BYTES > this.sectors) return false;
    const { count, left } = this.segments(chain, bytes, false);
    if (count === 0 || count > ring.iovPerSlot) return false;
    if (this.batch.count === ring.slots) this.finishBatch();
    const slot = this.batch.count++;
    this.segmentIovecs(ring.iovs(slot), count);
    // Marked before the read and again after it (see move).
    this.markSegments(count);
    const b = this.batch;
    b.heads[slot] = chain.head;
    b.sector[slot] = sector;
    b.bytes[slot] = bytes - left;
    b.statusRegion[slot] = statusRegion;
    b.statusOffset[slot] = statusOffset;
    b.segments.keep(slot, count, this.segRegion, this.segOffset, this.segLength);
    // No RWF_NOWAIT: a read the page cache cannot answer goes to the kernel's workers
    // (several at once), and the submit waits for it.
    ring.prepare(slot, IORING_OP_READV, this.fd, count, sector * SECTOR_BYTES, 0);
    return true;
  }

  /** Submits the batch's reads, waits for them, and returns each to the driver with its status. */
  private finishBatch(): void {
    const n = this.batch.count;
    const queue = this.batchQueue;
    if (n === 0 || !queue) return;
    this.batch.count = 0;
    const ring = this.ring!;
    const b = this.batch;
    const submitted = ring.submit(n);
    for (let i = 0; i < n; i++) {
      const total = b.bytes[i]!;
      const count = b.segments.copyOut(i, this.segRegion, this.segOffset, this.segLength);
      const sector = b.sector[i]!;
      let status: number;
      const r = submitted ? ring.results[i]! : -1;
      if (submitted && r < 0) {
        status = this.ioError(`read at sector ${sector}`, new Error(`${libc.errnoName(-r)} (${libc.strerror(-r)})`));
        this.markSegments(count);
      } else {
        // A short read is finished here; one the kernel never took is done here whole.
        status = this.move(count, total, sector * SECTOR_BYTES, false, sector, submitted ? r : -1);
      }
      if (status === VIRTIO_BLK_S_OK) {
        this.counters?.add('read_count');
        this.counters?.add('read_bytes', total);
      }
      this.rt.mem.regionBytes(b.statusRegion[i]!)[b.statusOffset[i]!] = status;
      this.rt.mem.markWritten(b.statusRegion[i]!, b.statusOffset[i]!, 1);
      queue.push(b.heads[i]!, 1 + (status === VIRTIO_BLK_S_OK ? total : 0));
    }
  }

  /** Records the first `count` segments as Kiln's own writes into guest memory. */
  private markSegments(count: number): void {
    for (let k = 0; k < count; k++) this.rt.mem.markWritten(this.segRegion[k]!, this.segOffset[k]!, this.segLength[k]!);
  }

  /** Discard and write-zeroes: a list of {sector, num_sectors, flags} after the header. */
  private ranged(chain: DescriptorChain, type: number): number {
    const bytes = chain.readableBytes - virtio_blk_outhdr.size;
    if (bytes === 0 || bytes % RANGE_BYTES !== 0 || bytes / RANGE_BYTES > MAX_RANGE_SEGMENTS)
      return VIRTIO_BLK_S_UNSUPP;
    chain.readInto(this.rt.mem, virtio_blk_outhdr.size, this.ranges, bytes);
    for (let at = 0; at < bytes; at += RANGE_BYTES) {
      const sector = this.rangesView.getUint32(at, true) + this.rangesView.getUint32(at + 4, true) * 2 ** 32;
      const count = this.rangesView.getUint32(at + 8, true);
      const flags = this.rangesView.getUint32(at + 12, true);
      if (count > MAX_RANGE_SECTORS || sector + count > this.sectors) return VIRTIO_BLK_S_IOERR;
      if (type === VIRTIO_BLK_T_DISCARD && flags !== 0) return VIRTIO_BLK_S_UNSUPP;
      const offset = sector * SECTOR_BYTES;
      const length = count * SECTOR_BYTES;
      if (type === VIRTIO_BLK_T_DISCARD) {
        // Best effort (5.2.6.2): a file system without hole punching keeps the data.
        libc.fallocate(this.fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length);
        markDiskWritten(this.written, offset, length);
        continue;
      }
      const mode =
        flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
          ? libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE
          : libc.FALLOC_FL_ZERO_RANGE | libc.FALLOC_FL_KEEP_SIZE;
      let failure: unknown = null;
      if (libc.fallocate(this.fd, mode, offset, length) !== 0)
        try {
          for (let done = 0; done < length;)
            done += writeSync(this.fd, this.zeroes, 0, Math.min(this.zeroes.length, length - done), offset + done);
        } catch (err) {
          failure = err;
        }
      // Once zeroed (even in part): a migration's copy sent before must be sent again.
      markDiskWritten(this.written, offset, length);
      if (failure !== null) return this.ioError(`write-zeroes at sector ${sector}`, failure);
    }
    return VIRTIO_BLK_S_OK;
  }
}

/** The host's handle on a disk: swap its backing file while the VM runs. */
export class BlkControl {
  private readonly mediaChange: Mailbox<typeof BLK_MEDIA_CHANGE.fields>;

  constructor(
    state: { readonly state: SharedArrayBuffer; readonly extraAt: number },
    private readonly controlFd: number,
  ) {
    this.mediaChange = BLK_MEDIA_CHANGE.open(state.state, state.extraAt);
  }

  /** Hands `fd` (opened and checked by openDisk) to the I/O thread; it takes over at its next turn. */
  swap(fd: number, sectors: number): void {
    this.mediaChange.post({ fd, sectors: BigInt(sectors) });
    libc.signalEventfd(this.controlFd);
  }
}

/** The reads of one batch, kept past the chain each was read from. */
class PendingRequests {
  count = 0;
  readonly heads: Uint16Array;
  readonly sector: Float64Array;
  readonly bytes: Float64Array;
  readonly statusRegion: Int32Array;
  readonly statusOffset: Float64Array;
  readonly segments: SlotSegments;

  constructor(slots: number, perSlot: number) {
    this.heads = new Uint16Array(slots);
    this.sector = new Float64Array(slots);
    this.bytes = new Float64Array(slots);
    this.statusRegion = new Int32Array(slots);
    this.statusOffset = new Float64Array(slots);
    this.segments = new SlotSegments(slots, perSlot);
  }
}
