// The network end of MMDS on a NIC (Firecracker's "Dumbo", written afresh): frames the
// guest sends to the MMDS address never reach the TAP; this answers them itself. ARP
// requests for the address get a reply from MMDS_MAC; IPv4 TCP to port 80 gets a small
// TCP server (one connection per guest port, in-order data only, no options but MSS, no
// window scaling, no retransmission: its frames go straight into the guest's receive
// ring, which does not lose them) that hands whole HTTP requests to the service and sends
// the answers within the guest's window. Anything else to the address is dropped; a SYN
// to another port is reset. Every length and offset in a frame is checked before use; a
// malformed frame is dropped. Connections and queued frames are bounded: a guest that
// floods connections evicts its own oldest.
import { randomInt } from 'node:crypto';
import { encodeResponse, parseRequest, type MmdsRequest, type MmdsResponse } from './service.js';

/** The MAC MMDS answers from (Firecracker's). */
export const MMDS_MAC = Buffer.from([0x06, 0x01, 0x23, 0x45, 0x67, 0x01]);
export const MMDS_PORT = 80;
/** Connections kept at once (Firecracker's limit); a new one past it evicts the oldest. */
export const MAX_CONNECTIONS = 30;
/** Frames waiting for the guest's receive buffers; past it the oldest connection's output is dropped. */
export const MAX_QUEUED_FRAMES = 512;
/**
 * Answer bytes a connection may have waiting for the guest's window; past it, the guest's
 * further data is not taken (not acknowledged, so its TCP sends it again later). Without
 * it a guest pipelining small requests behind a closed window would make the VMM hold
 * every large answer.
 */
export const MAX_PENDING_ANSWER_BYTES = 256 * 1024;
const OUR_MSS = 1460;
const DEFAULT_PEER_MSS = 536;
const OUR_WINDOW = 0xffff;

const ETH_HEADER = 14;
const ETHERTYPE_IPV4 = 0x0800;
const ETHERTYPE_ARP = 0x0806;
const IPPROTO_TCP = 6;
const FIN = 0x01;
const SYN = 0x02;
const RST = 0x04;
const PSH = 0x08;
const ACK = 0x10;

/** The Internet checksum (RFC 1071) of `data`, starting from `sum`. */
function checksum(data: Uint8Array, sum = 0): number {
  for (let i = 0; i + 1 < data.length; i += 2) sum += (data[i]! << 8) | data[i + 1]!;
  if (data.length % 2 === 1) sum += data[data.length - 1]! << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

const seqAdd = (a: number, b: number) => (a + b) >>> 0;
/** a - b in sequence space (signed). */
const seqDiff = (a: number, b: number) => ((a - b) | 0) as number;

interface Connection {
  readonly key: string;
  readonly guestMac: Buffer;
  readonly guestIp: number;
  readonly guestPort: number;
  state: 'syn-received' | 'established' | 'closing';
  /** The next byte we expect from the guest. */
  rcvNext: number;
  /** Our initial sequence number + 1: where our data starts. */
  readonly sndBase: number;
  /** The oldest byte of ours the guest has not acknowledged. */
  sndUna: number;
  /** The next byte of ours to send. */
  sndNext: number;
  /** What we have to send, from sndUna on. */
  out: Buffer;
  /** We send FIN once `out` is all sent. */
  finQueued: boolean;
  finSent: boolean;
  peerWindow: number;
  peerMss: number;
  request: Buffer;
}

export class MmdsStack {
  /** Frames for the guest (Ethernet, no virtio header), oldest first. */
  readonly out: Buffer[] = [];
  private readonly connections = new Map<string, Connection>();
  private ipId = 0;
  /** Frames dropped because the guest's receive ring stayed full (for the log and metrics). */
  dropped = 0;

  constructor(
    private readonly ipv4: number,
    private readonly answer: (req: MmdsRequest) => MmdsResponse,
  ) {}

  /** Whether the guest's `frame` was for MMDS (handled here, never to the TAP). */
  handleFrame(frame: Buffer): boolean {
    if (frame.length < ETH_HEADER) return false;
    const type = frame.readUInt16BE(12);
    if (type === ETHERTYPE_ARP) return this.arp(frame);
    if (type !== ETHERTYPE_IPV4 || frame.length < ETH_HEADER + 20) return false;
    const ip = frame.subarray(ETH_HEADER);
    if (ip.readUInt32BE(16) !== this.ipv4) return false;
    // From here on the frame is MMDS's, whatever becomes of it.
    const ihl = (ip[0]! & 0x0f) * 4;
    const total = ip.readUInt16BE(2);
    if (ip[0]! >> 4 !== 4 || ihl < 20 || total < ihl || total > ip.length) return true;
    if ((ip.readUInt16BE(6) & 0x3fff) !== 0) return true; // fragments are not reassembled
    if (ip[9] !== IPPROTO_TCP || checksum(ip.subarray(0, ihl)) !== 0) return true;
    this.tcp(frame.subarray(6, 12), ip.readUInt32BE(12), ip.subarray(ihl, total));
    return true;
  }

  private arp(frame: Buffer): boolean {
    const a = frame.subarray(ETH_HEADER);
    if (a.length < 28 || a.readUInt16BE(0) !== 1 || a.readUInt16BE(2) !== ETHERTYPE_IPV4 || a[4] !== 6 || a[5] !== 4)
      return false;
    if (a.readUInt32BE(24) !== this.ipv4) return false;
    if (a.readUInt16BE(6) !== 1) return true; // a reply or anything else about our address: ours to drop
    const reply = Buffer.alloc(ETH_HEADER + 28);
    a.copy(reply, 0, 8, 14); // to the asker
    MMDS_MAC.copy(reply, 6);
    reply.writeUInt16BE(ETHERTYPE_ARP, 12);
    const r = reply.subarray(ETH_HEADER);
    r.writeUInt16BE(1, 0);
    r.writeUInt16BE(ETHERTYPE_IPV4, 2);
    r[4] = 6;
    r[5] = 4;
    r.writeUInt16BE(2, 6);
    MMDS_MAC.copy(r, 8);
    r.writeUInt32BE(this.ipv4, 14);
    a.copy(r, 18, 8, 18); // the asker's MAC and address
    this.queue(reply);
    return true;
  }

  private tcp(guestMac: Buffer, guestIp: number, seg: Buffer): void {
    if (seg.length < 20) return;
    const srcPort = seg.readUInt16BE(0);
    const dstPort = seg.readUInt16BE(2);
    const seq = seg.readUInt32BE(4);
    const ack = seg.readUInt32BE(8);
    const offset = (seg[12]! >> 4) * 4;
    const flags = seg[13]!;
    if (offset < 20 || offset > seg.length) return;
    const payload = seg.subarray(offset);
    const key = `${guestIp}:${srcPort}`;
    let c = this.connections.get(key);
    if (flags & RST) {
      this.connections.delete(key);
      return;
    }
    if (dstPort !== MMDS_PORT) {
      if (!(flags & ACK))
        this.reset(guestMac, guestIp, srcPort, dstPort, 0, seqAdd(seq, payload.length + (flags & SYN ? 1 : 0)), true);
      else this.reset(guestMac, guestIp, srcPort, dstPort, ack, 0, false);
      return;
    }
    if (flags & SYN) {
      if (c && c.state === 'syn-received' && seqAdd(seq, 1) === c.rcvNext) {
        this.send(c, SYN | ACK, Buffer.alloc(0), seqAdd(c.sndBase, -1), true); // the SYN again: the same answer
        return;
      }
      if (c) this.connections.delete(key);
      if (flags & ACK) return;
      if (this.connections.size >= MAX_CONNECTIONS) this.connections.delete(this.connections.keys().next().value!);
      const iss = randomInt(0, 0x1_0000_0000 - 1) >>> 0;
      c = {
        key,
        guestMac: Buffer.from(guestMac),
        guestIp,
        guestPort: srcPort,
        state: 'syn-received',
        rcvNext: seqAdd(seq, 1),
        sndBase: seqAdd(iss, 1),
        sndUna: seqAdd(iss, 1),
        sndNext: seqAdd(iss, 1),
        out: Buffer.alloc(0),
        finQueued: false,
        finSent: false,
        peerWindow: seg.readUInt16BE(14),
        peerMss: peerMss(seg.subarray(20, offset)),
        request: Buffer.alloc(0),
      };
      this.connections.set(key, c);
      this.send(c, SYN | ACK, Buffer.alloc(0), iss, true);
      return;
    }
    if (!c) {
      // Not a connection we know (evicted, or never made): reset it, as any TCP would.
      if (flags & ACK) this.reset(guestMac, guestIp, srcPort, dstPort, ack, 0, false);
      return;
    }
    if (!(flags & ACK)) return;
    // The acknowledgment: what of ours the guest has.
    const acked = seqDiff(ack, c.sndUna);
    const inFlight = seqDiff(c.sndNext, c.sndUna) + (c.finSent ? 1 : 0);
    if (acked > 0 && acked <= inFlight) {
      const dataAcked = Math.min(acked, c.out.length);
      c.out = c.out.subarray(dataAcked);
      c.sndUna = seqAdd(c.sndUna, acked);
      if (c.state === 'syn-received') c.state = 'established';
    } else if (c.state === 'syn-received' && ack === c.sndBase) c.state = 'established';
    c.peerWindow = seg.readUInt16BE(14);
    if (c.finSent && c.sndUna === seqAdd(c.sndNext, 1)) {
      // Our FIN is acknowledged: the connection is over once the guest's is too.
      if (c.state === 'closing') this.connections.delete(key);
    }
    // The guest's data, in order only (anything else is answered with what we expect).
    if (payload.length > 0 || flags & FIN) {
      if (seq !== c.rcvNext || c.out.length > MAX_PENDING_ANSWER_BYTES) {
        this.send(c, ACK, Buffer.alloc(0), c.sndNext, false);
        return;
      }
      if (payload.length > 0) {
        c.rcvNext = seqAdd(c.rcvNext, payload.length);
        if (!c.finQueued) {
          c.request = c.request.length === 0 ? Buffer.from(payload) : Buffer.concat([c.request, payload]);
          this.serve(c);
        }
      }
      if (flags & FIN) {
        c.rcvNext = seqAdd(c.rcvNext, 1);
        c.state = 'closing';
        c.finQueued = true;
      }
      if (!this.pump(c)) this.send(c, ACK, Buffer.alloc(0), c.sndNext, false);
    } else this.pump(c);
    if (c.state === 'closing' && c.finSent && c.sndUna === seqAdd(c.sndNext, 1)) this.connections.delete(key);
  }

  /** Answers every whole request the connection has; a malformed one is answered and the connection closed. */
  private serve(c: Connection): void {
    for (;;) {
      const parsed = parseRequest(c.request);
      if (parsed === null) return;
      if ('error' in parsed) {
        c.out = Buffer.concat([c.out, encodeResponse(parsed.error, true)]);
        c.request = Buffer.alloc(0);
        c.finQueued = true;
        return;
      }
      c.request = c.request.subarray(parsed.used);
      c.out = Buffer.concat([c.out, encodeResponse(this.answer(parsed.request), parsed.request.close)]);
      if (parsed.request.close) {
        c.finQueued = true;
        c.request = Buffer.alloc(0);
        return;
      }
    }
  }

  /** Sends what the guest's window allows, then our FIN once all is sent; whether anything went. */
  private pump(c: Connection): boolean {
    if (c.finSent) return false;
    let sent = false;
    for (;;) {
      const offset = seqDiff(c.sndNext, c.sndUna);
      const room = c.peerWindow - offset;
      const left = c.out.length - offset;
      if (left <= 0 || room <= 0) break;
      const n = Math.min(left, room, c.peerMss, OUR_MSS);
      const last = n === left;
      this.send(c, ACK | (last ? PSH : 0), c.out.subarray(offset, offset + n), c.sndNext, false);
      c.sndNext = seqAdd(c.sndNext, n);
      sent = true;
    }
    if (c.finQueued && !c.finSent && seqDiff(c.sndNext, c.sndUna) === c.out.length) {
      this.send(c, FIN | ACK, Buffer.alloc(0), c.sndNext, false);
      c.finSent = true;
      sent = true;
    }
    return sent;
  }

  private send(c: Connection, flags: number, data: Buffer, seq: number, mss: boolean): void {
    this.queue(this.segment(c.guestMac, c.guestIp, MMDS_PORT, c.guestPort, seq, c.rcvNext, flags, data, mss));
  }

  private reset(
    guestMac: Buffer,
    guestIp: number,
    guestPort: number,
    ourPort: number,
    seq: number,
    ack: number,
    withAck: boolean,
  ): void {
    this.queue(
      this.segment(guestMac, guestIp, ourPort, guestPort, seq, ack, RST | (withAck ? ACK : 0), Buffer.alloc(0), false),
    );
  }

  /** An Ethernet frame holding one IPv4 TCP segment from MMDS to the guest, checksums filled in. */
  private segment(
    guestMac: Buffer,
    guestIp: number,
    srcPort: number,
    dstPort: number,
    seq: number,
    ack: number,
    flags: number,
    data: Buffer,
    mss: boolean,
  ): Buffer {
    const tcpHeader = mss ? 24 : 20;
    const frame = Buffer.alloc(ETH_HEADER + 20 + tcpHeader + data.length);
    guestMac.copy(frame, 0);
    MMDS_MAC.copy(frame, 6);
    frame.writeUInt16BE(ETHERTYPE_IPV4, 12);
    const ip = frame.subarray(ETH_HEADER);
    ip[0] = 0x45;
    ip.writeUInt16BE(20 + tcpHeader + data.length, 2);
    ip.writeUInt16BE((this.ipId = (this.ipId + 1) & 0xffff), 4);
    ip.writeUInt16BE(0x4000, 6); // don't fragment
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    ip.writeUInt32BE(this.ipv4, 12);
    ip.writeUInt32BE(guestIp, 16);
    ip.writeUInt16BE(checksum(ip.subarray(0, 20)), 10);
    const t = ip.subarray(20);
    t.writeUInt16BE(srcPort, 0);
    t.writeUInt16BE(dstPort, 2);
    t.writeUInt32BE(seq >>> 0, 4);
    t.writeUInt32BE(flags & ACK ? ack >>> 0 : 0, 8);
    t[12] = (tcpHeader / 4) << 4;
    t[13] = flags;
    t.writeUInt16BE(OUR_WINDOW, 14);
    if (mss) {
      t[20] = 2;
      t[21] = 4;
      t.writeUInt16BE(OUR_MSS, 22);
    }
    data.copy(t, tcpHeader);
    const pseudo = Buffer.alloc(12);
    pseudo.writeUInt32BE(this.ipv4, 0);
    pseudo.writeUInt32BE(guestIp, 4);
    pseudo[9] = IPPROTO_TCP;
    pseudo.writeUInt16BE(t.length, 10);
    t.writeUInt16BE(checksum(t, ~checksum(pseudo) & 0xffff), 16);
    return frame;
  }

  private queue(frame: Buffer): void {
    if (this.out.length >= MAX_QUEUED_FRAMES) {
      this.out.shift();
      this.dropped++;
    }
    this.out.push(frame);
  }

  /** Connections open now (for tests and metrics). */
  get connectionCount(): number {
    return this.connections.size;
  }
}

/** The MSS option of a SYN's options, or TCP's default. */
function peerMss(options: Buffer): number {
  for (let i = 0; i < options.length;) {
    const kind = options[i]!;
    if (kind === 0) break;
    if (kind === 1) {
      i++;
      continue;
    }
    const len = options[i + 1];
    if (len === undefined || len < 2 || i + len > options.length) break;
    if (kind === 2 && len === 4) return Math.max(64, options.readUInt16BE(i + 2));
    i += len;
  }
  return DEFAULT_PEER_MSS;
}
