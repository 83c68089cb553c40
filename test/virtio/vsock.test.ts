// virtio-vsock with Firecracker's hybrid model, from a ring-3 guest driver speaking the
// vsock packet protocol: a host client connects through the Unix socket ("CONNECT
// 1234" -> "OK <port>") and talks to the guest; the guest connects to host port 5000
// (Kiln connects it to "<uds>_5000") and talks to a server there; a guest connection to
// a port nobody listens on gets a reset.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createConnection, createServer } from 'node:net';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { KIT_DATA } from '../../src/layout.js';
import { listenVsock } from '../../src/virtio/vsock.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { result, runDriver, virtioTestVm } from './harness.js';

const DRIVER = `
#define HDR 44
static struct vq rx, tx;
static u64 cid, bufs, fwd;
static int buf_of[256];
static void post(int b) { struct vbuf v = { bufs + 4096ULL * b, 4096, 1 }; buf_of[rx.free_head % rx.size] = b; vq_add(&rx, &v, 1, 0); vq_kick(&rx); }
static void send(u32 sp, u32 dp, u16 op, u32 flags, const char *data, u32 len) {
  u64 h = kit_alloc(4096);
  wr64(h, cid); wr64(h + 8, 2); wr32(h + 16, sp); wr32(h + 20, dp); wr32(h + 24, len);
  wr16(h + 28, 1); wr16(h + 30, op); wr32(h + 32, flags); wr32(h + 36, 65536); wr32(h + 40, (u32)fwd);
  for (u32 i = 0; i < len; i++) wr8(h + HDR + i, data[i]);
  struct vbuf v = { h, HDR + len, 0 };
  vq_add(&tx, &v, 1, 0); vq_kick(&tx);
  if (vq_wait(&tx, 0, 500000000L) < 0) kit_exit(20);
}
/* The next packet from the host: returns its address (header first); the buffer is reposted after use. */
static int last_buf = -1;
static u64 next(void) {
  if (last_buf >= 0) post(last_buf);
  u32 len = 0;
  int id = vq_wait(&rx, &len, 300000000L);
  if (id < 0) kit_exit(21);
  last_buf = buf_of[id % rx.size];
  u64 p = bufs + 4096ULL * last_buf;
  if (rd16(p + 30) == 5) fwd += rd32(p + 24);
  return p;
}
void kit_main(void) {
  struct vdev d; struct vq ev;
  if (vdev_find(&d, SLOT0)) kit_exit(3);
  if (!(vdev_negotiate(&d, 1ULL << VIRTIO_F_VERSION_1) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(4);
  if (vq_setup(&d, &rx, 0, 16, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &tx, 1, 16, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &ev, 2, 4, VIRTIO_MSI_NO_VECTOR)) kit_exit(5);
  vdev_driver_ok(&d);
  cid = rd64(d.device);
  RESULT(0) = cid;
  bufs = kit_alloc(8 * 4096);
  for (int b = 0; b < 8; b++) post(b);
  RESULT(9) = 1; /* ready */
  /* 1. The host connects to our port 1234. */
  u64 p = next();
  if (rd16(p + 30) != 1 || rd32(p + 20) != 1234) kit_exit(6);
  u32 hostport = rd32(p + 16);
  RESULT(1) = hostport;
  send(1234, hostport, 2, 0, 0, 0);           /* RESPONSE */
  p = next();
  if (rd16(p + 30) != 5) kit_exit(7);         /* RW */
  char up[64]; u32 n = rd32(p + 24);
  for (u32 i = 0; i < n && i < 64; i++) { u8 c = rd8(p + HDR + i); up[i] = c >= 'a' && c <= 'z' ? c - 32 : c; }
  RESULT(2) = n;
  send(1234, hostport, 5, 0, up, n);          /* echo, upper case */
  /* 2. We connect to the host's port 5000 (fwd_cnt counts per connection). */
  fwd = 0;
  send(40000, 5000, 1, 0, 0, 0);              /* REQUEST */
  do p = next(); while (rd16(p + 30) == 6);   /* skip credit updates */
  if (rd16(p + 30) != 2 || rd32(p + 16) != 5000) kit_exit(8);
  send(40000, 5000, 5, 0, "from guest", 10);
  do p = next(); while (rd16(p + 30) == 6);
  if (rd16(p + 30) != 5) kit_exit(9);
  RESULT(3) = rd32(p + 24);
  RESULT(4) = rd64(p + HDR);                  /* first 8 bytes of the reply */
  send(40000, 5000, 4, 3, 0, 0);              /* SHUTDOWN both ways */
  do p = next(); while (rd16(p + 30) == 6);
  RESULT(5) = rd16(p + 30);                   /* RST */
  /* 3. Nobody listens on 5001. */
  send(40001, 5001, 1, 0, 0, 0);
  do p = next(); while (rd16(p + 30) == 6);
  RESULT(6) = rd16(p + 30);
  kit_exit(0);
}`;

describe('virtio-vsock (hybrid Unix socket model)', { skip: kvmSkip }, () => {
  test('host-initiated and guest-initiated connections carry data both ways; a closed port resets', async () => {
    const uds = join(tempDir(), 'v.sock');
    const server = createServer((s) => {
      s.setEncoding('utf8');
      s.on('data', (chunk: string) => {
        if (chunk.includes('from guest')) s.write('reply-from-host');
      });
      s.on('error', () => s.destroy());
    });
    server.listen(`${uds}_5000`);
    await once(server, 'listening');
    after(() => server.close());
    const { fd, options } = listenVsock(uds, 42);
    const t = virtioTestVm([{ kind: 'vsock', options }]);
    t.vm.adoptFd(fd);
    let fromGuest = '';
    await runDriver(
      t,
      DRIVER,
      {},
      (r) => {
        assert.equal(
          r.exitCode,
          0,
          `${r.detail}; results ${[0, 1, 2, 3, 5, 6, 9].map((i) => result(t, i)).join(' ')}; client got ${JSON.stringify(fromGuest)}`,
        );
        assert.equal(result(t, 0), 42n, 'guest CID from the device config');
        assert.ok(result(t, 1) >= 1n << 30n, 'host port from the ephemeral range');
        assert.equal(result(t, 2), 5n, 'the client sent 5 bytes');
        assert.equal(result(t, 3), 15n, 'the host server replied with 15 bytes');
        assert.equal(Buffer.from(t.vm.memory.read(KIT_DATA + 32, 8)).toString(), 'reply-fr');
        assert.equal(result(t, 5), 3n, 'RST after SHUTDOWN');
        assert.equal(result(t, 6), 3n, 'RST for a port nobody listens on');
      },
      async () => {
        for (let i = 0; i < 400 && result(t, 9) !== 1n; i++) await sleep(5);
        const client = createConnection(uds);
        client.setEncoding('utf8');
        client.on('data', (chunk: string) => {
          fromGuest += chunk;
          if (/^OK \d+\n$/.test(fromGuest)) client.write('hello');
        });
        client.on('error', (err: NodeJS.ErrnoException) => assert.equal(err.code, 'ECONNRESET'));
        await once(client, 'connect');
        client.write('CONNECT 1234\n');
        for (let i = 0; i < 400 && !fromGuest.includes('HELLO'); i++) await sleep(5);
      },
    );
    assert.match(fromGuest, /^OK \d+\nHELLO$/);
  });
});
