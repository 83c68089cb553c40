// MMDS without a guest: the data store (PUT, RFC 7396 PATCH, its size limit, a reader on
// another thread's view), the HTTP service's V1 and V2 rules and formats, and the network
// stack driven by a small TCP client written here, frame by frame, as a guest would send them.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MmdsService, parseRequest, type MmdsRequest } from '../../src/mmds/service.js';
import { MAX_CONNECTIONS, MMDS_MAC, MmdsStack } from '../../src/mmds/stack.js';
import { mergePatch, MmdsError, MmdsReader, MmdsStore } from '../../src/mmds/store.js';

const MMDS_IP = 0xa9fea9fe; // 169.254.169.254
const GUEST_IP = 0xc0a80002; // 192.168.0.2
const GUEST_MAC = Buffer.from([0x06, 0, 0xac, 0x10, 0, 2]);

function csum(data: Uint8Array, sum = 0): number {
  for (let i = 0; i + 1 < data.length; i += 2) sum += (data[i]! << 8) | data[i + 1]!;
  if (data.length % 2) sum += data[data.length - 1]! << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** A guest's IPv4 TCP frame to MMDS. */
function tcpFrame(opts: {
  srcPort: number;
  dstPort?: number;
  seq: number;
  ack?: number;
  flags: number;
  data?: Buffer;
  dstIp?: number;
  badIpChecksum?: boolean;
}): Buffer {
  const data = opts.data ?? Buffer.alloc(0);
  const f = Buffer.alloc(14 + 20 + 20 + data.length);
  Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).copy(f, 0);
  GUEST_MAC.copy(f, 6);
  f.writeUInt16BE(0x0800, 12);
  const ip = f.subarray(14);
  ip[0] = 0x45;
  ip.writeUInt16BE(40 + data.length, 2);
  ip[8] = 64;
  ip[9] = 6;
  ip.writeUInt32BE(GUEST_IP, 12);
  ip.writeUInt32BE(opts.dstIp ?? MMDS_IP, 16);
  ip.writeUInt16BE(opts.badIpChecksum ? 0x1234 : csum(ip.subarray(0, 20)), 10);
  const t = ip.subarray(20);
  t.writeUInt16BE(opts.srcPort, 0);
  t.writeUInt16BE(opts.dstPort ?? 80, 2);
  t.writeUInt32BE(opts.seq >>> 0, 4);
  t.writeUInt32BE((opts.ack ?? 0) >>> 0, 8);
  t[12] = 5 << 4;
  t[13] = opts.flags;
  t.writeUInt16BE(0xffff, 14);
  data.copy(t, 20);
  return f;
}

interface Segment {
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  flags: number;
  data: Buffer;
}

/** Checks an MMDS frame's addresses and checksums and takes its TCP segment apart. */
function parseSegment(frame: Buffer): Segment {
  assert.ok(frame.subarray(0, 6).equals(GUEST_MAC), 'to the guest');
  assert.ok(frame.subarray(6, 12).equals(MMDS_MAC), 'from MMDS');
  const ip = frame.subarray(14);
  assert.equal(csum(ip.subarray(0, 20)), 0, 'IPv4 header checksum');
  assert.equal(ip.readUInt32BE(12), MMDS_IP);
  assert.equal(ip.readUInt32BE(16), GUEST_IP);
  const t = ip.subarray(20, ip.readUInt16BE(2));
  const pseudo = Buffer.alloc(12);
  pseudo.writeUInt32BE(MMDS_IP, 0);
  pseudo.writeUInt32BE(GUEST_IP, 4);
  pseudo[9] = 6;
  pseudo.writeUInt16BE(t.length, 10);
  assert.equal(csum(t, ~csum(pseudo) & 0xffff), 0, 'TCP checksum');
  return {
    srcPort: t.readUInt16BE(0),
    dstPort: t.readUInt16BE(2),
    seq: t.readUInt32BE(4),
    ack: t.readUInt32BE(8),
    flags: t[13]!,
    data: Buffer.from(t.subarray((t[12]! >> 4) * 4)),
  };
}

const SYN = 2;
const ACK = 16;
const FIN = 1;
const RST = 4;
const PSH = 8;

/** One HTTP exchange over a fresh connection from `port`: handshake, request, answer, both FINs. */
function exchange(stack: MmdsStack, port: number, request: string): string {
  const take = () => stack.out.splice(0).map(parseSegment);
  assert.ok(stack.handleFrame(tcpFrame({ srcPort: port, seq: 1000, flags: SYN })));
  const [synAck] = take();
  assert.equal(synAck!.flags, SYN | ACK);
  assert.equal(synAck!.ack, 1001);
  let ourSeq = 1001;
  const theirs = (synAck!.seq + 1) >>> 0;
  stack.handleFrame(tcpFrame({ srcPort: port, seq: ourSeq, ack: theirs, flags: ACK }));
  assert.equal(stack.out.length, 0, 'nothing answers the handshake ACK');
  const body = Buffer.from(request, 'latin1');
  stack.handleFrame(tcpFrame({ srcPort: port, seq: ourSeq, ack: theirs, flags: ACK | PSH, data: body }));
  ourSeq += body.length;
  let answer = Buffer.alloc(0);
  let finSeen = false;
  let expect = theirs;
  for (let rounds = 0; rounds < 100 && !finSeen; rounds++) {
    const segs = take();
    if (segs.length === 0) break;
    for (const s of segs) {
      assert.equal(s.ack, ourSeq, 'everything the guest sent is acknowledged');
      assert.equal(s.seq, expect, 'in order, no gaps');
      answer = Buffer.concat([answer, s.data]);
      expect = (expect + s.data.length + (s.flags & FIN ? 1 : 0)) >>> 0;
      if (s.flags & FIN) finSeen = true;
    }
    stack.handleFrame(tcpFrame({ srcPort: port, seq: ourSeq, ack: expect, flags: ACK }));
  }
  // The guest closes its side (after MMDS's FIN, or first when the connection stays open).
  stack.handleFrame(tcpFrame({ srcPort: port, seq: ourSeq, ack: expect, flags: FIN | ACK }));
  const last = take();
  if (!finSeen) {
    const fin = last.find((s) => s.flags & FIN);
    assert.ok(fin, 'MMDS closes its side after the guest');
    stack.handleFrame(tcpFrame({ srcPort: port, seq: ourSeq + 1, ack: (fin.seq + 1) >>> 0, flags: ACK }));
  } else
    assert.ok(
      last.some((s) => s.flags & ACK && s.ack === ourSeq + 1),
      "the guest's FIN is acknowledged",
    );
  return answer.toString('latin1');
}

const req = (method: string, path: string, headers: Record<string, string> = {}): MmdsRequest => ({
  method,
  path,
  headers: new Map(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v])),
  close: false,
});

const DATA = {
  latest: { 'meta-data': { 'ami-id': 'ami-87654321', 'reservation-id': 'r-79054aef', count: 3 } },
  list: ['a', 'b'],
};

describe('MMDS data store', () => {
  test('PUT replaces, PATCH merges (RFC 7396: null deletes), a value over the limit is refused and changes nothing', () => {
    const store = new MmdsStore(200);
    const reader = new MmdsReader(store.shared);
    assert.deepEqual(reader.get(), {}, 'empty at first');
    store.put({ a: { b: 1, c: 2 }, d: 'x' });
    store.patch({ a: { b: null, e: 3 }, f: [1] });
    assert.deepEqual(store.get(), { a: { c: 2, e: 3 }, d: 'x', f: [1] });
    assert.deepEqual(reader.get(), store.get(), "the reader's view follows");
    assert.throws(() => store.put({ big: 'x'.repeat(300) }), MmdsError);
    assert.throws(() => store.patch({ big: 'x'.repeat(300) }), /over its limit of 200 bytes/);
    assert.deepEqual(reader.get(), { a: { c: 2, e: 3 }, d: 'x', f: [1] }, 'unchanged');
    assert.deepEqual(mergePatch({ a: 1 }, 'replaced'), 'replaced', 'a non-object patch replaces');
    assert.deepEqual(mergePatch([1, 2], { a: 1 }), { a: 1 });
  });
});

describe('MMDS HTTP service', () => {
  test('V1: GETs without a session, IMDS and JSON formats, 404, 405 with Allow, 501 for other types in IMDS', () => {
    const s = new MmdsService({ get: () => DATA }, 'V1', false);
    assert.deepEqual(s.answer(req('GET', '/')), { status: 200, body: 'latest/\nlist', contentType: 'text/plain' });
    assert.equal(s.answer(req('GET', '/latest/meta-data/')).body, 'ami-id\ncount\nreservation-id');
    assert.equal(s.answer(req('GET', '/latest/meta-data/ami-id')).body, 'ami-87654321');
    const json = s.answer(req('GET', '/latest/meta-data', { Accept: 'application/json' }));
    assert.equal(json.contentType, 'application/json');
    assert.deepEqual(JSON.parse(json.body), DATA.latest['meta-data']);
    assert.equal(s.answer(req('GET', '/list/1', { Accept: 'application/json' })).body, '"b"');
    assert.equal(s.answer(req('GET', '/latest/nothing')).status, 404);
    assert.equal(s.answer(req('GET', '/latest/meta-data/count')).status, 501);
    const post = s.answer(req('POST', '/'));
    assert.equal(post.status, 405);
    assert.equal(post.headers?.Allow, 'GET, PUT');
    assert.equal(s.answer(req('GET', 'latest')).status, 400, 'a path must start with /');
  });

  test('V2: 401 without a valid token; PUT /latest/api/token with a TTL from 1 to 21600 s; tokens expire', () => {
    let now = 0;
    const s = new MmdsService({ get: () => DATA }, 'V2', false, () => now);
    assert.equal(s.answer(req('GET', '/latest')).status, 401);
    assert.equal(s.answer(req('PUT', '/latest/api/token')).status, 400, 'no TTL');
    for (const ttl of ['0', '21601', 'abc']) {
      const r = s.answer(req('PUT', '/latest/api/token', { 'X-metadata-token-ttl-seconds': ttl }));
      assert.equal(r.status, 400, ttl);
    }
    const forwarded = s.answer(
      req('PUT', '/latest/api/token', { 'X-metadata-token-ttl-seconds': '60', 'X-Forwarded-For': '1.2.3.4' }),
    );
    assert.equal(forwarded.status, 400);
    const token = s.answer(req('PUT', '/latest/api/token', { 'X-aws-ec2-metadata-token-ttl-seconds': '60' }));
    assert.equal(token.status, 200);
    assert.equal(s.answer(req('GET', '/latest', { 'X-metadata-token': 'forged' })).status, 401);
    assert.equal(s.answer(req('GET', '/latest', { 'X-metadata-token': token.body })).body, 'meta-data/');
    assert.equal(s.answer(req('GET', '/latest', { 'X-aws-ec2-metadata-token': token.body })).status, 200);
    now += 61_000;
    assert.equal(s.answer(req('GET', '/latest', { 'X-metadata-token': token.body })).status, 401, 'expired');
    assert.equal(s.answer(req('PUT', '/latest/other', { 'X-metadata-token-ttl-seconds': '1' })).status, 404);
  });

  test('imds_compat answers in IMDS format whatever Accept says', () => {
    const s = new MmdsService({ get: () => DATA }, 'V1', true);
    const r = s.answer(req('GET', '/latest/meta-data', { Accept: 'application/json' }));
    assert.equal(r.contentType, 'text/plain');
    assert.equal(r.body, 'ami-id\ncount\nreservation-id');
  });

  test('requests: whole, incomplete, malformed, too large', () => {
    const whole = parseRequest(Buffer.from('GET /a HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\nGET'));
    assert.ok(whole && 'request' in whole);
    assert.equal(whole.request.path, '/a');
    assert.equal(whole.request.headers.get('accept'), 'application/json');
    assert.equal(whole.used, 'GET /a HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n'.length);
    assert.equal(parseRequest(Buffer.from('GET /a HTTP/1.1\r\nHost')), null);
    const http10 = parseRequest(Buffer.from('GET / HTTP/1.0\r\n\r\n'));
    assert.ok(http10 && 'request' in http10 && http10.request.close, 'HTTP/1.0 closes');
    const bad = parseRequest(Buffer.from('GARBAGE\r\n\r\n'));
    assert.ok(bad && 'error' in bad && bad.error.status === 400);
    const big = parseRequest(Buffer.from(`GET / HTTP/1.1\r\nX: ${'a'.repeat(9000)}`));
    assert.ok(big && 'error' in big && big.error.status === 413);
    const withBody = parseRequest(Buffer.from('PUT / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab'));
    assert.equal(withBody, null, 'waits for the body');
  });
});

describe('MMDS network stack', () => {
  const service = new MmdsService({ get: () => DATA }, 'V1', false);
  const stack = () => new MmdsStack(MMDS_IP, (r) => service.answer(r));

  test('an ARP request for the MMDS address is answered from MMDS_MAC; others pass to the TAP', () => {
    const s = stack();
    const arp = (target: number, op = 1) => {
      const f = Buffer.alloc(42);
      f.fill(0xff, 0, 6);
      GUEST_MAC.copy(f, 6);
      f.writeUInt16BE(0x0806, 12);
      f.writeUInt16BE(1, 14);
      f.writeUInt16BE(0x0800, 16);
      f[18] = 6;
      f[19] = 4;
      f.writeUInt16BE(op, 20);
      GUEST_MAC.copy(f, 22);
      f.writeUInt32BE(GUEST_IP, 28);
      f.writeUInt32BE(target, 38);
      return f;
    };
    assert.equal(s.handleFrame(arp(0xc0a80001)), false, 'not for MMDS');
    assert.equal(s.out.length, 0);
    assert.equal(s.handleFrame(arp(MMDS_IP)), true);
    const reply = s.out.shift()!;
    assert.ok(reply.subarray(0, 6).equals(GUEST_MAC));
    assert.equal(reply.readUInt16BE(20), 2, 'an ARP reply');
    assert.ok(reply.subarray(22, 28).equals(MMDS_MAC), 'MMDS is at MMDS_MAC');
    assert.equal(reply.readUInt32BE(28), MMDS_IP);
    assert.equal(reply.readUInt32BE(38), GUEST_IP);
  });

  test('a GET over TCP: handshake, the answer in order within the window, both FINs; the connection is then gone', () => {
    const s = stack();
    const answer = exchange(
      s,
      40000,
      'GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n',
    );
    assert.match(answer, /^HTTP\/1\.1 200 OK\r\n/);
    assert.match(answer, /Content-Length: 12\r\n/);
    assert.ok(answer.endsWith('\r\n\r\nami-87654321'));
    assert.equal(s.connectionCount, 0);
    // Keep-alive: two requests on one connection, closed by the guest.
    const two = exchange(
      s,
      40001,
      'GET /latest HTTP/1.1\r\nHost: x\r\n\r\nGET /list/0 HTTP/1.1\r\nAccept: application/json\r\n\r\n',
    );
    assert.equal(two.match(/HTTP\/1\.1 200 OK/g)?.length, 2);
    assert.ok(two.includes('meta-data/') && two.endsWith('"a"'));
    assert.equal(s.connectionCount, 0);
  });

  test('an answer larger than the MSS arrives in segments that fit it', () => {
    const big = { blob: 'z'.repeat(5000) };
    const s = new MmdsStack(MMDS_IP, (r) => new MmdsService({ get: () => big }, 'V1', false).answer(r));
    const answer = exchange(s, 40002, 'GET /blob HTTP/1.0\r\n\r\n');
    assert.ok(answer.endsWith('z'.repeat(5000)));
  });

  test('bad frames are dropped without an answer; another port is reset; other addresses pass to the TAP', () => {
    const s = stack();
    assert.equal(s.handleFrame(tcpFrame({ srcPort: 1, seq: 1, flags: SYN, dstIp: 0x08080808 })), false);
    assert.equal(s.handleFrame(tcpFrame({ srcPort: 1, seq: 1, flags: SYN, badIpChecksum: true })), true);
    assert.equal(s.out.length, 0, 'a bad IPv4 checksum is dropped');
    assert.equal(s.handleFrame(tcpFrame({ srcPort: 1, seq: 1, flags: SYN }).subarray(0, 40)), true);
    assert.equal(s.out.length, 0, 'a truncated frame is dropped');
    s.handleFrame(tcpFrame({ srcPort: 2, dstPort: 22, seq: 7, flags: SYN }));
    const rst = parseSegment(s.out.shift()!);
    assert.equal(rst.flags, RST | ACK);
    assert.equal(rst.ack, 8);
    s.handleFrame(tcpFrame({ srcPort: 3, seq: 7, ack: 99, flags: ACK }));
    assert.equal(parseSegment(s.out.shift()!).flags, RST, 'an unknown connection is reset');
  });

  test('a guest pipelining requests behind a closed window: the answers waiting are bounded, the rest of its data is not taken', () => {
    const big = { blob: 'z'.repeat(40_000) };
    const s = new MmdsStack(MMDS_IP, (r) => new MmdsService({ get: () => big }, 'V1', false).answer(r));
    s.handleFrame(tcpFrame({ srcPort: 7, seq: 0, flags: SYN }));
    const synAck = parseSegment(s.out.shift()!);
    const ack = (synAck.seq + 1) >>> 0;
    const request = Buffer.from('GET /blob HTTP/1.1\r\n\r\n');
    let seq = 1;
    let taken = 0;
    for (let i = 0; i < 200; i++) {
      // Window 0: nothing of the answers may be sent.
      const f = tcpFrame({ srcPort: 7, seq, ack, flags: ACK | PSH, data: request });
      f.writeUInt16BE(0, 14 + 20 + 14);
      s.handleFrame(f);
      const acks = s.out.splice(0).map(parseSegment);
      assert.ok(
        acks.every((a) => a.data.length === 0),
        'nothing sent into a closed window',
      );
      if (acks.at(-1)!.ack === seq + request.length) {
        seq += request.length;
        taken++;
      }
    }
    assert.ok(taken < 20, `only the first requests were taken (${taken}); the rest wait in the guest`);
  });

  test(`a guest opening connections without end keeps at most ${MAX_CONNECTIONS}; a malformed request is answered 400 and closed`, () => {
    const s = stack();
    for (let port = 1; port <= 100; port++) s.handleFrame(tcpFrame({ srcPort: port, seq: 5, flags: SYN }));
    assert.equal(s.connectionCount, MAX_CONNECTIONS);
    s.out.length = 0;
    const answer = exchange(s, 50000, 'NONSENSE\r\n\r\n');
    assert.match(answer, /^HTTP\/1\.1 400 Bad Request/);
    assert.match(answer, /Connection: close/);
  });
});
