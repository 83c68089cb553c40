// vsock with a host peer that stops reading: Kiln never waits or spins on it. The data
// the socket does not take waits (bounded), the guest's credit runs out so it stops
// sending, the socket is watched for room, and it all arrives once the peer reads again.
// A guest that sends past its credit loses the connection, not the VMM its memory.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import {
  listenVsock,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  MAX_PENDING_CONTROL,
  VIRTIO_VSOCK_OP,
  VSOCK_CONFIG,
  VSOCK_HDR,
  VSOCK_HOST_CID,
  vsockType,
} from '../../src/virtio/vsock.js';
import { bindType } from '../../src/virtio/device.js';
import { tempDir } from '../helpers.js';
import { FakeDevice } from './fake-driver.js';
import { DeviceCounters, VSOCK_COUNTERS } from '../../src/virtio/counters.js';

const RX = 0;
const TX = 1;
const GUEST_CID = 3;
const GUEST_PORT = 5000;
const HOST_PORT = 1234;

function header(op: number, len: number, fwdCnt = 0, bufAlloc = 1 << 20): Buffer {
  const h = Buffer.alloc(VSOCK_HDR.bytes);
  h.writeBigUInt64LE(BigInt(GUEST_CID), VSOCK_HDR.srcCid);
  h.writeBigUInt64LE(BigInt(VSOCK_HOST_CID), VSOCK_HDR.dstCid);
  h.writeUInt32LE(GUEST_PORT, VSOCK_HDR.srcPort);
  h.writeUInt32LE(HOST_PORT, VSOCK_HDR.dstPort);
  h.writeUInt32LE(len, VSOCK_HDR.len);
  h.writeUInt16LE(1, VSOCK_HDR.type);
  h.writeUInt16LE(op, VSOCK_HDR.op);
  h.writeUInt32LE(bufAlloc, VSOCK_HDR.bufAlloc);
  h.writeUInt32LE(fwdCnt, VSOCK_HDR.fwdCnt);
  return h;
}

/** A listening Unix socket that accepts nothing until told to (its peer "stopped reading"). */
function hostListener(path: string): number {
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK, 0);
  assert.ok(fd >= 0);
  assert.equal(libc.bind(fd, libc.sockaddrUn(path), libc.sockaddr_un.size), 0);
  assert.equal(libc.listen(fd, 4), 0);
  return fd;
}

function setup() {
  const dir = tempDir();
  const uds = join(dir, 'v.sock');
  const peerListen = hostListener(`${uds}_${HOST_PORT}`);
  const { options } = listenVsock(uds, GUEST_CID);
  const counters = new DeviceCounters(VSOCK_COUNTERS);
  const dev = new FakeDevice({ kind: 'vsock', options: { ...options, counters: counters.shared } });
  after(() => {
    dev.close();
    libc.close(peerListen);
  });
  const rxOps = () =>
    dev.used(RX).map((u) => ({
      op: u.written.readUInt16LE(VSOCK_HDR.op),
      fwdCnt: u.written.readUInt32LE(VSOCK_HDR.fwdCnt),
      bufAlloc: u.written.readUInt32LE(VSOCK_HDR.bufAlloc),
    }));
  const giveRx = (n: number) => {
    for (let i = 0; i < n; i++) dev.offer(RX, [{ write: 4096 }]);
    dev.notify(RX);
  };
  const send = (op: number, payload = Buffer.alloc(0)) => {
    dev.offer(TX, [{ read: header(op, payload.length) }, ...(payload.length ? [{ read: payload }] : [])]);
    dev.notify(TX);
  };
  return { dev, peerListen, rxOps, giveRx, send, counters };
}

test('a peer that stops reading: the data waits, the socket is watched for room, credit stops the guest, and all of it arrives in order later', () => {
  const { dev, peerListen, rxOps, giveRx, send, counters } = setup();
  let toGuest = 0;
  const count = <T>(ops: T[]) => ((toGuest += ops.length), ops);
  giveRx(32);
  send(VIRTIO_VSOCK_OP.REQUEST);
  const response = count(rxOps());
  assert.deepEqual(
    response.map((r) => r.op),
    [VIRTIO_VSOCK_OP.RESPONSE],
  );
  const credit = response[0]!.bufAlloc;
  // The guest sends exactly its credit, in 16 KiB packets; the host peer reads nothing.
  const chunk = 16 * 1024;
  const sent: Buffer[] = [];
  let fwdCnt = 0;
  for (let off = 0; off < credit; off += chunk) {
    const payload = Buffer.alloc(chunk, (off / chunk) & 0xff);
    sent.push(payload);
    send(VIRTIO_VSOCK_OP.RW, payload);
    for (const r of count(rxOps())) fwdCnt = Math.max(fwdCnt, r.fwdCnt);
  }
  const connFd = dev.watchedFds().find((fd) => dev.interestIn(fd)?.write);
  assert.ok(connFd !== undefined, 'the host socket is watched for room to write');
  assert.ok(fwdCnt < credit, `the guest was told only what the host took (${fwdCnt} of ${credit})`);

  // The peer reads everything: the waiting bytes go out as room appears, in order.
  const peer = libc.accept4(peerListen, null, null, libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK);
  assert.ok(peer >= 0);
  after(() => libc.close(peer));
  const got: Buffer[] = [];
  const buf = Buffer.alloc(64 * 1024);
  const total = sent.reduce((s, b) => s + b.length, 0);
  const updates: number[] = [];
  for (let i = 0; i < 1000 && got.reduce((s, b) => s + b.length, 0) < total; i++) {
    for (;;) {
      const n = libc.read(peer, buf, buf.length);
      if (n <= 0) break;
      got.push(Buffer.from(buf.subarray(0, n)));
    }
    dev.poll(10);
    updates.push(...count(rxOps()).map((r) => r.fwdCnt));
  }
  assert.ok(Buffer.concat(got).equals(Buffer.concat(sent)), 'every byte arrived, in order');
  assert.equal(dev.interestIn(connFd)?.write, false, 'no longer watched for room');
  giveRx(4);
  updates.push(...count(rxOps()).map((r) => r.fwdCnt));
  assert.equal(Math.max(...updates), total, 'the guest gets all its credit back');
  // The metrics' counters: what went each way, one connection added and none killed.
  const c = counters.read();
  assert.equal(c.tx_bytes_count, total);
  assert.equal(c.tx_packets_count, sent.length + 1, 'the request and every RW packet');
  assert.equal(c.rx_packets_count, toGuest, 'every packet the guest received');
  assert.equal(c.rx_bytes_count, 0, 'the host sent no data');
  assert.deepEqual([c.conns_added, c.conns_killed, c.conns_removed], [1, 0, 0]);
});

test('a guest that sends past its credit to a peer that does not read gets a reset; the VMM keeps at most one buffer of it', () => {
  const { dev, rxOps, giveRx, send, counters } = setup();
  giveRx(64);
  send(VIRTIO_VSOCK_OP.REQUEST);
  assert.equal(rxOps()[0]?.op, VIRTIO_VSOCK_OP.RESPONSE);
  const heapBefore = process.memoryUsage().arrayBuffers;
  const payload = Buffer.alloc(32 * 1024, 0x55);
  const ops: number[] = [];
  for (let i = 0; i < 200 && !ops.includes(VIRTIO_VSOCK_OP.RST); i++) {
    send(VIRTIO_VSOCK_OP.RW, payload);
    ops.push(...rxOps().map((r) => r.op));
  }
  assert.ok(ops.includes(VIRTIO_VSOCK_OP.RST), 'the connection was reset');
  assert.deepEqual([counters.read().conns_killed, counters.read().conns_removed], [1, 1], 'counted as killed');
  assert.deepEqual(dev.watchedFds().length, 1, "only the device's listening socket is still watched");
  assert.ok(process.memoryUsage().arrayBuffers - heapBefore < 8 << 20, 'no unbounded buffering');
});

test('a flood of requests to ports nobody listens on, with no receive buffers: the replies waiting are bounded', () => {
  const { dev, giveRx, rxOps } = setup();
  const requests = 5000;
  for (let i = 0; i < requests; i++) {
    const h = header(VIRTIO_VSOCK_OP.REQUEST, 0);
    h.writeUInt32LE(40000 + i, VSOCK_HDR.dstPort);
    dev.offer(TX, [{ read: h }]);
    dev.notify(TX);
    dev.used(TX);
  }
  let replies = 0;
  for (let round = 0; round < 200; round++) {
    giveRx(32);
    const got = rxOps();
    assert.ok(got.every((r) => r.op === VIRTIO_VSOCK_OP.RST));
    replies += got.length;
    if (got.length === 0) break;
  }
  assert.ok(replies > 0, 'refused requests are answered with resets');
  assert.ok(
    replies <= MAX_PENDING_CONTROL,
    `at most ${MAX_PENDING_CONTROL} replies waited (${replies} of ${requests})`,
  );
  assert.equal(dev.needsReset, null);
});

test("after a restore, the guest gets a transport reset on the event queue (its connections' host sockets are gone)", () => {
  const { dev } = setup();
  // Nothing offered on the event queue yet: nothing to send, and no harm.
  dev.runtime.restored();
  assert.deepEqual(dev.used(2), []);
  dev.offer(2, [{ write: 8 }]);
  dev.runtime.restored();
  const events = dev.used(2);
  assert.equal(events.length, 1);
  assert.equal(events[0]!.len, 4);
  assert.equal(events[0]!.written.readUInt32LE(0), VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
  assert.equal(dev.needsReset, null);
});

test("a clone's CID: after a restore, the configuration space the guest reads again at the reset holds the new VM's CID", () => {
  const config = new DataView(new ArrayBuffer(VSOCK_CONFIG.bytes));
  const snapshot = { listenFd: -1, udsPath: '/nonexistent', guestCid: GUEST_CID };
  bindType(vsockType, snapshot).initConfig(config);
  // The snapshot's configuration space, restored into a VM configured with CID 0xfffffff0.
  bindType(vsockType, { ...snapshot, guestCid: 0xffff_fff0 }).restoredConfig(config);
  assert.equal(config.getBigUint64(VSOCK_CONFIG.guestCid, true), 0xffff_fff0n);
});
