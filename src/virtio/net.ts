// virtio-net (virtio 1.2, 5.1) with two host ends:
// - TAP: /dev/net/tun with IFF_VNET_HDR, so the 12-byte virtio_net_hdr passes straight
//   through and checksum and TSO offloads cost nothing (the host kernel does the work);
// - passt: rootless networking over passt's Unix socket, each frame preceded by its
//   length (4 bytes, big-endian); no offloads (passt wants whole frames), and when passt
//   dies the link goes down (config status, a configuration interrupt) and the VM runs on.
// On TAP, frames move between the TAP's fd and guest memory with one readv/writev each,
// pointing into the guest's buffers (no copy). Queue 0 receives, queue 1 transmits. Each NIC has its own MAC address. A NIC MMDS is
// enabled on answers the guest's ARP and TCP to the MMDS address itself (mmds/stack.ts).
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import { MmdsService, type MmdsVersion } from '../mmds/service.js';
import { MmdsStack } from '../mmds/stack.js';
import { MmdsReader } from '../mmds/store.js';
import { chainBytes, SharedRateLimiter } from './rate-limiter.js';
import { DeviceCounters, NET_COUNTERS } from './counters.js';
import { array, struct, union } from '../kvm/struct.js';
import { bit, type VirtioBackend, type VirtioDeviceType, type VirtioQueues } from './device.js';
import { IOVEC_BYTES, SlotSegments, writeIovec, type DescriptorChain, type SplitQueue } from './queue.js';
import { IORING_OP_READV, IORING_OP_WRITEV, IoRing } from './uring.js';

export const VIRTIO_NET_F_CSUM = 0n;
export const VIRTIO_NET_F_GUEST_CSUM = 1n;
export const VIRTIO_NET_F_MTU = 3n;
export const VIRTIO_NET_F_GUEST_TSO4 = 7n;
export const VIRTIO_NET_F_GUEST_TSO6 = 8n;
export const VIRTIO_NET_F_MAC = 5n;
export const VIRTIO_NET_F_HOST_TSO4 = 11n;
export const VIRTIO_NET_F_HOST_TSO6 = 12n;
export const VIRTIO_NET_F_STATUS = 16n;
export const VIRTIO_NET_S_LINK_UP = 1;
/** struct virtio_net_hdr with VERSION_1 (num_buffers included): 12 bytes (5.1.6). */
export const VIRTIO_NET_HDR_BYTES = 12;
export const NET_CONFIG = { mac: 0, status: 6, maxVirtqueuePairs: 8, mtu: 10, bytes: 12 } as const;
export const NET_RX_QUEUE = 0;
export const NET_TX_QUEUE = 1;
/** The largest frame: a 64 KiB TSO segment plus headers. */
const MAX_FRAME = 65_550;
/** The most iovecs one readv/writev takes (Linux's IOV_MAX); a longer chain is copied. */
const MAX_IOV = 1024;
const OVERFLOW_BYTES = 4096;
/**
 * Frames moved each way per wake-up before the I/O thread turns to its other ready work
 * (a guest or a host flooding one queue cannot keep its other devices waiting).
 */
export const NET_FRAMES_PER_TURN = 128;
/** Frames one io_uring submit moves (TAP), and the iovecs each may use (a longer chain goes alone). */
const BATCH_SLOTS = 16;
const BATCH_IOV = 24;
const TUN_F_CSUM = 0x01;
const TUN_F_TSO4 = 0x02;
const TUN_F_TSO6 = 0x04;
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const TUNSETIFF = 0x400454ca;
const TUNSETOFFLOAD = 0x400454d0;
const TUNSETVNETHDRSZ = 0x400454d8;
const IFNAMSIZ = 16;

/** A NIC's host end (opened by openNet) and its MAC. */
export interface NetOptions {
  readonly fd: number;
  readonly mac: string;
  readonly backend: 'tap' | 'passt';
  /** The MTU to tell the guest (VIRTIO_NET_F_MTU); none: not offered, the guest picks its own. */
  readonly mtu?: number;
  /** MMDS on this NIC (PUT /mmds/config named it): frames to its address are answered by the VMM. */
  readonly mmds?: NetMmdsOptions;
  /** Rate limiters for frames to the guest (rx) and from it (tx): rate-limiter.ts's shared cells. */
  readonly rxLimiter?: SharedArrayBuffer;
  readonly txLimiter?: SharedArrayBuffer;
  /** Where the I/O thread counts frames and bytes for the metrics (counters.ts). */
  readonly counters?: SharedArrayBuffer;
}

export interface NetMmdsOptions {
  /** The data store's shared memory (mmds/store.ts). */
  readonly store: SharedArrayBuffer;
  /** Its IPv4 address, as a number. */
  readonly ipv4: number;
  readonly version: MmdsVersion;
  readonly imdsCompat: boolean;
}

const isPasst = (o: NetOptions) => o.backend === 'passt';

export const netType: VirtioDeviceType<NetOptions> = {
  deviceId: 1,
  name: 'net',
  maxQueueSize: 256,
  queues: () => 2,
  features: (o) =>
    bit(VIRTIO_NET_F_MAC) |
    bit(VIRTIO_NET_F_STATUS) |
    (o.mtu !== undefined ? bit(VIRTIO_NET_F_MTU) : 0n) |
    (isPasst(o)
      ? 0n
      : bit(VIRTIO_NET_F_CSUM) |
        bit(VIRTIO_NET_F_GUEST_CSUM) |
        bit(VIRTIO_NET_F_GUEST_TSO4) |
        bit(VIRTIO_NET_F_GUEST_TSO6) |
        bit(VIRTIO_NET_F_HOST_TSO4) |
        bit(VIRTIO_NET_F_HOST_TSO6)),
  configBytes: () => NET_CONFIG.bytes,
  initConfig(config, o) {
    parseMac(o.mac).forEach((b, i) => config.setUint8(NET_CONFIG.mac + i, b));
    config.setUint16(NET_CONFIG.status, VIRTIO_NET_S_LINK_UP, true);
    config.setUint16(NET_CONFIG.maxVirtqueuePairs, 1, true);
    config.setUint16(NET_CONFIG.mtu, o.mtu ?? 1500, true);
  },
};

export function parseMac(mac: string): number[] {
  const m = /^([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2})$/i.exec(mac);
  if (!m) throw new KilnError(`'${mac}' is not a MAC address (expected six hex pairs, like 06:00:ac:10:00:02)`);
  const bytes = m.slice(1).map((h) => parseInt(h, 16));
  if (bytes[0]! & 1) throw new KilnError(`MAC address ${mac} is a multicast address`);
  return bytes;
}

/** A locally administered MAC derived from `seed` (stable for a VM's NIC index). */
export function defaultMac(seed: number): string {
  const b = [0x06, 0x00, (seed >>> 24) & 0xff, (seed >>> 16) & 0xff, (seed >>> 8) & 0xff, seed & 0xff];
  return b.map((x) => x.toString(16).padStart(2, '0')).join(':');
}

/** <net/if.h>'s struct ifmap, the largest member of ifreq's union (so it sets the union's size). */
const ifmap = struct('ifmap', [
  ['mem_start', 'u64'],
  ['mem_end', 'u64'],
  ['base_addr', 'u16'],
  ['irq', 'u8'],
  ['dma', 'u8'],
  ['port', 'u8'],
]);
/** <net/if.h>'s struct ifreq, with the members TUNSETIFF uses. */
export const ifreq = struct('ifreq', [
  ['ifr_name', array('u8', IFNAMSIZ)],
  [
    'ifr_ifru',
    union('', [
      ['ifru_flags', 'i16'],
      ['ifru_map', ifmap],
    ]),
  ],
]);

/** Opens (creating if needed) the TAP interface `name`, nonblocking, with vnet headers. */
export function openTap(name: string): number {
  if (!name || Buffer.byteLength(name) >= IFNAMSIZ || !/^[\w.-]+$/.test(name))
    throw new KilnError(`'${name}' is not a valid interface name (1-15 letters, digits, '-', '_' or '.')`);
  const fd = libc.open('/dev/net/tun', libc.O_RDWR | libc.O_NONBLOCK | libc.O_CLOEXEC, 0);
  if (fd < 0)
    throw new KilnError(
      `cannot open /dev/net/tun: ${libc.errnoName(libc.errno())} (TAP networking needs CAP_NET_ADMIN; use the passt backend without it)`,
    );
  const ifr = Buffer.alloc(ifreq.size);
  ifr.write(name, ifreq.offsetOf('ifr_name'));
  ifr.writeUInt16LE(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, ifreq.offsetOf('ifr_ifru.ifru_flags'));
  const hdrSize = Buffer.alloc(4);
  hdrSize.writeInt32LE(VIRTIO_NET_HDR_BYTES);
  if (libc.ioctlPtr(fd, TUNSETIFF, ifr) < 0 || libc.ioctlPtr(fd, TUNSETVNETHDRSZ, hdrSize) < 0) {
    const e = libc.errno();
    libc.close(fd);
    throw new KilnError(`cannot attach to TAP '${name}': ${libc.errnoName(e)} (${libc.strerror(e)})`);
  }
  return fd;
}

const TUNSETPERSIST = 0x400454cb;
const TUNSETOWNER = 0x400454cc;
const TUNSETGROUP = 0x400454ce;
const TUNGETIFF = 0x800454d2;
const IFF_PERSIST = 0x0800;

function tapControl(name: string, work: (fd: number, flags: number) => void): void {
  const fd = openTap(name);
  try {
    const ifr = Buffer.alloc(ifreq.size);
    if (libc.ioctlPtr(fd, TUNGETIFF, ifr) < 0)
      throw new KilnError(`cannot read TAP '${name}': ${libc.errnoName(libc.errno())}`);
    work(fd, ifr.readUInt16LE(ifreq.offsetOf('ifr_ifru.ifru_flags')));
  } finally {
    libc.close(fd);
  }
}

/**
 * Makes TAP `name` usable by `uid`:`gid` without CAP_NET_ADMIN (a jailed VMM), as
 * `ip tuntap add ... user UID` does: owned, and persistent so it outlives this open.
 * Returns whether Kiln made it persistent (and so must undo that when the VM stops).
 */
export function lendTap(name: string, uid: number, gid: number): boolean {
  let made = false;
  tapControl(name, (fd, flags) => {
    made = (flags & IFF_PERSIST) === 0;
    for (const [request, value, what] of [
      [TUNSETOWNER, uid, 'owner'],
      [TUNSETGROUP, gid, 'group'],
      [TUNSETPERSIST, 1, 'persistence'],
    ] as const) {
      if (libc.ioctlInt(fd, request, value) < 0)
        throw new KilnError(`cannot set TAP '${name}''s ${what}: ${libc.errnoName(libc.errno())}`);
    }
  });
  return made;
}

/** Undoes lendTap's persistence: the TAP goes away once its VMM has closed it. */
export function releaseTap(name: string): void {
  tapControl(name, (fd) => {
    libc.ioctlInt(fd, TUNSETPERSIST, 0);
  });
}

/** Connects to passt's Unix socket. */
export function connectPasst(path: string): number {
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
  // Blocking for connect; nonblocking afterwards, so the I/O thread never waits on passt.
  if (fd < 0) throw new KilnError(`socket failed: ${libc.errnoName(libc.errno())}`);
  if (libc.connect(fd, libc.sockaddrUn(path), libc.sockaddr_un.size) < 0) {
    const e = libc.errno();
    libc.close(fd);
    throw new KilnError(
      `cannot connect to passt at '${path}': ${libc.errnoName(e)} (is passt running with --socket ${path}?)`,
    );
  }
  const F_SETFL = 4;
  libc.fcntlInt(fd, F_SETFL, libc.O_NONBLOCK);
  return fd;
}

export class NetBackend implements VirtioBackend {
  private readonly fd: number;
  private readonly passt: boolean;
  private readonly tx = Buffer.alloc(4 + VIRTIO_NET_HDR_BYTES + MAX_FRAME);
  /** Where a frame is gathered: after room for passt's length prefix. */
  private readonly txBody = this.tx.subarray(4);
  private readonly rx = Buffer.alloc(VIRTIO_NET_HDR_BYTES + MAX_FRAME);
  /** struct iovec[] over a chain's buffers in guest memory (TAP's readv/writev). */
  private readonly iov = Buffer.alloc(MAX_IOV * IOVEC_BYTES);
  /** The same, less the last entry, which a readv points at `overflow`. */
  private readonly rxIov = this.iov.subarray(0, (MAX_IOV - 1) * IOVEC_BYTES);
  /**
   * A page outside guest memory that a readv fills after the guest's buffers: TAP returns
   * only what it copied, so a frame that did not fit shows as bytes landing here. Mapped
   * at the first direct read (0: not yet).
   */
  private overflow = 0n;
  /** TAP: batches of readv/writev in one system call (null: none, one call per frame). */
  private readonly ring: IoRing | null;
  /** The batch's requests: head, device-writable bytes, and (rx) where their writable segments lie. */
  private readonly batch = new SavedChains(BATCH_SLOTS, BATCH_IOV);
  /** Reads the next receive batch tries (1 to BATCH_SLOTS), following how many frames the last found. */
  private rxGuess = 1;
  /** The last receive batch found the TAP empty. */
  private rxDrained = false;
  /** passt: bytes of the stream read but not yet delivered. */
  private readonly stream = Buffer.alloc(2 * (4 + MAX_FRAME));
  private streamBytes = 0;
  private linkUp = true;
  /** passt: the rest of a frame its socket did not take yet; TX waits behind it. */
  private pendingTx: Buffer | null = null;
  private offloads = -1;
  private errorLogged = false;
  readonly pollFds;
  /** MMDS on this NIC: the guest's frames to its address stop here, and its answers wait in its queue. */
  private readonly mmds: MmdsStack | null;
  private readonly rxLimiter: SharedRateLimiter | null;
  private readonly txLimiter: SharedRateLimiter | null;
  private readonly counters: DeviceCounters<(typeof NET_COUNTERS)[number]> | null;
  /** A frame read from the host end that the rx limiter held back (its bytes in `rx`, header included); 0: none. */
  private heldRx = 0;

  constructor(
    private readonly rt: VirtioQueues,
    options: NetOptions,
  ) {
    this.fd = options.fd;
    this.passt = isPasst(options);
    this.pollFds = [{ fd: this.fd, ready: () => this.ready() }];
    this.rxLimiter = options.rxLimiter ? new SharedRateLimiter(options.rxLimiter) : null;
    this.txLimiter = options.txLimiter ? new SharedRateLimiter(options.txLimiter) : null;
    this.counters = options.counters ? new DeviceCounters(NET_COUNTERS, options.counters) : null;
    // Made here, before the I/O thread's seccomp filter (which lets it enter a ring, not make one).
    this.ring = this.passt ? null : IoRing.open(BATCH_SLOTS, BATCH_IOV);
    const m = options.mmds;
    if (m) {
      const service = new MmdsService(new MmdsReader(m.store), m.version, m.imdsCompat);
      this.mmds = new MmdsStack(m.ipv4, (req) => service.answer(req));
    } else this.mmds = null;
  }

  private fail(what: string, errno: number): void {
    if (this.errorLogged) return;
    this.errorLogged = true;
    this.rt.log(
      `virtio-net: ${what}: ${libc.errnoName(errno)} (${libc.strerror(errno)}); frames are dropped (further errors not logged)`,
    );
  }

  private linkDown(why: string): void {
    if (!this.linkUp) return;
    this.linkUp = false;
    this.rt.log(`virtio-net: ${why}; the link is down`);
    this.rt.state.config().setUint16(NET_CONFIG.status, 0, true);
    this.rt.setPollable(this.fd, false);
    this.rt.configChanged();
  }

  /**
   * TAP offloads follow what the driver accepted: partial checksums with GUEST_CSUM, and
   * TCP segments larger than the MTU only with GUEST_TSO4/6 (a driver without them posts
   * MTU-sized buffers, so the host kernel must cut the segments itself).
   */
  private syncOffloads(): void {
    if (this.passt) return;
    const s = this.rt.state;
    const csum = s.negotiated(VIRTIO_NET_F_GUEST_CSUM);
    const want = csum
      ? TUN_F_CSUM |
        (s.negotiated(VIRTIO_NET_F_GUEST_TSO4) ? TUN_F_TSO4 : 0) |
        (s.negotiated(VIRTIO_NET_F_GUEST_TSO6) ? TUN_F_TSO6 : 0)
      : 0;
    if (want === this.offloads) return;
    this.offloads = want;
    if (libc.ioctlInt(this.fd, TUNSETOFFLOAD, want) < 0) this.fail('TUNSETOFFLOAD', libc.errno());
  }

  queueNotified(q: number): void {
    this.syncOffloads();
    if (q === NET_TX_QUEUE) this.transmit();
    else if (this.mmds && this.mmds.out.length > 0) this.deliverMmds();
    if (q !== NET_TX_QUEUE && this.linkUp) {
      // The driver gave us receive buffers: watch the host end again.
      this.rt.setPollable(this.fd, true);
      this.receive();
    }
  }

  reset(): void {
    this.offloads = -1;
    this.heldRx = 0;
  }

  /** The host end is readable, or (passt, with a frame waiting) writable again. */
  private ready(): void {
    if (this.pendingTx) {
      const rest = this.pendingTx;
      this.pendingTx = null;
      this.rt.setWritable(this.fd, false);
      this.writeAll(rest);
      // Drained: the frames the guest queued meanwhile go now.
      if (!this.pendingTx) this.rt.kickLater(NET_TX_QUEUE);
    }
    this.receive();
  }

  private transmit(): void {
    const queue = this.rt.queue(NET_TX_QUEUE);
    const chain = this.rt.chain;
    let done = 0;
    // passt's socket is full: the guest's frames stay in its ring (TX backpressure) until it drains.
    const limited = this.txLimiter?.active === true;
    if (this.ring && !limited && !this.mmds && this.linkUp) done = this.transmitBatches(queue, this.ring);
    while (!this.pendingTx && done < NET_FRAMES_PER_TURN && (limited ? queue.peek(chain) : queue.pop(chain))) {
      if (limited && this.txLimiter) {
        // The frame (less its virtio header) passes the tx limiter, or waits in the ring.
        const bytes = Math.max(0, chainBytes(chain, false) - VIRTIO_NET_HDR_BYTES);
        if (!this.txLimiter.consume(bytes)) {
          this.rt.kickAfter(NET_TX_QUEUE, this.txLimiter.waitMs(bytes));
          break;
        }
        if (!queue.pop(chain)) break;
      }
      if (this.passt || this.mmds || !this.linkUp || !this.writeDirect(chain)) this.sendCopy(chain);
      queue.push(chain.head, 0);
      done++;
    }
    if (done > 0) this.rt.notifyUsed(NET_TX_QUEUE);
    // At the budget with frames still waiting: back after the other ready work.
    if (done >= NET_FRAMES_PER_TURN && !this.pendingTx && queue.pending() > 0) this.rt.kickLater(NET_TX_QUEUE);
    if (this.mmds && this.mmds.out.length > 0) this.deliverMmds();
  }

  /**
   * TAP: the guest's frames, up to BATCH_SLOTS a system call (one io_uring submit of a
   * writev each, straight from guest memory, in ring order); returns how many it took.
   */
  private transmitBatches(queue: SplitQueue, ring: IoRing): number {
    const chain = this.rt.chain;
    const b = this.batch;
    let done = 0;
    for (;;) {
      let n = 0;
      let alone = false;
      while (n < ring.slots && done < NET_FRAMES_PER_TURN && queue.pop(chain)) {
        done++;
        const frameBytes = chain.readableBytes - VIRTIO_NET_HDR_BYTES;
        // No frame, or more than the largest one: dropped, as the copying path drops it.
        if (frameBytes <= 0 || frameBytes > MAX_FRAME) {
          queue.push(chain.head, 0);
          continue;
        }
        const count = chain.iovecs(this.rt.mem, false, ring.iovs(n));
        if (count < 0) {
          alone = true;
          break;
        }
        ring.prepare(n, IORING_OP_WRITEV, this.fd, count);
        b.heads[n] = chain.head;
        b.iovCount[n] = count;
        this.counters?.add('tx_packets_count');
        this.counters?.add('tx_bytes_count', frameBytes);
        n++;
      }
      if (n > 0) {
        if (!ring.submit(n))
          // The kernel took none of them: one writev each.
          for (let i = 0; i < n; i++)
            ring.results[i] = libc.writev(this.fd, ring.iovs(i), b.iovCount[i]!) < 0 ? -libc.errno() : 0;
        for (let i = 0; i < n; i++) {
          const r = ring.results[i]!;
          if (r < 0 && r !== -libc.EAGAIN) this.fail('write to the TAP', -r);
          queue.push(b.heads[i]!, 0);
        }
      }
      if (alone) {
        // A chain of more segments than a slot holds goes after the batch, alone (frames stay in order).
        if (!this.writeDirect(chain)) this.sendCopy(chain);
        queue.push(chain.head, 0);
      } else if (n < ring.slots || done >= NET_FRAMES_PER_TURN) return done;
    }
  }

  /** Sends the chain's frame through a copy: passt (after its length), MMDS, or a chain too long for a writev. */
  private sendCopy(chain: DescriptorChain): void {
    // Gather header + frame; passt gets the frame alone, after its length.
    const at = 4 + chain.readInto(this.rt.mem, 0, this.txBody, this.txBody.length);
    const frameBytes = at - 4 - VIRTIO_NET_HDR_BYTES;
    if (frameBytes > 0 && this.mmds?.handleFrame(this.tx.subarray(4 + VIRTIO_NET_HDR_BYTES, at))) {
      // MMDS's: answered below, never sent to the host.
      this.counters?.add('mmds_rx_accepted');
    } else if (frameBytes > 0 && this.linkUp) {
      this.counters?.add('tx_packets_count');
      this.counters?.add('tx_bytes_count', frameBytes);
      if (this.passt) {
        // The header is dropped: write [length][frame] where the header's tail was.
        const start = VIRTIO_NET_HDR_BYTES;
        this.tx.writeUInt32BE(frameBytes, start);
        this.writeAll(this.tx.subarray(start, start + 4 + frameBytes));
      } else if (libc.write(this.fd, this.tx.subarray(4, at), at - 4) < 0) {
        const e = libc.errno();
        if (e !== libc.EAGAIN) this.fail('write to the TAP', e);
      }
    }
  }

  /**
   * TAP: writes the chain's header and frame straight from guest memory with one writev;
   * false when the chain has more segments than one writev takes (the caller copies).
   */
  private writeDirect(chain: DescriptorChain): boolean {
    const frameBytes = chain.readableBytes - VIRTIO_NET_HDR_BYTES;
    // No frame, or more than the largest one: dropped, as the copying path drops it.
    if (frameBytes <= 0 || frameBytes > MAX_FRAME) return true;
    const count = chain.iovecs(this.rt.mem, false, this.iov);
    if (count < 0) return false;
    this.counters?.add('tx_packets_count');
    this.counters?.add('tx_bytes_count', frameBytes);
    if (libc.writev(this.fd, this.iov, count) < 0) {
      const e = libc.errno();
      if (e !== libc.EAGAIN) this.fail('write to the TAP', e);
    }
    return true;
  }

  /** MMDS's frames into the guest's receive buffers, as many as it has posted (the rest wait for more). */
  private deliverMmds(): void {
    const queue = this.rt.queue(NET_RX_QUEUE);
    const out = this.mmds!.out;
    let delivered = 0;
    while (out.length > 0 && queue.enabled && queue.pending() > 0) {
      const frame = out.shift()!;
      const withHeader = Buffer.alloc(VIRTIO_NET_HDR_BYTES + frame.length);
      frame.copy(withHeader, VIRTIO_NET_HDR_BYTES);
      this.deliver(withHeader, withHeader.length);
      this.counters?.add('mmds_tx_frames');
      delivered++;
    }
    if (delivered > 0) this.rt.notifyUsed(NET_RX_QUEUE);
  }

  /**
   * Writes one [length][frame] record to passt's stream without waiting: what the socket
   * does not take now is kept (the stream must stay whole) and written when it has room.
   */
  private writeAll(data: Buffer): void {
    for (let off = 0; off < data.length;) {
      const n = libc.write(this.fd, data.subarray(off), data.length - off);
      if (n < 0) {
        const e = libc.errno();
        if (e === libc.EINTR) continue;
        if (e === libc.EAGAIN) {
          this.pendingTx = Buffer.from(data.subarray(off));
          this.rt.setWritable(this.fd, true);
          return;
        }
        return this.linkDown(`passt's socket failed (${libc.errnoName(e)})`);
      }
      off += n;
    }
  }

  /** Delivers one frame (vnet header first) into the next receive buffer; false if there is none. */
  private deliver(frame: Buffer, length: number): void {
    const queue = this.rt.queue(NET_RX_QUEUE);
    const chain = this.rt.chain;
    if (!queue.pop(chain)) return;
    const at = chain.writeFrom(this.rt.mem, 0, frame, length);
    // A buffer too small for the frame gets nothing (the frame is dropped).
    queue.push(chain.head, at === length ? length : 0);
  }

  private countRx(length: number): void {
    this.counters?.add('rx_packets_count');
    this.counters?.add('rx_bytes_count', length - VIRTIO_NET_HDR_BYTES);
  }

  /**
   * Whether the frame in `rx` (`length` bytes, header included) may go to the guest now;
   * if not, it is held there, the host end is not read meanwhile, and the queue is
   * woken when the rx limiter would let it through.
   */
  private rxAllowed(length: number): boolean {
    const bytes = length - VIRTIO_NET_HDR_BYTES;
    if (!this.rxLimiter?.active || this.rxLimiter.consume(bytes)) {
      this.heldRx = 0;
      return true;
    }
    this.heldRx = length;
    this.rt.setPollable(this.fd, false);
    this.rt.kickAfter(NET_RX_QUEUE, this.rxLimiter.waitMs(bytes));
    return false;
  }

  private receive(): void {
    const queue = this.rt.queue(NET_RX_QUEUE);
    let delivered = 0;
    // TAP with io_uring (passt has no ring), no frame held back and no rx limiter: batches.
    if (this.ring && this.heldRx === 0 && !this.rxLimiter?.active) delivered = this.receiveBatches(queue, this.ring);
    else
      while (this.linkUp && this.rxMayGoOn(queue, delivered)) {
        if (this.heldRx > 0) {
          if (!this.rxAllowed(this.heldRx)) break;
          this.countRx(this.heldRx);
          this.deliver(this.rx, this.heldRx);
        } else if (this.passt) {
          if (!this.nextPasstFrame()) break;
        } else if (!this.rxLimiter?.active) {
          if (!this.readDirect(queue)) break;
        } else {
          const n = libc.read(this.fd, this.rx, this.rx.length);
          if (n < 0) {
            const e = libc.errno();
            if (e !== libc.EAGAIN && e !== libc.EINTR) this.fail('read from the TAP', e);
            break;
          }
          if (!this.rxAllowed(n)) break;
          this.countRx(n);
          this.deliver(this.rx, n);
        }
        delivered++;
      }
    if (delivered > 0) this.rt.notifyUsed(NET_RX_QUEUE);
  }

  /**
   * Whether receiving goes on after `delivered` frames this turn: not at the turn's budget
   * (then the queue is come back to after the other ready work: frames may wait in passt's
   * stream buffer, which epoll does not see), and with a receive buffer posted (without
   * one the host end is not watched until the driver posts more).
   */
  private rxMayGoOn(queue: SplitQueue, delivered: number): boolean {
    if (delivered >= NET_FRAMES_PER_TURN) {
      this.rt.kickLater(NET_RX_QUEUE);
      return false;
    }
    if (!queue.enabled || queue.pending() === 0) {
      this.rt.setPollable(this.fd, false);
      return false;
    }
    return true;
  }

  /**
   * TAP with io_uring: frames into the receive buffers in batches, until the TAP is empty,
   * the buffers run out or the turn's budget is spent; returns how many buffers it filled.
   * A read that finds the TAP empty costs the kernel about as much as one that does not,
   * so batches follow the traffic: the first is as large as the last wake-up's haul
   * (`rxGuess`); after a batch whose every read found a frame, a single read probes for
   * more, and only if that finds one does a batch twice as large follow. A frame a wake-up
   * costs two reads; a flood moves in whole batches of BATCH_SLOTS.
   */
  private receiveBatches(queue: SplitQueue, ring: IoRing): number {
    let delivered = 0;
    let size = this.rxGuess;
    let probe = false;
    while (this.linkUp && this.rxMayGoOn(queue, delivered)) {
      const got = this.receiveBatch(queue, ring, probe ? 1 : Math.min(size, NET_FRAMES_PER_TURN - delivered));
      delivered += got;
      // The TAP is empty: no read again until epoll says it is not.
      if (got === 0 || this.rxDrained) break;
      // A full batch smaller than a whole one: probe with one read, then double. A full
      // whole batch: a flood; whole batches follow with no probe between them.
      if (probe) probe = false;
      else if (size < ring.slots) {
        probe = true;
        size = Math.min(ring.slots, 2 * size);
      }
    }
    this.rxGuess = Math.max(1, Math.min(ring.slots, delivered));
    return delivered;
  }

  /**
   * TAP: reads the next frame straight into the next receive buffer with one readv and
   * returns it to the driver (nothing read: the buffer stays in the ring); false when no
   * frame was waiting. A buffer of more segments than one readv takes gets a copy.
   */
  private readDirect(queue: SplitQueue): boolean {
    const chain = this.rt.chain;
    if (!queue.peek(chain)) return false;
    const count = chain.iovecs(this.rt.mem, true, this.rxIov);
    if (count >= 0 && this.overflow === 0n) this.overflow = this.mapOverflow();
    if (count < 0 || this.overflow === 0n) {
      const n = libc.read(this.fd, this.rx, this.rx.length);
      if (n < 0) return this.readFailed();
      this.countRx(n);
      this.deliver(this.rx, n);
      return true;
    }
    this.overflowIovec(this.iov, count);
    const n = libc.readv(this.fd, this.iov, count + 1);
    if (n < 0) return this.readFailed();
    queue.take();
    chain.markWritable(this.rt.mem, n);
    this.countRx(n);
    // A buffer too small for its frame gets nothing (the frame is dropped).
    queue.push(chain.head, n <= chain.writableBytes ? n : 0);
    return true;
  }

  /**
   * TAP: reads up to `size` frames straight into the next receive buffers with one
   * io_uring submit (a readv each, in ring order; once the TAP is empty the rest end
   * -EAGAIN and their buffers stay in the ring; `rxDrained` then says so); how many
   * buffers it returned (0: no frame was waiting).
   */
  private receiveBatch(queue: SplitQueue, ring: IoRing, size: number): number {
    this.rxDrained = false;
    if (this.overflow === 0n) this.overflow = this.mapOverflow();
    const chain = this.rt.chain;
    const b = this.batch;
    const want = this.overflow === 0n ? 0 : Math.min(queue.pending(), size);
    let n = 0;
    for (; n < want && queue.peek(chain, n); n++) {
      const iov = ring.iovs(n);
      const count = chain.iovecs(this.rt.mem, true, iov.subarray(0, iov.length - IOVEC_BYTES));
      if (count < 0) break;
      this.overflowIovec(iov, count);
      ring.prepare(n, IORING_OP_READV, this.fd, count + 1);
      b.save(n, chain);
    }
    // The next buffer has more segments than a slot holds: it is read alone.
    if (n === 0 || !ring.submit(n)) return Number(this.readDirect(queue));
    let last = -1;
    for (let i = 0; i < n; i++) {
      const r = ring.results[i]!;
      if (r >= 0) last = i;
      else if (r !== -libc.EAGAIN && r !== -libc.EINTR) this.fail('read from the TAP', -r);
    }
    this.rxDrained = ring.results[n - 1]! < 0;
    // Buffers up to the last one read are returned in order; one whose read found the TAP
    // empty just before a frame came gets nothing (the driver posts it again).
    for (let i = 0; i <= last; i++) {
      const got = Math.max(0, ring.results[i]!);
      const room = b.bytes[i]!;
      queue.take();
      b.segments.markWritten(i, this.rt.mem, Math.min(got, room));
      if (got > 0) this.countRx(got);
      // A buffer too small for its frame gets nothing (the frame is dropped).
      queue.push(b.heads[i]!, got <= room ? got : 0);
    }
    return last + 1;
  }

  /** Points iovec `index` of `iov` at the overflow page. */
  private overflowIovec(iov: Buffer, index: number): void {
    writeIovec(iov, index, Number(this.overflow), OVERFLOW_BYTES);
  }

  private mapOverflow(): bigint {
    try {
      return libc.mapAnonymous(OVERFLOW_BYTES).addr;
    } catch {
      this.fail('mmap of a page for frames too long for their buffer', libc.errno());
      return 0n;
    }
  }

  close(): void {
    this.ring?.close();
    if (this.overflow !== 0n) libc.munmap(this.overflow, OVERFLOW_BYTES);
    this.overflow = 0n;
  }

  private readFailed(): false {
    const e = libc.errno();
    if (e !== libc.EAGAIN && e !== libc.EINTR) this.fail('read from the TAP', e);
    return false;
  }

  /** passt: reads what the socket has, delivers one whole frame if one is there. */
  private nextPasstFrame(): boolean {
    if (this.streamBytes < 4 || this.streamBytes < 4 + this.stream.readUInt32BE(0)) {
      const n = libc.read(this.fd, this.stream.subarray(this.streamBytes), this.stream.length - this.streamBytes);
      if (n === 0) {
        this.linkDown('passt closed its socket');
        return false;
      }
      if (n < 0) {
        const e = libc.errno();
        if (e !== libc.EAGAIN && e !== libc.EINTR)
          this.linkDown(`reading passt's socket failed (${libc.errnoName(e)})`);
        return false;
      }
      this.streamBytes += n;
    }
    if (this.streamBytes < 4) return false;
    const length = this.stream.readUInt32BE(0);
    if (length > MAX_FRAME) {
      this.linkDown(`passt sent a ${length}-byte frame`);
      return false;
    }
    if (this.streamBytes < 4 + length) return false;
    this.rx.fill(0, 0, VIRTIO_NET_HDR_BYTES);
    this.stream.copy(this.rx, VIRTIO_NET_HDR_BYTES, 4, 4 + length);
    this.stream.copy(this.stream, 0, 4 + length, this.streamBytes);
    this.streamBytes -= 4 + length;
    if (!this.rxAllowed(VIRTIO_NET_HDR_BYTES + length)) return false;
    this.countRx(VIRTIO_NET_HDR_BYTES + length);
    this.deliver(this.rx, VIRTIO_NET_HDR_BYTES + length);
    return true;
  }
}

/** One batch's requests, kept past the chain object each was read into. */
class SavedChains {
  readonly heads: Uint16Array;
  /** Device-writable bytes (rx). */
  readonly bytes: Uint32Array;
  /** iovecs in the slot (tx). */
  readonly iovCount: Uint16Array;
  /** Where each rx request's buffers are, to mark what a read filled. */
  readonly segments: SlotSegments;

  constructor(slots: number, perSlot: number) {
    this.heads = new Uint16Array(slots);
    this.bytes = new Uint32Array(slots);
    this.iovCount = new Uint16Array(slots);
    this.segments = new SlotSegments(slots, perSlot);
  }

  /** Keeps `chain`'s head and device-writable segments (at most perSlot of them) in slot `i`. */
  save(i: number, chain: DescriptorChain): void {
    this.heads[i] = chain.head;
    this.bytes[i] = chain.writableBytes;
    this.segments.keepWritable(i, chain);
  }
}
