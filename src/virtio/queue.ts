// Split virtqueues (virtio 1.2, 2.7): the descriptor table, the driver (available) ring
// and the device (used) ring in guest memory, walked from the device's side. Nothing
// the guest wrote is trusted: a head or next index past the queue size, a chain that
// loops or is longer than the queue, a nested or malformed indirect table, a readable
// buffer after a writable one, or a buffer outside guest RAM raises VirtqueueError,
// which the transport turns into DEVICE_NEEDS_RESET. A queue knows nothing of PCI.
//
// The per-queue registers (size, addresses, vector, enable) and the device's private
// ring positions live in a shared record (QUEUE_RECORD below) so the vCPU thread that
// handles the transport and the I/O thread that services the queue see one state.
import { KilnError } from '../errors.js';
import { layout } from '../kvm/struct.js';
import { GuestMemoryError, type GuestMemory } from '../memory/guest-memory.js';

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const VIRTQ_USED_F_NO_NOTIFY = 1;
export const VIRTQ_DESC_BYTES = 16;
export const VIRTQ_USED_ELEM_BYTES = 8;
/** Largest queue Kiln offers (the spec allows 32768). */
export const VIRTQ_MAX_SIZE = 1024;
/** Longest chain accepted, indirect tables included (bounds work per request). */
export const VIRTQ_MAX_CHAIN = 1024;
/** sizeof(struct iovec) on 64-bit Linux. */
export const IOVEC_BYTES = 16;

/**
 * Writes struct iovec `index` of `iov`: {address, length}. Host addresses are below 2^47,
 * so numbers hold them exactly (no BigInt on the I/O path).
 */
export function writeIovec(iov: Buffer, index: number, address: number, length: number): void {
  const at = index * IOVEC_BYTES;
  iov.writeUInt32LE(address % 2 ** 32, at);
  iov.writeUInt32LE(Math.floor(address / 2 ** 32), at + 4);
  iov.writeUInt32LE(length, at + 8);
  iov.writeUInt32LE(0, at + 12);
}

/**
 * The shared per-queue record of the ring itself: offsets of each field (all
 * little-endian). Transport fields (the queue's MSI-X vector, where its ioeventfd is)
 * are not here: they are the transport's (QUEUE_TRANSPORT in device.ts).
 */
export const QUEUE_RECORD = layout('virtio_queue_record', [
  ['size', 'u16'], // set by the driver (<= the device's maximum)
  ['_reserved', 'u16'],
  ['enable', 'u16'],
  ['lastAvail', 'u16'], // next avail ring slot the device will read
  ['usedIdx', 'u16'], // the device's copy of used.idx
  ['signalledUsed', 'u16'], // used.idx at the last interrupt (EVENT_IDX)
  ['signalledValid', 'u8'], // signalledUsed means something
  ['desc', 'u64'],
  ['driver', 'u64'],
  ['device', 'u64'],
] as const);

export class VirtqueueError extends KilnError {}

/**
 * One popped request, resolved to guest memory: `count` segments, each a range inside
 * one RAM region (a buffer that spans two regions becomes two segments). Arrays are
 * reused across requests so the I/O path allocates nothing.
 */
export class DescriptorChain {
  head = 0;
  count = 0;
  readableBytes = 0;
  writableBytes = 0;
  readonly region = new Int32Array(VIRTQ_MAX_CHAIN * 2);
  readonly offset = new Float64Array(VIRTQ_MAX_CHAIN * 2);
  readonly length = new Uint32Array(VIRTQ_MAX_CHAIN * 2);
  readonly writable = new Uint8Array(VIRTQ_MAX_CHAIN * 2);

  reset(head: number): void {
    this.head = head;
    this.count = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }

  /**
   * Copies up to `len` bytes of the device-readable part, from byte `skip` of it on,
   * into `into`; returns how many were copied.
   */
  readInto(mem: GuestMemory, skip: number, into: Uint8Array, len: number): number {
    return this.copy(mem, false, skip, into, len);
  }

  /** Copies up to `len` bytes of `from` into the device-writable part, from byte `skip` of it on; returns how many. */
  writeFrom(mem: GuestMemory, skip: number, from: Uint8Array, len: number): number {
    return this.copy(mem, true, skip, from, len);
  }

  /**
   * Describes the device-readable (`writable` false) or the device-writable part as
   * struct iovec entries {void *base; size_t len} in `iov`, pointing into guest memory,
   * so one readv/writev moves the bytes with no copy; returns how many, or -1 when they
   * would not fit in `iov`.
   */
  iovecs(mem: GuestMemory, writable: boolean, iov: Buffer): number {
    const max = Math.floor(iov.length / IOVEC_BYTES);
    let n = 0;
    for (let i = 0; i < this.count; i++) {
      if ((this.writable[i] === 1) !== writable) continue;
      if (n >= max) return -1;
      writeIovec(iov, n, mem.hostBase[this.region[i]!]! + this.offset[i]!, this.length[i]!);
      n++;
    }
    return n;
  }

  /** Records the first `bytes` of the device-writable part as Kiln's own writes (after a readv into it). */
  markWritable(mem: GuestMemory, bytes: number): void {
    for (let i = 0; i < this.count && bytes > 0; i++) {
      if (this.writable[i] !== 1) continue;
      const n = Math.min(bytes, this.length[i]!);
      mem.markWritten(this.region[i]!, this.offset[i]!, n);
      bytes -= n;
    }
  }

  private copy(mem: GuestMemory, toGuest: boolean, skip: number, host: Uint8Array, len: number): number {
    let pos = 0;
    let copied = 0;
    for (let i = 0; i < this.count && copied < len; i++) {
      if ((this.writable[i] === 1) !== toGuest) continue;
      const segStart = pos;
      pos += this.length[i]!;
      const from = Math.max(skip, segStart);
      const to = Math.min(skip + len, pos);
      if (to <= from) continue;
      const at = this.offset[i]! + (from - segStart);
      const guest = mem.regionBytes(this.region[i]!);
      if (toGuest) {
        guest.set(host.subarray(from - skip, to - skip), at);
        mem.markWritten(this.region[i]!, at, to - from);
      } else host.set(guest.subarray(at, at + (to - from)), from - skip);
      copied += to - from;
    }
    return copied;
  }
}

const u64 = (dv: DataView, at: number) => dv.getUint32(at, true) + dv.getUint32(at + 4, true) * 2 ** 32;

/** Reads a ring's configuration from its shared record. */
export function queueAddresses(rec: DataView): { size: number; desc: number; driver: number; device: number } {
  return {
    size: rec.getUint16(QUEUE_RECORD.size, true),
    desc: u64(rec, QUEUE_RECORD.desc),
    driver: u64(rec, QUEUE_RECORD.driver),
    device: u64(rec, QUEUE_RECORD.device),
  };
}

/** Why a queue's configuration cannot be used, or null (checked when the driver enables it). */
export function checkQueueLayout(mem: GuestMemory, rec: DataView, maxSize: number): string | null {
  const { size, desc, driver, device } = queueAddresses(rec);
  if (size === 0 || size > maxSize || (size & (size - 1)) !== 0)
    return `queue size ${size} is not a power of two up to ${maxSize}`;
  // 2.7: descriptor table 16-byte aligned, driver ring 2, device ring 4; each entirely in RAM.
  const parts: Array<[string, number, number, number]> = [
    ['descriptor table', desc, VIRTQ_DESC_BYTES * size, 16],
    ['driver ring', driver, 6 + 2 * size, 2],
    ['device ring', device, 6 + VIRTQ_USED_ELEM_BYTES * size, 4],
  ];
  for (const [name, at, bytes, align] of parts) {
    if (at % align !== 0) return `${name} at 0x${at.toString(16)} is not ${align}-byte aligned`;
    if (mem.findRegion(at, bytes) < 0) return `${name} at 0x${at.toString(16)} (${bytes} bytes) is not in guest RAM`;
  }
  return null;
}

export class SplitQueue {
  private size = 0;
  private desc = 0;
  private driver = 0;
  private device = 0;

  constructor(
    private readonly mem: GuestMemory,
    /** This queue's shared record. */
    readonly rec: DataView,
    /** VIRTIO_F_EVENT_IDX was negotiated. */
    private readonly eventIdx: () => boolean,
  ) {}

  /** Picks up the ring addresses (call after the driver enabled the queue). */
  load(): void {
    const { size, desc, driver, device } = queueAddresses(this.rec);
    this.size = size;
    this.desc = desc;
    this.driver = driver;
    this.device = device;
  }

  get enabled(): boolean {
    return this.rec.getUint16(QUEUE_RECORD.enable, true) === 1;
  }

  private get lastAvail(): number {
    return this.rec.getUint16(QUEUE_RECORD.lastAvail, true);
  }

  /** Requests waiting in the available ring. */
  pending(): number {
    const availIdx = this.mem.loadU16Ordered(this.driver + 2);
    const waiting = (availIdx - this.lastAvail) & 0xffff;
    if (waiting > this.size)
      throw new VirtqueueError(
        `avail.idx ${availIdx} is ${waiting} entries ahead of the device, more than the queue size ${this.size}`,
      );
    return waiting;
  }

  /**
   * Takes the next request into `chain`; false when the ring is empty. With EVENT_IDX
   * it also asks to be notified of the next one (avail_event).
   */
  pop(chain: DescriptorChain): boolean {
    if (!this.peek(chain)) return false;
    this.take();
    return true;
  }

  /** Takes the request peek() just read (the next one in the ring) off it. */
  take(): void {
    const next = (this.lastAvail + 1) & 0xffff;
    this.rec.setUint16(QUEUE_RECORD.lastAvail, next, true);
    if (this.eventIdx() && !this.suppressed)
      this.mem.storeU16Ordered(this.device + 4 + VIRTQ_USED_ELEM_BYTES * this.size, next);
  }

  private suppressed = false;

  /**
   * Notification suppression (2.7.7, 2.7.10): while the device is draining the ring it
   * asks not to be kicked (used.flags NO_NOTIFY, or avail_event left behind); afterwards
   * it asks again and returns whether more arrived meanwhile (the caller drains again).
   */
  setNotify(on: boolean): boolean {
    this.suppressed = !on;
    if (this.eventIdx()) {
      if (on) this.mem.storeU16Ordered(this.device + 4 + VIRTQ_USED_ELEM_BYTES * this.size, this.lastAvail);
    } else {
      this.mem.storeU16Ordered(this.device, on ? 0 : VIRTQ_USED_F_NO_NOTIFY);
    }
    return on && this.pending() > 0;
  }

  /**
   * After a drain that stopped at its budget: requests are still waiting, and kicks are
   * still suppressed, so the caller must come back (VirtioQueues.kickLater).
   */
  leftOver = false;

  /**
   * Pops and hands waiting requests to `handle` with kicks suppressed meanwhile: all of
   * them, or `budget` at most, so a guest that keeps refilling one queue cannot keep
   * the I/O thread from its other devices. `finish`, if given, runs after each run of
   * requests, before the queue is looked at again (a backend that batched their I/O
   * completes it there).
   */
  drain(
    chain: DescriptorChain,
    handle: (chain: DescriptorChain) => void,
    budget = Number.POSITIVE_INFINITY,
    finish?: () => void,
  ): number {
    let done = 0;
    this.leftOver = false;
    do {
      this.setNotify(false);
      while (done < budget && this.pop(chain)) {
        handle(chain);
        done++;
      }
      finish?.();
      if (done >= budget && this.pending() > 0) {
        this.leftOver = true;
        return done;
      }
    } while (this.setNotify(true));
    return done;
  }

  /**
   * Reads the next request (or the `ahead`-th after it) into `chain` without taking it;
   * false when the ring holds no such request.
   */
  peek(chain: DescriptorChain, ahead = 0): boolean {
    try {
      if (this.pending() <= ahead) return false;
      const slot = ((this.lastAvail + ahead) & 0xffff) % this.size;
      const head = this.mem.readU16(this.driver + 4 + 2 * slot);
      if (head >= this.size)
        throw new VirtqueueError(`avail ring slot ${slot} names descriptor ${head}, past the queue size ${this.size}`);
      chain.reset(head);
      this.walk(chain, head);
      return true;
    } catch (err) {
      if (err instanceof GuestMemoryError) throw new VirtqueueError(err.message);
      throw err;
    }
  }

  private walk(chain: DescriptorChain, head: number): void {
    let table = this.desc;
    let tableSize = this.size;
    let index = head;
    let indirect = false;
    let seen = 0;
    for (;;) {
      if (++seen > VIRTQ_MAX_CHAIN || (!indirect && seen > this.size))
        throw new VirtqueueError(
          `descriptor chain from head ${head} loops or is longer than ${indirect ? VIRTQ_MAX_CHAIN : this.size}`,
        );
      const at = table + VIRTQ_DESC_BYTES * index;
      const addr = this.mem.readU32(at) + this.mem.readU32(at + 4) * 2 ** 32;
      const len = this.mem.readU32(at + 8);
      const flags = this.mem.readU16(at + 12);
      const next = this.mem.readU16(at + 14);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        // 2.7.5.3.1: not inside an indirect table, not with NEXT, a whole number of descriptors.
        if (indirect) throw new VirtqueueError(`indirect descriptor inside an indirect table (head ${head})`);
        if (flags & VIRTQ_DESC_F_NEXT) throw new VirtqueueError(`descriptor ${index} sets both INDIRECT and NEXT`);
        if (len === 0 || len % VIRTQ_DESC_BYTES !== 0 || len / VIRTQ_DESC_BYTES > VIRTQ_MAX_CHAIN)
          throw new VirtqueueError(
            `indirect table of ${len} bytes is empty, ragged or longer than ${VIRTQ_MAX_CHAIN} descriptors`,
          );
        if (this.mem.findRegion(addr, len) < 0)
          throw new VirtqueueError(`indirect table at 0x${addr.toString(16)} (${len} bytes) is not in guest RAM`);
        indirect = true;
        table = addr;
        tableSize = len / VIRTQ_DESC_BYTES;
        index = 0;
        seen = 0;
        continue;
      }
      this.addSegments(chain, addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if (!(flags & VIRTQ_DESC_F_NEXT)) return;
      if (next >= tableSize)
        throw new VirtqueueError(
          `descriptor ${index} links to ${next}, past the ${indirect ? 'indirect table' : 'queue'} size ${tableSize}`,
        );
      index = next;
    }
  }

  private addSegments(chain: DescriptorChain, addr: number, len: number, writable: boolean): void {
    if (!writable && chain.writableBytes > 0)
      throw new VirtqueueError(
        `descriptor chain from head ${chain.head} has a device-readable buffer after a device-writable one`,
      );
    let at = addr;
    let left = len;
    do {
      const region = this.mem.findRegion(at, 0);
      if (region < 0 || !Number.isSafeInteger(at + left))
        throw new VirtqueueError(`buffer at 0x${at.toString(16)} (${len} bytes) is not in guest RAM`);
      const r = this.mem.regions[region]!;
      const piece = Math.min(left, r.guestPhysAddr + r.size - at);
      if (chain.count >= chain.region.length)
        throw new VirtqueueError(`descriptor chain from head ${chain.head} has too many segments`);
      const n = chain.count++;
      chain.region[n] = region;
      chain.offset[n] = at - r.guestPhysAddr;
      chain.length[n] = piece;
      chain.writable[n] = writable ? 1 : 0;
      at += piece;
      left -= piece;
      // A piece of 0 bytes means the buffer runs past the end of the last region.
      if (piece === 0 && left > 0)
        throw new VirtqueueError(`buffer at 0x${addr.toString(16)} (${len} bytes) runs out of guest RAM`);
    } while (left > 0);
    if (writable) chain.writableBytes += len;
    else chain.readableBytes += len;
  }

  /** Returns a request to the driver: `written` bytes were written into its buffers. */
  push(head: number, written: number): void {
    const used = this.rec.getUint16(QUEUE_RECORD.usedIdx, true);
    const elem = this.device + 4 + VIRTQ_USED_ELEM_BYTES * (used % this.size);
    this.mem.writeU32(elem, head);
    this.mem.writeU32(elem + 4, written);
    const next = (used + 1) & 0xffff;
    this.rec.setUint16(QUEUE_RECORD.usedIdx, next, true);
    this.mem.storeU16Ordered(this.device + 2, next);
  }

  /** Whether the driver wants an interrupt for what was pushed since the last one (2.7.10). */
  shouldInterrupt(): boolean {
    const used = this.rec.getUint16(QUEUE_RECORD.usedIdx, true);
    if (!this.eventIdx()) return (this.mem.readU16(this.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    const valid = this.rec.getUint8(QUEUE_RECORD.signalledValid) === 1;
    const old = this.rec.getUint16(QUEUE_RECORD.signalledUsed, true);
    this.rec.setUint16(QUEUE_RECORD.signalledUsed, used, true);
    this.rec.setUint8(QUEUE_RECORD.signalledValid, 1);
    if (!valid) return true;
    const usedEvent = this.mem.loadU16Ordered(this.driver + 4 + 2 * this.size);
    // vring_need_event: interrupt if used_event lies in (old, used].
    return ((used - usedEvent - 1) & 0xffff) < ((used - old) & 0xffff);
  }
}

/** Device reset of one queue: registers and ring positions cleared, the size back at the device's maximum (4.1.4.3.2). */
export function resetQueueRecord(rec: DataView, maxSize: number): void {
  for (let i = 0; i < QUEUE_RECORD.bytes; i++) rec.setUint8(i, 0);
  rec.setUint16(QUEUE_RECORD.size, maxSize, true);
}

/**
 * Guest-memory segments (region, offset, length) kept per slot of a device's batch, past
 * the DescriptorChain they were read from (one chain object is reused for every request).
 */
export class SlotSegments {
  private readonly count: Uint16Array;
  private readonly region: Int32Array;
  private readonly offset: Float64Array;
  private readonly length: Float64Array;

  constructor(
    slots: number,
    private readonly perSlot: number,
  ) {
    this.count = new Uint16Array(slots);
    this.region = new Int32Array(slots * perSlot);
    this.offset = new Float64Array(slots * perSlot);
    this.length = new Float64Array(slots * perSlot);
  }

  /** Slot `i` keeps `chain`'s device-writable segments (perSlot at most). */
  keepWritable(i: number, chain: DescriptorChain): void {
    const base = i * this.perSlot;
    let k = 0;
    for (let s = 0; s < chain.count && k < this.perSlot; s++) {
      if (chain.writable[s] !== 1) continue;
      this.region[base + k] = chain.region[s]!;
      this.offset[base + k] = chain.offset[s]!;
      this.length[base + k] = chain.length[s]!;
      k++;
    }
    this.count[i] = k;
  }

  /** Slot `i` keeps the first `n` (perSlot at most) of the segments given. */
  keep(i: number, n: number, region: Int32Array, offset: Float64Array, length: Float64Array): void {
    const base = i * this.perSlot;
    this.region.set(region.subarray(0, n), base);
    this.offset.set(offset.subarray(0, n), base);
    this.length.set(length.subarray(0, n), base);
    this.count[i] = n;
  }

  /** Copies slot `i`'s segments into the arrays given (perSlot long at least); returns how many. */
  copyOut(i: number, region: Int32Array, offset: Float64Array, length: Float64Array): number {
    const base = i * this.perSlot;
    const n = this.count[i]!;
    region.set(this.region.subarray(base, base + n));
    offset.set(this.offset.subarray(base, base + n));
    length.set(this.length.subarray(base, base + n));
    return n;
  }

  /** Records the first `bytes` of slot `i`'s segments as Kiln's own writes (after a read into them). */
  markWritten(i: number, mem: GuestMemory, bytes: number): void {
    const base = i * this.perSlot;
    for (let k = 0; k < this.count[i]! && bytes > 0; k++) {
      const n = Math.min(bytes, this.length[base + k]!);
      mem.markWritten(this.region[base + k]!, this.offset[base + k]!, n);
      bytes -= n;
    }
  }
}
