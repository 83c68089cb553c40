// virtio-net end to end: a ring-3 guest driver sends an ARP request and must get the
// reply from a real network stack: through a TAP moved into a network namespace the
// test creates (the namespace's kernel answers), and through passt running in its own
// namespace (passt answers for its gateway). Nothing outside those namespaces is touched.
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, test } from 'node:test';
import { openNet } from '../../src/platform/virtio.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';
import { result, runDriver, virtioTestVm } from './harness.js';

const canNetns = process.getuid?.() === 0 && existsSync('/dev/net/tun') && toolAvailable('ip', '-V');
const netSkip =
  kvmSkip || (canNetns ? false : 'needs root, /dev/net/tun and iproute2 (ip) to create a network namespace');
const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });

/** The driver: post receive buffers, send "who has TARGET? tell SOURCE", wait for the reply. */
const ARP_DRIVER = `
static void put_ip(u64 at, u32 ip) { wr8(at, ip >> 24); wr8(at + 1, ip >> 16); wr8(at + 2, ip >> 8); wr8(at + 3, ip); }
void kit_main(void) {
  struct vdev d; struct vq rx, tx;
  if (vdev_find(&d, SLOT0)) kit_exit(3);
  if (!(vdev_negotiate(&d, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << 5) | (1ULL << 16)) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(4);
  if (vq_setup(&d, &rx, 0, 16, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &tx, 1, 16, VIRTIO_MSI_NO_VECTOR)) kit_exit(5);
  vdev_driver_ok(&d);
  u8 mac[6];
  for (int i = 0; i < 6; i++) mac[i] = rd8(d.device + i);
  RESULT(0) = rd16(d.device + 6); /* link status */
  u64 bufs = kit_alloc(8 * 2048);
  for (int i = 0; i < 8; i++) { struct vbuf b = { bufs + 2048 * i, 2048, 1 }; vq_add(&rx, &b, 1, 0); }
  vq_kick(&rx);
  for (int attempt = 0; attempt < 20; attempt++) {
    u64 f = kit_alloc(128);
    u64 e = f + 12; /* after the virtio_net_hdr */
    for (int i = 0; i < 6; i++) { wr8(e + i, 0xff); wr8(e + 6 + i, mac[i]); }
    wr8(e + 12, 0x08); wr8(e + 13, 0x06);
    u64 a = e + 14;
    wr8(a, 0); wr8(a + 1, 1); wr8(a + 2, 8); wr8(a + 3, 0); wr8(a + 4, 6); wr8(a + 5, 4); wr8(a + 6, 0); wr8(a + 7, 1);
    for (int i = 0; i < 6; i++) { wr8(a + 8 + i, mac[i]); wr8(a + 18 + i, 0); }
    put_ip(a + 14, SOURCE_IP); put_ip(a + 24, TARGET_IP);
    struct vbuf b = { f, 12 + 42, 0 };
    vq_add(&tx, &b, 1, 0); vq_kick(&tx);
    if (vq_wait(&tx, 0, 100000000) < 0) kit_exit(6);
    /* Wait for an ARP reply from TARGET. */
    for (int tries = 0; tries < 8; tries++) {
      u32 len = 0;
      int id = vq_wait(&rx, &len, 50000000);
      if (id < 0) break;
      u64 got = bufs + 2048 * (u64)(id % 8) + 12;
      if (len >= 12 + 42 && rd8(got + 12) == 0x08 && rd8(got + 13) == 0x06 && rd8(got + 21) == 2) {
        u64 sha = 0;
        for (int i = 0; i < 6; i++) sha = (sha << 8) | rd8(got + 22 + i);
        RESULT(1) = sha;
        RESULT(2) = ((u32)rd8(got + 28) << 24) | ((u32)rd8(got + 29) << 16) | ((u32)rd8(got + 30) << 8) | rd8(got + 31);
        RESULT(3) = len;
#ifdef WAIT_LINK_DOWN
        /* The host now stops the backend: the link must go down, announced by a new config generation. */
        u8 gen = rd8(d.common + VCOMMON_CFGGEN);
        RESULT(4) = 1;
        long spins = 2000000000L;
        while ((rd16(d.device + 6) & 1) && spins-- > 0) {}
        RESULT(5) = rd16(d.device + 6);
        RESULT(6) = rd8(d.common + VCOMMON_CFGGEN) != gen;
#endif
        kit_exit(0);
      }
      struct vbuf again = { bufs + 2048 * (u64)(id % 8), 2048, 1 };
      vq_add(&rx, &again, 1, 0); vq_kick(&rx);
    }
  }
  kit_exit(7);
}`;

const ipNum = (s: string) => s.split('.').reduce((a, b) => a * 256 + Number(b), 0);
const macNum = (s: string) => BigInt(`0x${s.replace(/:/g, '')}`);

describe('virtio-net', { skip: netSkip }, () => {
  test('through a TAP in a network namespace: the namespace kernel answers the guest ARP request', async () => {
    const ns = `kiln-t${process.pid}`;
    const tap = `ktap${process.pid % 100000}`;
    ip('netns', 'add', ns);
    after(() => ip('netns', 'del', ns));
    const opened = openNet({ tap, mac: '06:00:0a:4d:00:02' }, 0);
    // The TAP exists now (in this namespace, without addresses); move it into the test's own.
    ip('link', 'set', tap, 'netns', ns);
    ip('-n', ns, 'addr', 'add', '10.77.0.1/24', 'dev', tap);
    ip('-n', ns, 'link', 'set', tap, 'up');
    const tapMac = /link\/ether ([0-9a-f:]{17})/.exec(ip('-n', ns, 'link', 'show', tap))![1]!;
    const t = virtioTestVm([{ kind: 'net', options: opened.options }]);
    t.vm.adoptFd(opened.fd);
    await runDriver(t, ARP_DRIVER, { SOURCE_IP: ipNum('10.77.0.2'), TARGET_IP: ipNum('10.77.0.1') }, (r) => {
      assert.equal(r.exitCode, 0, `${r.detail} (driver status ${r.exitCode})`);
      assert.equal(result(t, 0), 1n, 'link up');
      assert.equal(result(t, 1), macNum(tapMac), "the reply comes from the TAP's MAC");
      assert.equal(Number(result(t, 2)), ipNum('10.77.0.1'));
      // The namespace learned the guest's MAC from its request (the TAP goes when the VM does).
      assert.match(ip('-n', ns, 'neigh', 'show', 'dev', tap), /10\.77\.0\.2 lladdr 06:00:0a:4d:00:02/);
    });
  });

  test(
    'through passt over its Unix socket: passt answers for its gateway; when passt dies the link goes down',
    { skip: toolAvailable('passt', '--version') ? false : 'needs passt (apt-get install passt)' },
    async () => {
      const ns = `kiln-p${process.pid}`;
      ip('netns', 'add', ns);
      after(() => ip('netns', 'del', ns));
      // passt mirrors the namespace's own address and default route to the guest.
      ip('-n', ns, 'link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1');
      ip('-n', ns, 'addr', 'add', '10.88.0.5/24', 'dev', 'v0');
      ip('-n', ns, 'link', 'set', 'v0', 'up');
      ip('-n', ns, 'link', 'set', 'v1', 'up');
      ip('-n', ns, 'route', 'add', 'default', 'via', '10.88.0.1');
      // passt drops to nobody, so its socket lives in a directory everyone may write.
      const parent = tempDir();
      chmodSync(parent, 0o711);
      const dir = join(parent, 'passt');
      mkdirSync(dir, { mode: 0o777 });
      chmodSync(dir, 0o777);
      const sock = join(dir, 'passt.sock');
      const passt: ChildProcess = spawn(
        'ip',
        ['netns', 'exec', ns, 'passt', '--foreground', '--socket', sock, '--quiet'],
        { stdio: 'ignore' },
      );
      after(() => passt.kill('SIGKILL'));
      for (let i = 0; i < 100 && !existsSync(sock); i++) await sleep(50);
      const opened = openNet({ passt: sock, mac: '06:00:0a:58:00:05' }, 0);
      const t = virtioTestVm([{ kind: 'net', options: opened.options }]);
      t.vm.adoptFd(opened.fd);
      await runDriver(
        t,
        ARP_DRIVER,
        { SOURCE_IP: ipNum('10.88.0.5'), TARGET_IP: ipNum('10.88.0.1'), WAIT_LINK_DOWN: 1 },
        (r) => {
          assert.equal(r.exitCode, 0, `${r.detail} (driver status ${r.exitCode})`);
          assert.equal(result(t, 0), 1n, 'link up');
          assert.equal(Number(result(t, 2)), ipNum('10.88.0.1'), 'the gateway answered');
          assert.equal(result(t, 5), 0n, 'link down after passt died');
          assert.equal(result(t, 6), 1n, 'configuration generation changed');
        },
        async () => {
          for (let i = 0; i < 400 && result(t, 4) !== 1n; i++) await sleep(25);
          passt.kill('SIGKILL');
        },
      );
    },
  );
});
