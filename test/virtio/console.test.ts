// virtio-console on a Unix socket: the guest's output reaches the connected client, and
// what the client types reaches the guest (which echoes it back in upper case).
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { KIT_DATA } from '../../src/layout.js';
import { listenConsole } from '../../src/virtio/console.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { result, runDriver, virtioTestVm } from './harness.js';

const ECHO_DRIVER = `
void kit_main(void) {
  struct vdev d; struct vq rx, tx;
  if (vdev_find(&d, SLOT0)) kit_exit(3);
  if (!(vdev_negotiate(&d, 1ULL << VIRTIO_F_VERSION_1) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(4);
  if (vq_setup(&d, &rx, 0, 8, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &tx, 1, 8, VIRTIO_MSI_NO_VECTOR)) kit_exit(5);
  vdev_driver_ok(&d);
  RESULT(0) = rd32(d.device + 4); /* max_nr_ports */
  u64 in = kit_alloc(4096);
  struct vbuf r = { in, 64, 1 };
  vq_add(&rx, &r, 1, 0); vq_kick(&rx);
  /* Wait until the host says it is connected (RESULT(1) set by the test), then greet. */
  while (RESULT(1) == 0) __asm__ __volatile__("pause");
  u64 out = kit_alloc(4096);
  const char *hello = "hello from the guest\\n";
  int n = 0;
  while (hello[n]) { wr8(out + n, hello[n]); n++; }
  struct vbuf t = { out, n, 0 };
  vq_add(&tx, &t, 1, 0); vq_kick(&tx);
  if (vq_wait(&tx, 0, 1000000000L) < 0) kit_exit(6);
  u32 len = 0;
  if (vq_wait(&rx, &len, 200000000L) < 0) kit_exit(7);
  RESULT(2) = len;
  for (u32 i = 0; i < len; i++) { u8 c = rd8(in + i); wr8(out + i, c >= 'a' && c <= 'z' ? c - 32 : c); }
  struct vbuf e = { out, len, 0 };
  vq_add(&tx, &e, 1, 0); vq_kick(&tx);
  if (vq_wait(&tx, 0, 1000000000L) < 0) kit_exit(8);
  kit_exit(0);
}`;

describe('virtio-console', { skip: kvmSkip }, () => {
  test('on a Unix socket: guest output reaches the client, client input reaches the guest', async () => {
    const path = join(tempDir(), 'console.sock');
    const listenFd = listenConsole(path);
    const t = virtioTestVm([{ kind: 'console', options: { listenFd } }]);
    t.vm.adoptFd(listenFd);
    let received = '';
    await runDriver(
      t,
      ECHO_DRIVER,
      {},
      (r) => {
        assert.equal(r.exitCode, 0, r.detail);
        assert.equal(result(t, 0), 1n, 'one port');
        assert.equal(result(t, 2), 5n, 'five bytes typed');
      },
      async () => {
        const client = createConnection(path);
        client.setEncoding('utf8');
        client.on('data', (chunk: string) => {
          received += chunk;
        });
        // The VM closes its end when it is destroyed; a reset then is expected.
        client.on('error', (err: NodeJS.ErrnoException) => assert.equal(err.code, 'ECONNRESET'));
        await once(client, 'connect');
        // The I/O thread accepts the client; then let the guest speak.
        await sleep(100);
        t.vm.memory.writeU64(KIT_DATA + 8, 1n);
        for (let i = 0; i < 200 && !received.includes('hello'); i++) await sleep(10);
        client.write('ping\n');
        for (let i = 0; i < 200 && !received.includes('PING'); i++) await sleep(10);
        client.end();
      },
    );
    assert.equal(received, 'hello from the guest\nPING\n');
  });
});
