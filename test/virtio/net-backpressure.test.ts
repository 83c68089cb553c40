// virtio-net on passt's socket when passt stops reading: the I/O thread never spins; the
// frame in flight is kept whole (the stream is [length][frame] records), the guest's
// further frames wait in its ring, and everything arrives in order once passt reads again.
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import { VIRTIO_NET_HDR_BYTES } from '../../src/virtio/net.js';
import { FakeDevice } from './fake-driver.js';

const TX = 1;

test('passt stops reading: frames wait in the ring, the socket is watched for room, and the stream stays whole', () => {
  const sv = new Int32Array(2);
  assert.equal(libc.socketpair(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC, 0, sv), 0);
  const [kilnEnd, passtEnd] = [sv[0]!, sv[1]!];
  const dev = new FakeDevice({ kind: 'net', options: { fd: kilnEnd, mac: '06:00:00:00:00:01', backend: 'passt' } });
  after(() => {
    dev.close();
    libc.close(passtEnd);
  });
  const frames = Array.from({ length: 600 }, (_, i) => Buffer.alloc(1400 + (i % 50), i & 0xff));
  const expected = Buffer.concat(
    frames.flatMap((f) => {
      const len = Buffer.alloc(4);
      len.writeUInt32BE(f.length);
      return [len, f];
    }),
  );
  let offered = 0;
  let completed = 0;
  let stalled = false;
  const got: Buffer[] = [];
  const buf = Buffer.alloc(256 * 1024);
  let reading = false;
  for (let turn = 0; turn < 5000 && completed < frames.length; turn++) {
    // Keep the ring full (at most 32 chains outstanding).
    while (offered < frames.length && offered - completed < 32) {
      dev.offer(TX, [{ read: Buffer.alloc(VIRTIO_NET_HDR_BYTES) }, { read: frames[offered]! }]);
      offered++;
    }
    dev.notify(TX);
    const before = completed;
    completed += dev.used(TX).length;
    if (!reading && completed === before) {
      // Nothing moved: passt's socket is full and the guest's frames wait.
      stalled = true;
      assert.equal(dev.interestIn(kilnEnd)?.write, true, 'the socket is watched for room');
      reading = true;
    }
    if (reading) {
      for (;;) {
        const n = libc.read(passtEnd, buf, buf.length);
        if (n <= 0) break;
        got.push(Buffer.from(buf.subarray(0, n)));
      }
      dev.poll(5);
      completed += dev.used(TX).length;
    }
  }
  for (let i = 0; i < 100; i++) {
    const n = libc.read(passtEnd, buf, buf.length);
    if (n <= 0) break;
    got.push(Buffer.from(buf.subarray(0, n)));
  }
  assert.ok(stalled, 'the socket filled up (the case under test happened)');
  assert.equal(completed, frames.length, 'every frame was sent');
  assert.ok(Buffer.concat(got).equals(expected), 'the stream is every [length][frame], in order, whole');
  assert.equal(dev.needsReset, null);
});
