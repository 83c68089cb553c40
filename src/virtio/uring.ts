// A small io_uring for a device's batches of vectored reads and writes: the I/O thread
// puts one readv or writev per request in the submission ring and makes one
// io_uring_enter for all of them, instead of one system call per request (a system call
// costs about 1 µs on the development machine, more than a frame's copy).
//
// Security: an io_uring's operations are not seen by seccomp, so each ring is made
// disabled (IORING_SETUP_R_DISABLED), restricted to READV and WRITEV with no SQE flags and
// no later io_uring_register, and only then enabled; it is made before the I/O thread
// loads its seccomp filter, which allows io_uring_enter alone (not setup or register).
// A host where io_uring is unavailable or restricted (kernel.io_uring_disabled, a
// container's filter, a kernel before 5.10) gets no ring: the device makes one system
// call per request, as before.
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import { IOVEC_BYTES } from './queue.js';

export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
/**
 * A read with nothing to read, or a write with no room, ends -EAGAIN at once instead of
 * waiting in the kernel (the I/O thread polls the fd itself; a frame with no room is dropped).
 */
export const RWF_NOWAIT = 8;
const IORING_SETUP_R_DISABLED = 1 << 6;
const IORING_FEAT_SINGLE_MMAP = 1;
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;
const IORING_ENTER_GETEVENTS = 1;
const IORING_REGISTER_RESTRICTIONS = 11;
const IORING_REGISTER_ENABLE_RINGS = 12;
const IORING_RESTRICTION_SQE_OP = 1;
const PARAMS_BYTES = 120;
const SQE_BYTES = 64;
const CQE_BYTES = 16;
const RESTRICTION_BYTES = 16;

/** struct io_uring_params's offsets: the SQ ring's fields from 40, the CQ ring's from 80. */
const P = {
  sqEntries: 0,
  cqEntries: 4,
  flags: 8,
  features: 20,
  sq: { head: 40, tail: 44, mask: 48, array: 64 },
  cq: { head: 80, tail: 84, mask: 88, cqes: 100 },
} as const;

let ringsAllowed = true;

/**
 * Whether devices may make rings: the I/O thread turns them off when its seccomp filter
 * does not allow io_uring_enter (a --seccomp-filter file written before Kiln used it),
 * so the devices make one system call per request instead of being killed at the first.
 */
export function allowRings(on: boolean): void {
  ringsAllowed = on;
}

export class IoRing {
  /** Requests one submit takes. */
  readonly slots: number;
  /** Each slot's struct iovec[] (in native memory, where the kernel reads it): `iovPerSlot` entries. */
  readonly iovPerSlot: number;
  /** The results of the last submit, by slot: bytes moved, or -errno. */
  readonly results: Int32Array;
  private readonly sqTail: Uint32Array;
  private readonly cqHead: Uint32Array;
  private readonly cqTail: Uint32Array;
  private readonly sqMask: number;
  private readonly cqMask: number;
  private readonly cqes: DataView;
  private readonly sqes: DataView;
  private readonly iovArena: Buffer;
  private readonly iovBase: number;
  private tail: number;
  private readonly maps: Array<[bigint, number]>;

  private constructor(
    private readonly fd: number,
    params: Buffer,
    maps: Array<[bigint, number]>,
    sqRing: ArrayBuffer,
    cqRing: ArrayBuffer,
    sqes: ArrayBuffer,
    iov: { address: bigint; bytes: number; perSlot: number },
  ) {
    this.maps = maps;
    this.slots = params.readUInt32LE(P.sqEntries);
    this.results = new Int32Array(this.slots);
    const u32 = (ring: ArrayBuffer, at: number) => new Uint32Array(ring, params.readUInt32LE(at), 1);
    this.sqTail = u32(sqRing, P.sq.tail);
    this.cqHead = u32(cqRing, P.cq.head);
    this.cqTail = u32(cqRing, P.cq.tail);
    this.sqMask = new Uint32Array(sqRing, params.readUInt32LE(P.sq.mask), 1)[0]!;
    this.cqMask = new Uint32Array(cqRing, params.readUInt32LE(P.cq.mask), 1)[0]!;
    this.cqes = new DataView(cqRing, params.readUInt32LE(P.cq.cqes));
    this.sqes = new DataView(sqes);
    // Slot i's SQE is always entry i: the indirection array is filled once.
    const array = new Uint32Array(sqRing, params.readUInt32LE(P.sq.array), this.slots);
    for (let i = 0; i < this.slots; i++) array[i] = i;
    this.tail = Atomics.load(this.sqTail, 0);
    this.iovArena = Buffer.from(libc.view(iov.address, iov.bytes));
    this.iovBase = Number(iov.address);
    this.iovPerSlot = iov.perSlot;
  }

  /**
   * A ring of `slots` entries (a power of two) whose iovec arena holds `iovPerSlot` per
   * slot, restricted to readv and writev; null where the host has none to give.
   */
  static open(slots: number, iovPerSlot: number): IoRing | null {
    if (!ringsAllowed) return null;
    const params = Buffer.alloc(PARAMS_BYTES);
    params.writeUInt32LE(IORING_SETUP_R_DISABLED, P.flags);
    const fd = libc.ioUringSetup(slots, params);
    if (fd < 0) return null;
    const maps: Array<[bigint, number]> = [];
    const map = (bytes: number, offset: number): ArrayBuffer | null => {
      const at = libc.mmap(null, bytes, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, offset);
      if (at === libc.MAP_FAILED) return null;
      maps.push([at, bytes]);
      return libc.view(at, bytes);
    };
    const fail = () => {
      for (const [at, bytes] of maps) libc.munmap(at, bytes);
      libc.close(fd);
      return null;
    };
    const entries = params.readUInt32LE(P.sqEntries);
    const sqBytes = params.readUInt32LE(P.sq.array) + entries * 4;
    const cqBytes = params.readUInt32LE(P.cq.cqes) + params.readUInt32LE(P.cqEntries) * CQE_BYTES;
    const single = (params.readUInt32LE(P.features) & IORING_FEAT_SINGLE_MMAP) !== 0;
    const sqRing = map(single ? Math.max(sqBytes, cqBytes) : sqBytes, IORING_OFF_SQ_RING);
    const cqRing = single ? sqRing : map(cqBytes, IORING_OFF_CQ_RING);
    const sqes = map(entries * SQE_BYTES, IORING_OFF_SQES);
    if (!sqRing || !cqRing || !sqes) return fail();
    // Only readv and writev, no SQE flags (none allowed when none is listed), no register op.
    const rules = Buffer.alloc(2 * RESTRICTION_BYTES);
    [IORING_OP_READV, IORING_OP_WRITEV].forEach((op, i) => {
      rules.writeUInt16LE(IORING_RESTRICTION_SQE_OP, i * RESTRICTION_BYTES);
      rules.writeUInt8(op, i * RESTRICTION_BYTES + 2);
    });
    if (libc.ioUringRegister(fd, IORING_REGISTER_RESTRICTIONS, rules, 2) < 0) return fail();
    if (libc.ioUringRegister(fd, IORING_REGISTER_ENABLE_RINGS, null, 0) < 0) return fail();
    const iovBytes = entries * iovPerSlot * IOVEC_BYTES;
    let arena: bigint;
    try {
      arena = libc.mapAnonymous(iovBytes).addr;
    } catch {
      return fail();
    }
    maps.push([arena, iovBytes]);
    return new IoRing(fd, params, maps, sqRing, cqRing, sqes, {
      address: arena,
      bytes: iovBytes,
      perSlot: iovPerSlot,
    });
  }

  /** Slot `slot`'s iovec array, to fill (DescriptorChain.iovecs). */
  iovs(slot: number): Buffer {
    const bytes = this.iovPerSlot * IOVEC_BYTES;
    return this.iovArena.subarray(slot * bytes, (slot + 1) * bytes);
  }

  /** Native address of slot `slot`'s iovec `index`. */
  iovAddress(slot: number, index = 0): number {
    return this.iovBase + (slot * this.iovPerSlot + index) * IOVEC_BYTES;
  }

  /**
   * Slot `slot` (0 to slots-1) of the next submit: `op` on `fd` over `count` of the
   * slot's iovecs, at file offset `position` (-1: the file's own position; a TAP has
   * none), with `flags` (RWF_*; RWF_NOWAIT unless told otherwise).
   */
  prepare(
    slot: number,
    op: typeof IORING_OP_READV | typeof IORING_OP_WRITEV,
    fd: number,
    count: number,
    position = -1,
    flags = RWF_NOWAIT,
  ): void {
    const at = ((this.tail + slot) & this.sqMask) * SQE_BYTES;
    const s = this.sqes;
    s.setUint32(at, op, true); // opcode, flags 0, ioprio 0
    s.setInt32(at + 4, fd, true);
    if (position < 0) {
      s.setUint32(at + 8, 0xffffffff, true);
      s.setUint32(at + 12, 0xffffffff, true);
    } else {
      s.setUint32(at + 8, position % 2 ** 32, true);
      s.setUint32(at + 12, Math.floor(position / 2 ** 32), true);
    }
    const addr = this.iovAddress(slot);
    s.setUint32(at + 16, addr % 2 ** 32, true);
    s.setUint32(at + 20, Math.floor(addr / 2 ** 32), true);
    s.setUint32(at + 24, count, true);
    s.setUint32(at + 28, flags, true); // rw_flags
    s.setUint32(at + 32, slot, true); // user_data
    s.setUint32(at + 36, 0, true);
    for (let k = 40; k < SQE_BYTES; k += 4) s.setUint32(at + k, 0, true);
  }

  /**
   * Submits slots 0 to n-1 and waits until all of them completed (with RWF_NOWAIT they
   * complete within the submit); their results are in `results`. Returns false if the
   * kernel took none of them (the ring is left as it was: the caller does them itself).
   */
  submit(n: number): boolean {
    this.tail = (this.tail + n) >>> 0;
    Atomics.store(this.sqTail, 0, this.tail);
    let submitted = 0;
    let reaped = 0;
    while (reaped < n) {
      const r = libc.ioUringEnter(this.fd, n - submitted, n - reaped, IORING_ENTER_GETEVENTS);
      if (r < 0) {
        const e = libc.errno();
        if (submitted === 0 && e !== libc.EINTR) {
          this.tail = (this.tail - n) >>> 0;
          Atomics.store(this.sqTail, 0, this.tail);
          return false;
        }
        // Taken but not all reaped: the requests are in flight, so waiting is the only way on.
        if (e !== libc.EINTR && e !== libc.EAGAIN && e !== libc.EBUSY)
          throw new KilnError(`io_uring_enter failed: ${libc.errnoName(e)}`);
      } else submitted += r;
      let head = Atomics.load(this.cqHead, 0);
      const tail = Atomics.load(this.cqTail, 0);
      while (head !== tail) {
        const at = (head & this.cqMask) * CQE_BYTES;
        this.results[this.cqes.getUint32(at, true)] = this.cqes.getInt32(at + 8, true);
        head = (head + 1) >>> 0;
        reaped++;
      }
      Atomics.store(this.cqHead, 0, head);
    }
    return true;
  }

  close(): void {
    for (const [at, bytes] of this.maps) libc.munmap(at, bytes);
    libc.close(this.fd);
  }
}
