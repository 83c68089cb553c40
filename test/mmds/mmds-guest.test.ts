// MMDS as a guest reaches it: a ring-3 driver on a virtio-net NIC with MMDS enabled asks
// ARP for 169.254.169.254, opens a TCP connection to its port 80 and sends an HTTP GET,
// then reads the answer; the NIC's host end (a socket pair standing in for passt) must
// see none of it. The store is changed by the host while the VM runs (PATCH), and the
// guest's second request sees the change.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import * as libc from '../../src/kvm/libc.js';
import * as layout from '../../src/layout.js';
import { MMDS_MAC } from '../../src/mmds/stack.js';
import { MmdsStore } from '../../src/mmds/store.js';
import { ipv4Number } from '../../src/platform/virtio.js';
import { kvmSkip } from '../helpers.js';
import { result, runDriver, virtioTestVm } from '../virtio/harness.js';

/**
 * The driver: ARP for MMDS, then for each of two requests a TCP connection from its own
 * port: SYN, the handshake's ACK with the request, and the answer's bytes (acknowledged
 * as they come) copied to ANSWER + 4096 * n until MMDS's FIN. RESULT(1) MMDS's MAC,
 * RESULT(2 + n) the answer's length. Between the requests it waits for the host's go
 * (RESULT(8) = 1).
 */
const MMDS_DRIVER = `
#define ANSWER (KIT_DATA + 1024)
static u8 mac[6];
static u8 mmds_mac[6];
static struct vq rx, tx;
static u64 bufs;
static void put16(u64 at, u16 v) { wr8(at, v >> 8); wr8(at + 1, v); }
static void put32(u64 at, u32 v) { put16(at, v >> 16); put16(at + 2, v); }
static u16 get16(u64 at) { return ((u16)rd8(at) << 8) | rd8(at + 1); }
static u32 get32(u64 at) { return ((u32)get16(at) << 16) | get16(at + 2); }
static void send(u64 f, u32 len) {
  struct vbuf b = { f, len, 0 };
  vq_add(&tx, &b, 1, 0); vq_kick(&tx);
  if (vq_wait(&tx, 0, 100000000) < 0) kit_exit(6);
}
/* The next received frame (after its virtio header), its buffer given back at the next call. */
static u64 last_buf = 0;
static u64 next_frame(u32 *len) {
  if (last_buf) { struct vbuf again = { last_buf, 2048, 1 }; vq_add(&rx, &again, 1, 0); vq_kick(&rx); }
  u32 l = 0;
  int id = vq_wait(&rx, &l, 200000000);
  if (id < 0) kit_exit(7);
  last_buf = vq_desc(&rx, (u16)id)->addr;
  *len = l - 12;
  return last_buf + 12;
}
static u64 ip_frame(u64 f, u16 port, u32 seq, u32 ack, u8 flags, const char *data, u32 n) {
  u64 e = f + 12;
  for (int i = 0; i < 6; i++) { wr8(e + i, mmds_mac[i]); wr8(e + 6 + i, mac[i]); }
  put16(e + 12, 0x0800);
  u64 ip = e + 14;
  wr8(ip, 0x45); put16(ip + 2, 40 + n); wr8(ip + 8, 64); wr8(ip + 9, 6);
  put32(ip + 12, GUEST_IP); put32(ip + 16, MMDS_IP);
  put16(ip + 10, 0);
  u32 sum = 0;
  for (int i = 0; i < 20; i += 2) sum += get16(ip + i);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  put16(ip + 10, ~sum);
  u64 t = ip + 20;
  put16(t, port); put16(t + 2, 80); put32(t + 4, seq); put32(t + 8, ack);
  wr8(t + 12, 5 << 4); wr8(t + 13, flags); put16(t + 14, 0xffff);
  for (u32 i = 0; i < n; i++) wr8(t + 20 + i, data[i]);
  return 12 + 14 + 40 + n;
}
static u32 http_get(int slot, u16 port, const char *req, u32 req_len) {
  u64 f = kit_alloc(2048);
  u32 seq = 1000;
  send(f, ip_frame(f, port, seq, 0, 0x02, 0, 0));
  u32 len; u64 got;
  for (;;) { got = next_frame(&len); if (get16(got + 12) == 0x0800 && (rd8(got + 14 + 20 + 13) & 0x12) == 0x12) break; }
  u32 theirs = get32(got + 14 + 20 + 4) + 1;
  seq++;
  send(f, ip_frame(f, port, seq, theirs, 0x18, req, req_len));
  seq += req_len;
  u32 at = 0;
  for (;;) {
    got = next_frame(&len);
    if (get16(got + 12) != 0x0800) continue;
    u64 ip = got + 14;
    u64 t = ip + 20;
    u32 total = get16(ip + 2);
    u32 off = (rd8(t + 12) >> 4) * 4;
    u32 n = total - 20 - off;
    u8 flags = rd8(t + 13);
    for (u32 i = 0; i < n && at < 4000; i++) wr8(ANSWER + 4096 * (u64)slot + at++, rd8(t + off + i));
    theirs += n;
    if (flags & 1) { theirs++; send(f, ip_frame(f, port, seq, theirs, 0x11, 0, 0)); break; }
    send(f, ip_frame(f, port, seq, theirs, 0x10, 0, 0));
  }
  return at;
}
void kit_main(void) {
  struct vdev d;
  if (vdev_find(&d, SLOT0)) kit_exit(3);
  if (!(vdev_negotiate(&d, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << 5)) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(4);
  if (vq_setup(&d, &rx, 0, 16, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &tx, 1, 16, VIRTIO_MSI_NO_VECTOR)) kit_exit(5);
  vdev_driver_ok(&d);
  for (int i = 0; i < 6; i++) mac[i] = rd8(d.device + i);
  bufs = kit_alloc(16 * 2048);
  for (int i = 0; i < 16; i++) { struct vbuf b = { bufs + 2048 * i, 2048, 1 }; vq_add(&rx, &b, 1, 0); }
  vq_kick(&rx);
  /* ARP: who has MMDS_IP? */
  u64 f = kit_alloc(128);
  u64 e = f + 12;
  for (int i = 0; i < 6; i++) { wr8(e + i, 0xff); wr8(e + 6 + i, mac[i]); }
  put16(e + 12, 0x0806);
  u64 a = e + 14;
  put16(a, 1); put16(a + 2, 0x0800); wr8(a + 4, 6); wr8(a + 5, 4); put16(a + 6, 1);
  for (int i = 0; i < 6; i++) wr8(a + 8 + i, mac[i]);
  put32(a + 14, GUEST_IP); put32(a + 24, MMDS_IP);
  send(f, 12 + 42);
  u32 len; u64 got;
  for (;;) { got = next_frame(&len); if (get16(got + 12) == 0x0806 && get16(got + 20) == 2) break; }
  u64 m = 0;
  for (int i = 0; i < 6; i++) { mmds_mac[i] = rd8(got + 22 + i); m = (m << 8) | mmds_mac[i]; }
  RESULT(1) = m;
  static const char first[] = "GET /latest/meta-data/ami-id HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nConnection: close\\r\\n\\r\\n";
  RESULT(2) = http_get(0, 40000, first, sizeof(first) - 1);
  long spins = 4000000000L;
  while (RESULT(8) != 1 && spins-- > 0) {}
  static const char second[] = "GET /latest/meta-data HTTP/1.1\\r\\nAccept: application/json\\r\\nConnection: close\\r\\n\\r\\n";
  RESULT(3) = http_get(1, 40001, second, sizeof(second) - 1);
  kit_exit(0);
}`;

describe('MMDS from a guest', { skip: kvmSkip }, () => {
  test('a ring-3 driver on a NIC with MMDS: ARP, TCP and HTTP GETs answered by the VMM, a PATCH seen by the next GET, nothing reaching the host end', async () => {
    const store = new MmdsStore();
    store.put({ latest: { 'meta-data': { 'ami-id': 'ami-12345678', 'reservation-id': 'r-1' } } });
    const pair = new Int32Array(2);
    assert.equal(libc.socketpair(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK, 0, pair), 0);
    const t = virtioTestVm(
      [
        {
          kind: 'net',
          options: {
            fd: pair[0]!,
            mac: '06:00:0a:4d:00:02',
            backend: 'passt',
            mmds: { store: store.shared, ipv4: ipv4Number('169.254.169.254'), version: 'V1', imdsCompat: false },
          },
        },
      ],
      undefined,
      (line) => process.stderr.write(`# vm: ${line}\n`),
    );
    t.vm.adoptFd(pair[0]!);
    const readAnswer = (n: number) =>
      Buffer.from(t.vm.memory.read(layout.KIT_DATA + 1024 + 4096 * n, Number(result(t, 2 + n)))).toString('latin1');
    await runDriver(
      t,
      MMDS_DRIVER,
      { GUEST_IP: ipv4Number('10.0.2.15'), MMDS_IP: ipv4Number('169.254.169.254') },
      (r) => {
        assert.equal(
          r.exitCode,
          0,
          `${r.detail} (driver status ${r.exitCode}; MMDS MAC ${result(t, 1).toString(16)}, answers ${result(t, 2)} and ${result(t, 3)} bytes)`,
        );
        assert.equal(result(t, 1), BigInt(`0x${MMDS_MAC.toString('hex')}`), 'ARP: MMDS is at its MAC');
        const first = readAnswer(0);
        assert.match(first, /^HTTP\/1\.1 200 OK\r\n/);
        assert.ok(first.endsWith('\r\n\r\nami-12345678'), first);
        const second = readAnswer(1);
        assert.match(second, /Content-Type: application\/json/);
        assert.deepEqual(JSON.parse(second.slice(second.indexOf('\r\n\r\n') + 4)), {
          'ami-id': 'ami-87654321',
          'reservation-id': 'r-1',
        });
        const leaked = Buffer.alloc(4096);
        assert.equal(libc.read(pair[1]!, leaked, leaked.length), -1, 'the host end got nothing (EAGAIN)');
      },
      async () => {
        for (let i = 0; i < 2000 && result(t, 2) === 0n; i++) await sleep(10);
        store.patch({ latest: { 'meta-data': { 'ami-id': 'ami-87654321' } } });
        t.vm.memory.writeU64(layout.KIT_DATA + 8 * 8, 1n);
      },
    );
    libc.close(pair[1]!);
  });
});
