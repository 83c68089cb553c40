// virtio-vsock (virtio 1.2, 5.10), stream sockets, with Firecracker's hybrid model on
// the host side: the guest's CID is reached through one Unix socket Kiln listens on.
// - Host to guest: a client connects to the socket and sends "CONNECT <port>\n"; Kiln
//   asks the guest (REQUEST); when the guest accepts, the client reads "OK <hostport>\n"
//   and from then on the connection carries the stream.
// - Guest to host: a guest connection to CID 2 (the host), port P, is connected by Kiln
//   to the Unix socket "<path>_P"; if nothing listens there the guest gets a reset.
// Flow control is vsock's credit scheme: each side says how much buffer it has
// (buf_alloc) and how much it has consumed (fwd_cnt); Kiln never sends the guest more
// than it has room for, and tells it its own counts so it can send.
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import type { VirtioBackend, VirtioDeviceType, VirtioQueues } from './device.js';
import { DeviceCounters, VSOCK_COUNTERS } from './counters.js';

export const VSOCK_HOST_CID = 2;
export const VSOCK_CONFIG = { guestCid: 0, bytes: 8 } as const;
/** struct virtio_vsock_hdr (5.10.6), packed. */
export const VSOCK_HDR = {
  srcCid: 0,
  dstCid: 8,
  srcPort: 16,
  dstPort: 20,
  len: 24,
  type: 28,
  op: 30,
  flags: 32,
  bufAlloc: 36,
  fwdCnt: 40,
  bytes: 44,
} as const;
export const VIRTIO_VSOCK_TYPE_STREAM = 1;
export const VIRTIO_VSOCK_OP = {
  REQUEST: 1,
  RESPONSE: 2,
  RST: 3,
  SHUTDOWN: 4,
  RW: 5,
  CREDIT_UPDATE: 6,
  CREDIT_REQUEST: 7,
} as const;
export const VIRTIO_VSOCK_SHUTDOWN_RCV = 1;
export const VIRTIO_VSOCK_SHUTDOWN_SEND = 2;
const RX = 0;
const TX = 1;
const EVENT = 2;
/** virtio 1.2, 5.10.6.6: the only event: every connection is gone, re-read the CID. */
export const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0;
/** What Kiln buffers per connection toward the host socket (it writes through at once). */
const BUF_ALLOC = 256 * 1024;
/** Host ports for host-initiated connections start here (as Firecracker's do). */
const FIRST_HOST_PORT = 1 << 30;
const CONNECT_LINE_MAX = 32;
/** Open connections per device, both directions (Firecracker's muxer caps them too). */
export const MAX_CONNECTIONS = 1023;
/** Control packets waiting for a receive buffer, across connections (each kind coalesced per connection). */
export const MAX_PENDING_CONTROL = 2048;
/** TX packets handled per I/O-thread turn. */
const VSOCK_PACKETS_PER_TURN = 256;

/** Firecracker's hybrid vsock: the listening Unix socket, its path and the guest's CID. */
export interface VsockOptions {
  readonly listenFd: number;
  readonly udsPath: string;
  readonly guestCid: number;
  /** Where the I/O thread counts packets, bytes and connections for the metrics (counters.ts). */
  readonly counters?: SharedArrayBuffer;
}

export const vsockType: VirtioDeviceType<VsockOptions> = {
  deviceId: 19,
  name: 'vsock',
  maxQueueSize: 256,
  queues: () => 3,
  features: () => 0n,
  configBytes: () => VSOCK_CONFIG.bytes,
  initConfig(config, o) {
    const cid = o.guestCid;
    config.setUint32(VSOCK_CONFIG.guestCid, cid % 2 ** 32, true);
    config.setUint32(VSOCK_CONFIG.guestCid + 4, Math.floor(cid / 2 ** 32), true);
  },
  // A clone's CID: Linux reads guest_cid again when the transport-reset event arrives.
  restoredConfig(config, o) {
    vsockType.initConfig(config, o);
  },
};

/** Checks a guest CID (3 and up; 0-2 are reserved) and listens on the Unix socket. */
export function listenVsock(path: string, guestCid: number): { fd: number; options: VsockOptions } {
  if (!Number.isInteger(guestCid) || guestCid < 3 || guestCid > 0xffff_ffff)
    throw new KilnError(`guest CID ${guestCid} is not valid (3 to 4294967295)`);
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK, 0);
  if (fd < 0) throw new KilnError(`socket failed: ${libc.errnoName(libc.errno())}`);
  if (libc.bind(fd, libc.sockaddrUn(path), libc.sockaddr_un.size) < 0 || libc.listen(fd, 64) < 0) {
    const e = libc.errno();
    libc.close(fd);
    throw new KilnError(`cannot listen on '${path}' for vsock: ${libc.errnoName(e)} (${libc.strerror(e)})`);
  }
  return { fd, options: { listenFd: fd, udsPath: path, guestCid } };
}

interface Connection {
  fd: number;
  /** The host side's port and the guest's. */
  localPort: number;
  peerPort: number;
  state: 'handshake' | 'connecting' | 'established';
  /** Host-initiated, before CONNECT has been read: the partial line. */
  line: string;
  /** Bytes sent to the guest, and the guest's advertised buffer and consumption. */
  txCnt: number;
  peerBufAlloc: number;
  peerFwdCnt: number;
  /** Bytes Kiln forwarded from the guest to the host socket, and the last count it told the guest. */
  fwdCnt: number;
  advertisedFwdCnt: number;
  /** The host socket was readable but the guest had no room: wait for credit. */
  blocked: boolean;
  /** Guest bytes the host socket has not taken yet (it stopped reading); at most BUF_ALLOC. */
  outbox: Buffer | null;
  /** Control ops queued for this connection (bit 1 << op): one of each kind waits at most. */
  queuedOps: number;
}

export class VsockBackend implements VirtioBackend {
  private readonly listenFd: number;
  private readonly udsPath: string;
  private readonly guestCid: number;
  private readonly conns = new Map<string, Connection>();
  private readonly byFd = new Map<number, Connection>();
  /** Control packets waiting for a receive buffer. */
  private readonly pendingControl: Array<{ conn: Connection; op: number; flags: number }> = [];
  private nextHostPort = FIRST_HOST_PORT;
  private readonly hdr = Buffer.alloc(VSOCK_HDR.bytes);
  private readonly data = Buffer.alloc(64 * 1024);
  readonly pollFds;
  private readonly counters: DeviceCounters<(typeof VSOCK_COUNTERS)[number]> | null;

  constructor(
    private readonly rt: VirtioQueues,
    options: VsockOptions,
  ) {
    this.counters = options.counters ? new DeviceCounters(VSOCK_COUNTERS, options.counters) : null;
    this.listenFd = options.listenFd;
    this.udsPath = options.udsPath;
    this.guestCid = options.guestCid;
    this.pollFds = [{ fd: this.listenFd, ready: () => this.accept() }];
  }

  private key(localPort: number, peerPort: number): string {
    return `${localPort}:${peerPort}`;
  }

  private track(conn: Connection): void {
    this.counters?.add('conns_added');
    this.conns.set(this.key(conn.localPort, conn.peerPort), conn);
    this.byFd.set(conn.fd, conn);
    this.rt.watchFd(conn.fd, () => this.hostReadable(conn));
  }

  private drop(conn: Connection): void {
    if (this.conns.delete(this.key(conn.localPort, conn.peerPort))) this.counters?.add('conns_removed');
    this.byFd.delete(conn.fd);
    this.rt.unwatchFd(conn.fd);
    libc.close(conn.fd);
  }

  private newConn(fd: number, localPort: number, peerPort: number, state: Connection['state']): Connection {
    return {
      fd,
      localPort,
      peerPort,
      state,
      line: '',
      txCnt: 0,
      peerBufAlloc: 0,
      peerFwdCnt: 0,
      fwdCnt: 0,
      advertisedFwdCnt: 0,
      blocked: false,
      outbox: null,
      queuedOps: 0,
    };
  }

  private accept(): void {
    for (;;) {
      const fd = libc.accept4(this.listenFd, null, null, libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
      if (fd < 0) return;
      if (this.byFd.size >= MAX_CONNECTIONS) {
        libc.close(fd);
        continue;
      }
      const conn = this.newConn(fd, 0, 0, 'handshake');
      this.byFd.set(fd, conn);
      this.rt.watchFd(fd, () => this.hostReadable(conn));
    }
  }

  reset(): void {
    // The driver reset the device: every connection is gone (5.10.6.6 transport reset).
    for (const conn of [...this.byFd.values()]) this.drop(conn);
    this.pendingControl.length = 0;
  }

  /**
   * After a restore the host sockets of the snapshot's connections are gone: the guest
   * gets a transport reset on the event queue, as Firecracker sends it, and drops them.
   */
  restored(): void {
    const queue = this.rt.queue(EVENT);
    const chain = this.rt.chain;
    if (!queue.enabled || !queue.pop(chain)) return;
    const event = Buffer.alloc(4);
    event.writeUInt32LE(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, 0);
    queue.push(chain.head, chain.writeFrom(this.rt.mem, 0, event, event.length));
    this.rt.notifyUsed(EVENT);
  }

  /** The VM is stopping: close every connection's host socket. */
  close(): void {
    for (const conn of this.byFd.values()) libc.close(conn.fd);
    this.byFd.clear();
    this.conns.clear();
  }

  queueNotified(q: number): void {
    if (q === TX) this.transmit();
    else if (q === RX) this.flush();
  }

  // ---- guest to host ----
  private transmit(): void {
    const queue = this.rt.queue(TX);
    // A budget per turn: a guest that keeps the TX queue full shares the I/O thread.
    const done = queue.drain(
      this.rt.chain,
      (chain) => {
        // Header and payload, gathered from the readable part.
        const hdrBytes = chain.readInto(this.rt.mem, 0, this.hdr, VSOCK_HDR.bytes);
        const payload = chain.readInto(this.rt.mem, VSOCK_HDR.bytes, this.data, this.data.length);
        queue.push(chain.head, 0);
        if (hdrBytes === VSOCK_HDR.bytes) this.fromGuest(Math.min(payload, this.hdr.readUInt32LE(VSOCK_HDR.len)));
      },
      VSOCK_PACKETS_PER_TURN,
    );
    if (done > 0) this.rt.notifyUsed(TX);
    if (queue.leftOver) this.rt.kickLater(TX);
    this.flush();
  }

  private fromGuest(payloadBytes: number): void {
    const h = this.hdr;
    const dstCid = Number(h.readBigUInt64LE(VSOCK_HDR.dstCid));
    const srcPort = h.readUInt32LE(VSOCK_HDR.srcPort);
    const dstPort = h.readUInt32LE(VSOCK_HDR.dstPort);
    const op = h.readUInt16LE(VSOCK_HDR.op);
    if (h.readUInt16LE(VSOCK_HDR.type) !== VIRTIO_VSOCK_TYPE_STREAM || dstCid !== VSOCK_HOST_CID) return;
    this.counters?.add('tx_packets_count');
    if (op === VIRTIO_VSOCK_OP.RW) this.counters?.add('tx_bytes_count', payloadBytes);
    let conn = this.conns.get(this.key(dstPort, srcPort));
    if (conn) {
      conn.peerBufAlloc = h.readUInt32LE(VSOCK_HDR.bufAlloc);
      conn.peerFwdCnt = h.readUInt32LE(VSOCK_HDR.fwdCnt);
    }
    switch (op) {
      case VIRTIO_VSOCK_OP.REQUEST: {
        if (conn) return;
        // Connect to "<path>_<port>" for the guest, never waiting: a Unix socket connect
        // either completes at once or finds the listener's backlog full (EAGAIN: refused).
        const target = `${this.udsPath}_${dstPort}`;
        const full = this.byFd.size >= MAX_CONNECTIONS;
        const fd = full ? -1 : libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK, 0);
        conn = this.newConn(fd, dstPort, srcPort, 'established');
        conn.peerBufAlloc = h.readUInt32LE(VSOCK_HDR.bufAlloc);
        conn.peerFwdCnt = h.readUInt32LE(VSOCK_HDR.fwdCnt);
        if (fd < 0 || libc.connect(fd, libc.sockaddrUn(target), libc.sockaddr_un.size) < 0) {
          if (fd >= 0) libc.close(fd);
          this.queueControl(conn, VIRTIO_VSOCK_OP.RST);
          return;
        }
        this.track(conn);
        this.queueControl(conn, VIRTIO_VSOCK_OP.RESPONSE);
        return;
      }
      case VIRTIO_VSOCK_OP.RESPONSE:
        if (conn?.state !== 'connecting') return;
        conn.state = 'established';
        this.writeHost(conn, Buffer.from(`OK ${conn.localPort}\n`));
        // What the client sent after CONNECT can flow now.
        this.rt.setPollable(conn.fd, true);
        return;
      case VIRTIO_VSOCK_OP.RW:
        if (conn?.state !== 'established') return;
        // Only what the host socket took counts as forwarded: while its peer does not read,
        // the guest's credit runs out and it stops sending (5.10.6.3).
        this.forwarded(conn, this.writeHost(conn, this.data.subarray(0, payloadBytes)));
        return;
      case VIRTIO_VSOCK_OP.CREDIT_REQUEST:
        if (conn) this.queueControl(conn, VIRTIO_VSOCK_OP.CREDIT_UPDATE);
        return;
      case VIRTIO_VSOCK_OP.CREDIT_UPDATE:
        if (conn?.blocked) {
          conn.blocked = false;
          this.rt.setPollable(conn.fd, true);
        }
        return;
      case VIRTIO_VSOCK_OP.SHUTDOWN:
      case VIRTIO_VSOCK_OP.RST:
        if (!conn) return;
        if (op === VIRTIO_VSOCK_OP.SHUTDOWN) this.queueControl(conn, VIRTIO_VSOCK_OP.RST);
        // A refused host-initiated connection closes the client's socket.
        this.drop(conn);
        return;
      default:
    }
  }

  /** Counts bytes the host took and tells the guest once it has freed half its buffer. */
  private forwarded(conn: Connection, bytes: number): void {
    conn.fwdCnt = (conn.fwdCnt + bytes) >>> 0;
    if ((conn.fwdCnt - conn.advertisedFwdCnt) >>> 0 > BUF_ALLOC / 2)
      this.queueControl(conn, VIRTIO_VSOCK_OP.CREDIT_UPDATE);
  }

  /**
   * Writes guest bytes to the host socket without ever waiting: what it does not take now
   * waits in the connection's outbox, and the socket is watched for room. Returns the
   * bytes written now. A guest that sends beyond its credit (more than BUF_ALLOC waiting)
   * loses the connection.
   */
  private writeHost(conn: Connection, bytes: Buffer): number {
    if (conn.outbox !== null) {
      if (conn.outbox.length + bytes.length > BUF_ALLOC) {
        this.fail(conn);
        return 0;
      }
      conn.outbox = Buffer.concat([conn.outbox, bytes]);
      return 0;
    }
    let off = 0;
    while (off < bytes.length) {
      const n = libc.write(conn.fd, bytes.subarray(off), bytes.length - off);
      if (n >= 0) {
        off += n;
        continue;
      }
      const e = libc.errno();
      if (e === libc.EINTR) continue;
      if (e !== libc.EAGAIN) {
        this.fail(conn);
        return off;
      }
      conn.outbox = Buffer.from(bytes.subarray(off));
      this.rt.setWritable(conn.fd, true);
      break;
    }
    return off;
  }

  /** The host socket has room again: hand it what waited, and give the guest its credit back. */
  private drainOutbox(conn: Connection): void {
    const box = conn.outbox!;
    conn.outbox = null;
    this.rt.setWritable(conn.fd, false);
    this.forwarded(conn, this.writeHost(conn, box));
    // All of it went: the guest (stalled on credit we withheld) hears at once.
    if (conn.outbox === null && this.byFd.has(conn.fd)) this.queueControl(conn, VIRTIO_VSOCK_OP.CREDIT_UPDATE);
  }

  private fail(conn: Connection): void {
    this.counters?.add('conns_killed');
    this.queueControl(conn, VIRTIO_VSOCK_OP.RST);
    if (this.byFd.has(conn.fd)) this.drop(conn);
  }

  /** Queues a control packet for the guest: coalesced per connection and kind, and bounded overall. */
  private queueControl(conn: Connection, op: number): void {
    const bit = 1 << op;
    if (conn.queuedOps & bit) return;
    // Past the bound the reply is dropped: the guest's request times out, the VMM does not grow.
    if (this.pendingControl.length >= MAX_PENDING_CONTROL) return;
    conn.queuedOps |= bit;
    this.pendingControl.push({ conn, op, flags: 0 });
  }

  // ---- host to guest ----
  private hostReadable(conn: Connection): void {
    if (conn.outbox !== null) this.drainOutbox(conn);
    if (!this.byFd.has(conn.fd)) return;
    if (conn.state === 'handshake') return this.readConnectLine(conn);
    if (conn.state !== 'established') return;
    this.flush();
    this.sendData(conn);
  }

  private readConnectLine(conn: Connection): void {
    const n = libc.read(conn.fd, this.data, CONNECT_LINE_MAX - conn.line.length);
    if (n <= 0) {
      if (n === 0 || (libc.errno() !== libc.EAGAIN && libc.errno() !== libc.EINTR)) this.closeUnattached(conn);
      return;
    }
    conn.line += this.data.subarray(0, n).toString('latin1');
    const end = conn.line.indexOf('\n');
    if (end < 0) {
      if (conn.line.length >= CONNECT_LINE_MAX) this.closeUnattached(conn);
      return;
    }
    const m = /^CONNECT (\d{1,10})$/.exec(conn.line.slice(0, end).trimEnd());
    if (!m || Number(m[1]) > 0xffff_ffff) return this.closeUnattached(conn);
    conn.peerPort = Number(m[1]);
    conn.localPort = this.nextHostPort++;
    conn.state = 'connecting';
    this.conns.set(this.key(conn.localPort, conn.peerPort), conn);
    // Data the client sent after its CONNECT line waits in the socket until the guest accepts.
    this.rt.setPollable(conn.fd, false);
    this.queueControl(conn, VIRTIO_VSOCK_OP.REQUEST);
    this.flush();
  }

  private closeUnattached(conn: Connection): void {
    this.byFd.delete(conn.fd);
    this.rt.unwatchFd(conn.fd);
    libc.close(conn.fd);
  }

  private writeHeader(conn: Connection, op: number, len: number, flags: number): void {
    const h = this.hdr;
    h.writeBigUInt64LE(BigInt(VSOCK_HOST_CID), VSOCK_HDR.srcCid);
    h.writeBigUInt64LE(BigInt(this.guestCid), VSOCK_HDR.dstCid);
    h.writeUInt32LE(conn.localPort, VSOCK_HDR.srcPort);
    h.writeUInt32LE(conn.peerPort, VSOCK_HDR.dstPort);
    h.writeUInt32LE(len, VSOCK_HDR.len);
    h.writeUInt16LE(VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HDR.type);
    h.writeUInt16LE(op, VSOCK_HDR.op);
    h.writeUInt32LE(flags, VSOCK_HDR.flags);
    h.writeUInt32LE(BUF_ALLOC, VSOCK_HDR.bufAlloc);
    h.writeUInt32LE(conn.fwdCnt, VSOCK_HDR.fwdCnt);
    conn.advertisedFwdCnt = conn.fwdCnt;
  }

  /** Puts header (+ payload from this.data) into the next receive buffer; false if none. */
  private deliver(payload: number): boolean {
    const queue = this.rt.queue(RX);
    const chain = this.rt.chain;
    if (!queue.pop(chain)) return false;
    const at =
      chain.writeFrom(this.rt.mem, 0, this.hdr, VSOCK_HDR.bytes) +
      chain.writeFrom(this.rt.mem, VSOCK_HDR.bytes, this.data, payload);
    queue.push(chain.head, at);
    this.counters?.add('rx_packets_count');
    this.counters?.add('rx_bytes_count', payload);
    return true;
  }

  /** Sends queued control packets while the guest has receive buffers. */
  private flush(): void {
    const queue = this.rt.queue(RX);
    let sent = 0;
    while (this.pendingControl.length > 0 && queue.enabled && queue.pending() > 0) {
      const { conn, op, flags } = this.pendingControl.shift()!;
      conn.queuedOps &= ~(1 << op);
      this.writeHeader(conn, op, 0, flags);
      this.deliver(0);
      sent++;
    }
    if (sent > 0) this.rt.notifyUsed(RX);
    // Connections whose data waited for buffers or credit.
    for (const conn of this.conns.values()) if (conn.state === 'established' && conn.blocked) this.sendData(conn);
  }

  /** Moves what the host socket has into RW packets, within the guest's credit. */
  private sendData(conn: Connection): void {
    const queue = this.rt.queue(RX);
    let sent = 0;
    for (;;) {
      const credit = conn.peerBufAlloc - ((conn.txCnt - conn.peerFwdCnt) >>> 0);
      if (!queue.enabled || queue.pending() === 0 || credit <= 0) {
        conn.blocked = true;
        this.rt.setPollable(conn.fd, false);
        if (credit <= 0) this.queueControl(conn, VIRTIO_VSOCK_OP.CREDIT_REQUEST);
        break;
      }
      queue.peek(this.rt.chain);
      const room = Math.min(this.rt.chain.writableBytes - VSOCK_HDR.bytes, credit, this.data.length);
      if (room <= 0) break;
      const n = libc.read(conn.fd, this.data, room);
      if (n === 0 || (n < 0 && libc.errno() !== libc.EAGAIN && libc.errno() !== libc.EINTR)) {
        // The host side closed: tell the guest no more data comes either way.
        this.writeHeader(conn, VIRTIO_VSOCK_OP.SHUTDOWN, 0, VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
        this.deliver(0);
        sent++;
        this.drop(conn);
        break;
      }
      if (n < 0) {
        conn.blocked = false;
        this.rt.setPollable(conn.fd, true);
        break;
      }
      this.writeHeader(conn, VIRTIO_VSOCK_OP.RW, n, 0);
      this.deliver(n);
      conn.txCnt = (conn.txCnt + n) >>> 0;
      sent++;
    }
    if (sent > 0) this.rt.notifyUsed(RX);
  }
}
