// virtio-net on a real TAP, driven without a guest (test/virtio/fake-driver.ts plays the
// driver): frames go from guest memory to the TAP with one writev and from the TAP into
// the guest's buffers with one readv, whole whatever the chain's shape; and the TAP cuts
// TCP segments to the MTU for a driver that did not accept GUEST_TSO4, but hands them
// whole to one that did. The TAP lives in a network namespace the test makes; the other
// end (an AF_PACKET socket in Python) runs there too. Nothing outside it is touched.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import {
  NET_FRAMES_PER_TURN,
  NET_RX_QUEUE,
  NET_TX_QUEUE,
  openTap,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_HDR_BYTES,
} from '../../src/virtio/net.js';
import { toolAvailable } from '../helpers.js';
import { FakeDevice } from './fake-driver.js';

const skip =
  process.getuid?.() === 0 && existsSync('/dev/net/tun') && toolAvailable('ip', '-V') && toolAvailable('python3', '-V')
    ? false
    : 'needs root, /dev/net/tun, iproute2 (ip) and python3 to make a TAP in a network namespace';

const NS = `kiln-nettap-${process.pid}`;
const ETHERTYPE = 0x88b5; // IEEE's local experimental type: nothing else on the link uses it

/**
 * The far end, on the TAP's interface inside the namespace:
 *   capture IF N     print the first N frames of our type that leave the TAP's fd (hex)
 *   send IF N [STEP] send N frames of our type into the interface (they come out of the fd),
 *                    frame i with 100 + STEP*i bytes of payload (STEP 10 unless given)
 *   tso IF PAYLOAD SEG   send one TCP/IPv4 segment of PAYLOAD bytes marked for TSO at SEG
 */
const FAR_END = String.raw`
import socket, struct, sys
mode, ifname = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
if mode == 'tso':
    s.setsockopt(263, 15, 1)  # PACKET_VNET_HDR
s.bind((ifname, 0))
dst, src = bytes.fromhex('020000000099'), bytes.fromhex('020000000001')
if mode == 'capture':
    print('ready', flush=True)
    left = int(sys.argv[3])
    while left > 0:
        f = s.recv(70000)
        if f[12:14] == b'\x88\xb5':
            print(f.hex(), flush=True)
            left -= 1
elif mode == 'send':
    step = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    for i in range(int(sys.argv[3])):
        s.send(dst + src + b'\x88\xb5' + bytes((i + k) & 0xff for k in range(100 + step * i)))
else:
    payload, seg = int(sys.argv[3]), int(sys.argv[4])
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 40 + payload, 1, 0x4000, 64, 6, 0,
                     bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2]))
    tcp = struct.pack('!HHIIBBHHH', 5000, 6000, 1, 1, 0x50, 0x18, 65535, 0, 0)
    hdr = struct.pack('<BBHHHH', 1, 1, 54, seg, 34, 16)  # NEEDS_CSUM, GSO_TCPV4
    s.send(hdr + dst + src + b'\x08\x00' + ip + tcp + bytes(i & 0xff for i in range(payload)))
`;

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
const farEnd = (...args: string[]) =>
  spawn('ip', ['netns', 'exec', NS, 'python3', '-c', FAR_END, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });

/** Opens a new TAP, moves it into the namespace and brings it up; returns its fd and name. */
function tapInNamespace(n: number): { fd: number; name: string } {
  const name = `ktap${process.pid % 100000}x${n}`;
  const fd = openTap(name);
  ip('link', 'set', name, 'netns', NS);
  ip('-n', NS, 'link', 'set', name, 'up');
  return { fd, name };
}

/** Waits for `p` to exit and returns what it printed (fails with its stderr if it failed). */
function finished(p: ReturnType<typeof farEnd>): Promise<string> {
  let out = '';
  let err = '';
  p.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  p.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  return new Promise((resolve, reject) =>
    p.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`the far end failed (${code}): ${err}`)))),
  );
}

function frame(i: number, bytes: number): Buffer {
  const f = Buffer.alloc(bytes, i);
  Buffer.from('020000000099020000000001', 'hex').copy(f, 0);
  f.writeUInt16BE(ETHERTYPE, 12);
  for (let k = 14; k < bytes; k++) f[k] = (k * 7 + i) & 0xff;
  return f;
}

/** Rx buffers: header and frame apart (two writable buffers), as many as `count`. */
function postRx(dev: FakeDevice, count: number, bytes: number): void {
  for (let i = 0; i < count; i++)
    dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, { write: bytes - VIRTIO_NET_HDR_BYTES }]);
  dev.notify(NET_RX_QUEUE);
}

/** Runs the device's I/O loop until `count` buffers came back on the rx queue of our type (others skipped). */
async function receive(dev: FakeDevice, count: number): Promise<Buffer[]> {
  const got: Buffer[] = [];
  for (let turn = 0; turn < 400 && got.length < count; turn++) {
    dev.poll(10);
    for (const u of dev.used(NET_RX_QUEUE)) {
      if (u.len === 0 || u.written.readUInt16BE(VIRTIO_NET_HDR_BYTES + 12) !== 0x86dd)
        got.push(u.written.subarray(0, u.len));
      else postRx(dev, 1, 2048); // the kernel's own IPv6 chatter: give the buffer back
    }
    if (got.length < count) await sleep(1);
  }
  return got;
}

describe('virtio-net on a TAP, without a guest', { skip }, () => {
  before(() => {
    ip('netns', 'add', NS);
    execFileSync('ip', ['netns', 'exec', NS, 'sysctl', '-q', '-w', 'net.ipv6.conf.default.disable_ipv6=1']);
  });
  after(() => {
    ip('netns', 'del', NS);
  });

  test('tx: each frame leaves the TAP whole, however the driver split it into buffers', async () => {
    const { fd, name } = tapInNamespace(1);
    const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } });
    try {
      const frames = [60, 1514, 700, 9000].map((bytes, i) => frame(i, bytes));
      const capture = farEnd('capture', name, String(frames.length));
      const captured = finished(capture);
      await new Promise<void>((resolve) => capture.stdout!.once('data', () => resolve()));
      const hdr = Buffer.alloc(VIRTIO_NET_HDR_BYTES);
      // Header apart; header and frame in one buffer; the frame itself in three pieces; header in two.
      dev.offer(NET_TX_QUEUE, [{ read: hdr }, { read: frames[0]! }]);
      dev.offer(NET_TX_QUEUE, [{ read: Buffer.concat([hdr, frames[1]!]) }]);
      dev.offer(NET_TX_QUEUE, [
        { read: hdr },
        { read: frames[2]!.subarray(0, 10) },
        { read: frames[2]!.subarray(10, 300) },
        { read: frames[2]!.subarray(300) },
      ]);
      dev.offer(NET_TX_QUEUE, [{ read: hdr.subarray(0, 5) }, { read: hdr.subarray(5) }, { read: frames[3]! }]);
      dev.notify(NET_TX_QUEUE);
      const used = dev.used(NET_TX_QUEUE);
      assert.equal(used.length, 4, 'every chain was returned');
      const out = (await captured).trim().split('\n').slice(1);
      assert.deepEqual(
        out.map((h) => Buffer.from(h, 'hex')),
        frames,
        'the frames, byte for byte and in order',
      );
      assert.deepEqual(dev.logged, []);
    } finally {
      dev.close();
    }
  });

  test('rx: frames land in the guest buffers whole; a buffer too small for its frame gets none', async () => {
    const { fd, name } = tapInNamespace(2);
    const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } });
    try {
      postRx(dev, 6, 2048);
      await finished(farEnd('send', name, '6'));
      const got = await receive(dev, 6);
      assert.equal(got.length, 6);
      got.forEach((g, i) => {
        assert.ok(g.subarray(0, VIRTIO_NET_HDR_BYTES).equals(Buffer.alloc(VIRTIO_NET_HDR_BYTES)), 'a plain header');
        const f = g.subarray(VIRTIO_NET_HDR_BYTES);
        assert.equal(f.length, 14 + 100 + 10 * i, `frame ${i}'s length`);
        assert.equal(f.readUInt16BE(12), ETHERTYPE);
        for (let k = 0; k < f.length - 14; k++) assert.equal(f[14 + k], (i + k) & 0xff);
      });
      // A 110-byte frame for a 60-byte buffer: dropped (length 0), the next one arrives.
      dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, { write: 48 }]);
      postRx(dev, 1, 2048);
      await finished(farEnd('send', name, '2'));
      const next = await receive(dev, 2);
      assert.deepEqual(
        next.map((g) => g.length),
        [0, VIRTIO_NET_HDR_BYTES + 14 + 110],
      );
      assert.deepEqual(dev.logged, []);
    } finally {
      dev.close();
    }
  });

  test('many frames at once, more than one system call moves, with a buffer of many pieces among them, stay whole and in order', async () => {
    const { fd, name } = tapInNamespace(5);
    const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } });
    const COUNT = 40;
    const PIECES = 30; // more than one batched request holds: it goes alone, after the ones before it
    try {
      const frames = Array.from({ length: COUNT }, (_, i) => frame(i, 60 + 37 * i));
      const capture = farEnd('capture', name, String(COUNT));
      const captured = finished(capture);
      await new Promise<void>((resolve) => capture.stdout!.once('data', () => resolve()));
      const hdr = Buffer.alloc(VIRTIO_NET_HDR_BYTES);
      frames.forEach((f, i) => {
        if (i !== 20) return dev.offer(NET_TX_QUEUE, [{ read: hdr }, { read: f }]);
        const cut = Math.ceil(f.length / PIECES);
        const pieces = Array.from({ length: PIECES }, (_, k) => ({ read: f.subarray(k * cut, (k + 1) * cut) }));
        dev.offer(NET_TX_QUEUE, [{ read: hdr }, ...pieces.filter((p) => p.read.length > 0)]);
      });
      dev.notify(NET_TX_QUEUE);
      assert.equal(dev.used(NET_TX_QUEUE).length, COUNT, 'every chain was returned');
      const out = (await captured).trim().split('\n').slice(1);
      assert.deepEqual(
        out.map((h) => Buffer.from(h, 'hex')),
        frames,
        'the frames, byte for byte and in order',
      );

      for (let i = 0; i < COUNT; i++)
        if (i === 20) dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, ...Array(PIECES).fill({ write: 64 })]);
        else dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, { write: 2048 - VIRTIO_NET_HDR_BYTES }]);
      dev.notify(NET_RX_QUEUE);
      await finished(farEnd('send', name, String(COUNT)));
      const got = await receive(dev, COUNT);
      assert.equal(got.length, COUNT);
      got.forEach((g, i) => {
        const f = g.subarray(VIRTIO_NET_HDR_BYTES);
        assert.equal(f.length, 14 + 100 + 10 * i, `frame ${i}'s length`);
        for (let k = 0; k < f.length - 14; k++) assert.equal(f[14 + k], (i + k) & 0xff, `frame ${i}, byte ${k}`);
      });
      assert.deepEqual(dev.logged, []);
    } finally {
      dev.close();
    }
  });

  test('a flood each way is served NET_FRAMES_PER_TURN frames at a time, then the rest after the other ready work', async () => {
    const { fd, name } = tapInNamespace(6);
    const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } });
    const COUNT = 200;
    try {
      const frames = Array.from({ length: COUNT }, (_, i) => frame(i, 60 + (i % 50)));
      const capture = farEnd('capture', name, String(COUNT));
      const captured = finished(capture);
      await new Promise<void>((resolve) => capture.stdout!.once('data', () => resolve()));
      const hdr = Buffer.alloc(VIRTIO_NET_HDR_BYTES);
      for (const f of frames) dev.offer(NET_TX_QUEUE, [{ read: Buffer.concat([hdr, f]) }]);
      dev.notify(NET_TX_QUEUE);
      assert.equal(dev.used(NET_TX_QUEUE).length, NET_FRAMES_PER_TURN, 'one turn: the budget');
      assert.ok(dev.pendingKicks.has(NET_TX_QUEUE), 'the queue is come back to');
      dev.poll(0);
      assert.equal(dev.used(NET_TX_QUEUE).length, COUNT - NET_FRAMES_PER_TURN, 'the rest, next turn');
      const out = (await captured).trim().split('\n').slice(1);
      assert.deepEqual(
        out.map((h) => Buffer.from(h, 'hex')),
        frames,
        'every frame, in order',
      );

      for (let i = 0; i < COUNT; i++) dev.offer(NET_RX_QUEUE, [{ write: 2200 }]);
      await finished(farEnd('send', name, String(COUNT), '5'));
      dev.notify(NET_RX_QUEUE);
      assert.equal(dev.used(NET_RX_QUEUE).length, NET_FRAMES_PER_TURN, 'one turn: the budget');
      assert.ok(dev.pendingKicks.has(NET_RX_QUEUE), 'the queue is come back to');
      const rest = await receive(dev, COUNT - NET_FRAMES_PER_TURN);
      assert.equal(rest.length, COUNT - NET_FRAMES_PER_TURN);
      rest.forEach((g, k) => {
        const i = NET_FRAMES_PER_TURN + k;
        assert.equal(g.length - VIRTIO_NET_HDR_BYTES, 14 + 100 + 5 * i, `frame ${i}'s length`);
      });
      assert.deepEqual(dev.logged, []);
    } finally {
      dev.close();
    }
  });

  test('TSO: whole segments only to a driver that accepted GUEST_TSO4; cut to size for one that did not', async () => {
    for (const tso of [true, false]) {
      const { fd, name } = tapInNamespace(tso ? 3 : 4);
      const dev = new FakeDevice(
        { kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } },
        tso ? {} : { refuse: (1n << VIRTIO_NET_F_GUEST_TSO4) | (1n << VIRTIO_NET_F_GUEST_TSO6) },
      );
      try {
        postRx(dev, 8, 8192);
        await finished(farEnd('tso', name, '4000', '1000'));
        const got = await receive(dev, tso ? 1 : 4);
        await sleep(50);
        dev.poll(10);
        got.push(...dev.used(NET_RX_QUEUE).map((u) => u.written.subarray(0, u.len)));
        const payloads = got.map((g) => g.length - VIRTIO_NET_HDR_BYTES - 54);
        if (tso) {
          assert.deepEqual(payloads, [4000], 'one frame with the whole segment');
          assert.equal(got[0]![1], 1, 'its header says GSO TCPv4');
          assert.equal(got[0]!.readUInt16LE(4), 1000, 'at a 1000-byte segment size');
        } else {
          assert.deepEqual(payloads, [1000, 1000, 1000, 1000], 'four MTU-sized segments');
          for (const g of got) assert.equal(g[1], 0, 'no GSO in their headers');
        }
        assert.deepEqual(dev.logged, []);
      } finally {
        dev.close();
      }
    }
  });
});
