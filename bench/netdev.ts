// `npm run bench -- netdev`: the virtio-net device's own path on a TAP, without a guest
// (so it runs without /dev/kvm), against a C program doing the host's own I/O on the same
// kind of TAP, in one run. The driver is test/virtio/fake-driver.ts in this process: it
// fills the rings, and only the device's work is timed (the backend handling a queue
// notification: walking the chains, the TAP's reads and writes, the used ring; the
// interrupt is a counter here, where a VMM makes a KVM_SIGNAL_MSI ioctl).
// - tx: 1514-byte frames, each a chain of two buffers (virtio_net_hdr, frame), 64 per
//   notification, written to the TAP; host: `net-host tx` writes the same frames.
// - rx: the TAP's queue is filled with frames by an AF_PACKET sender first; the device
//   then reads them into receive buffers (header, frame) 64 per notification; host:
//   `net-host drain` reads the same queue into one buffer, and `drain-spread` into
//   successive slots of an 8 MiB region, as the device fills a guest's buffers (on a
//   machine whose kernel is itself a PVM guest, the first kernel write to each user page
//   is expensive: host_rx_spread_ns shows how much of Kiln's rx figure that is).
// Like the net benchmark, it re-runs itself inside a network namespace it creates.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as libc from '../src/kvm/libc.js';
import { openTap, NET_RX_QUEUE, NET_TX_QUEUE, VIRTIO_NET_HDR_BYTES } from '../src/virtio/net.js';
import { FakeDevice } from '../test/virtio/fake-driver.js';
import { runInNetns, runNetHost, type NetCount } from './net-host.js';
import { median, type BenchContext } from './util.js';

const TAP = 'kbench0';
const FRAME = 1514;
const TX_FRAMES = 200_000;
/** Frames queued in the TAP before each drain (its queue is made longer than this). */
const RX_FRAMES = 4000;
const BATCH = 64;
const ROUNDS = 5;
const WAKES = 4000;
const AF_PACKET = 17;
const SOCK_RAW = 3;

/** A fresh TAP, up, with a queue long enough for RX_FRAMES; its fd (nonblocking). */
function freshTap(): number {
  const fd = openTap(TAP);
  execFileSync('ip', ['link', 'set', TAP, 'txqueuelen', String(2 * RX_FRAMES), 'up']);
  return fd;
}

function dropTap(fd: number, dev: FakeDevice | null): void {
  dev?.close();
  libc.close(fd);
}

function frame(): Buffer {
  const f = Buffer.alloc(FRAME);
  Buffer.from('020000000099020000000001', 'hex').copy(f);
  f.writeUInt16BE(0x0800, 12);
  for (let i = 14; i < FRAME; i++) f[i] = i & 0xff;
  return f;
}

/** Kiln's device writing TX_FRAMES frames to the TAP: the ns spent in its notification handler. */
function kilnTx(hugePages: boolean): NetCount {
  const fd = freshTap();
  const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } }, { hugePages });
  // A running guest's RAM is resident: its first-touch faults are not the device's cost.
  dev.mem.regionBytes(0).fill(0);
  try {
    const hdr = Buffer.alloc(VIRTIO_NET_HDR_BYTES);
    const f = frame();
    let ns = 0n;
    let frames = 0;
    while (frames < TX_FRAMES) {
      for (let i = 0; i < BATCH; i++) dev.offer(NET_TX_QUEUE, [{ read: hdr }, { read: f }]);
      const t0 = process.hrtime.bigint();
      dev.notify(NET_TX_QUEUE);
      ns += process.hrtime.bigint() - t0;
      frames += dev.used(NET_TX_QUEUE).length;
    }
    if (dev.logged.length) throw new Error(`the device logged: ${dev.logged.join('; ')}`);
    return { frames, bytes: frames * FRAME, ns: Number(ns) };
  } finally {
    dropTap(fd, dev);
  }
}

/** Kiln's device draining a full TAP queue into receive buffers. */
async function kilnRx(exe: string, hugePages: boolean): Promise<{ got: NetCount; queued: number }> {
  const fd = freshTap();
  const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } }, { hugePages });
  // A running guest's RAM is resident: its first-touch faults are not the device's cost.
  dev.mem.regionBytes(0).fill(0);
  try {
    const sent = await runNetHost(exe, ['send', TAP, String(RX_FRAMES)], null);
    let ns = 0n;
    let frames = 0;
    let bytes = 0;
    for (;;) {
      for (let i = 0; i < BATCH; i++) dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, { write: FRAME + 64 }]);
      const t0 = process.hrtime.bigint();
      dev.notify(NET_RX_QUEUE);
      ns += process.hrtime.bigint() - t0;
      const used = dev.used(NET_RX_QUEUE);
      frames += used.length;
      for (const u of used) bytes += u.len - VIRTIO_NET_HDR_BYTES;
      if (used.length < BATCH) break;
    }
    if (dev.logged.length) throw new Error(`the device logged: ${dev.logged.join('; ')}`);
    return { got: { frames, bytes, ns: Number(ns) }, queued: sent.frames };
  } finally {
    dropTap(fd, dev);
  }
}

/**
 * Light traffic: `perWake` frames reach the TAP (from an AF_PACKET socket on it), then the
 * device is woken; ns per wake-up, over WAKES wake-ups (what a request-response guest sees).
 */
function kilnWake(perWake: number): number {
  const fd = freshTap();
  const dev = new FakeDevice({ kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } });
  const sock = libc.socket(AF_PACKET, libc.SOCK_CLOEXEC | SOCK_RAW, 0);
  try {
    const addr = Buffer.alloc(20); // struct sockaddr_ll
    addr.writeUInt16LE(AF_PACKET, 0);
    addr.writeInt32LE(Number(readFileSync(`/sys/class/net/${TAP}/ifindex`, 'utf8')), 4);
    if (sock < 0 || libc.bind(sock, addr, addr.length) < 0)
      throw new Error(`AF_PACKET socket: ${libc.errnoName(libc.errno())}`);
    const f = frame();
    for (let i = 0; i < 64; i++) dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, { write: FRAME + 64 }]);
    let ns = 0n;
    let frames = 0;
    for (let w = 0; w < WAKES; w++) {
      for (let k = 0; k < perWake; k++) libc.write(sock, f, f.length);
      const t0 = process.hrtime.bigint();
      dev.notify(NET_RX_QUEUE);
      ns += process.hrtime.bigint() - t0;
      const used = dev.used(NET_RX_QUEUE).length;
      frames += used;
      for (let i = 0; i < used; i++) dev.offer(NET_RX_QUEUE, [{ write: VIRTIO_NET_HDR_BYTES }, { write: FRAME + 64 }]);
    }
    if (frames < WAKES * perWake * 0.9) throw new Error(`${WAKES * perWake} frames sent, ${frames} received`);
    return Number(ns) / WAKES;
  } finally {
    if (sock >= 0) libc.close(sock);
    dropTap(fd, dev);
  }
}

async function child(dir: string): Promise<void> {
  const exe = join(dir, 'net-host');
  execFileSync('gcc', ['-O2', '-o', exe, fileURLToPath(new URL('../../bench/c/net-host.c', import.meta.url))]);
  execFileSync('ip', ['link', 'set', 'lo', 'up']);
  const gbps = (c: NetCount) => (c.bytes * 8) / c.ns;
  const perFrame = (c: NetCount) => c.ns / c.frames;
  const series = () => ({ kiln: [] as number[], thp: [] as number[], host: [] as number[] });
  const spreadNs: number[] = [];
  const wake1: number[] = [];
  const wake4: number[] = [];
  const tx = series();
  const rx = series();
  const txNs = series();
  const rxNs = series();
  for (let r = 0; r < ROUNDS; r++) {
    const k = kilnTx(false);
    const kh = kilnTx(true);
    let fd = freshTap();
    const h = await runNetHost(exe, ['tx', String(TX_FRAMES)], fd);
    dropTap(fd, null);
    for (const [key, c] of [
      ['kiln', k],
      ['thp', kh],
      ['host', h],
    ] as const) {
      tx[key].push(gbps(c));
      txNs[key].push(perFrame(c));
    }

    const { got: kr, queued } = await kilnRx(exe, false);
    const { got: krh } = await kilnRx(exe, true);
    fd = freshTap();
    await runNetHost(exe, ['send', TAP, String(RX_FRAMES)], null);
    const hr = await runNetHost(exe, ['drain'], fd);
    dropTap(fd, null);
    fd = freshTap();
    await runNetHost(exe, ['send', TAP, String(RX_FRAMES)], null);
    const hs = await runNetHost(exe, ['drain-spread'], fd);
    dropTap(fd, null);
    spreadNs.push(perFrame(hs));
    wake1.push(kilnWake(1));
    wake4.push(kilnWake(4));
    for (const [key, c] of [
      ['kiln', kr],
      ['thp', krh],
      ['host', hr],
    ] as const) {
      rx[key].push(gbps(c));
      rxNs[key].push(perFrame(c));
    }
    const ns = (c: NetCount) => perFrame(c).toFixed(0);
    process.stdout.write(
      `round ${r + 1}: tx ns/frame: kiln ${ns(k)}, with THP ${ns(kh)}, host ${ns(h)}; ` +
        `rx ns/frame: kiln ${ns(kr)}, with THP ${ns(krh)} (${kr.frames} of ${queued} queued), host ${ns(hr)} (${hr.frames}), host spread ${ns(hs)}; ` +
        `ns a wake-up with 1 frame ${wake1.at(-1)!.toFixed(0)}, with 4 ${wake4.at(-1)!.toFixed(0)}\n`,
    );
  }
  const ratio = (x: { kiln: number[]; thp: number[]; host: number[] }, key: 'kiln' | 'thp') =>
    (median(x[key]) / median(x.host)).toFixed(3);
  const f = (x: number[]) => median(x).toFixed(0);
  process.stdout.write(
    `netdev tx_ratio=${ratio(tx, 'kiln')} rx_ratio=${ratio(rx, 'kiln')} rx_ratio_spread=${(median(spreadNs) / median(rxNs.kiln)).toFixed(3)} tx_ratio_thp=${ratio(tx, 'thp')} rx_ratio_thp=${ratio(rx, 'thp')} ` +
      `tx_ns=${f(txNs.kiln)} rx_ns=${f(rxNs.kiln)} tx_ns_thp=${f(txNs.thp)} rx_ns_thp=${f(rxNs.thp)} host_tx_ns=${f(txNs.host)} host_rx_ns=${f(rxNs.host)} host_rx_spread_ns=${f(spreadNs)} wake1_ns=${f(wake1)} wake4_ns=${f(wake4)}\n`,
  );
}

export async function benchNetdev(ctx: BenchContext): Promise<void> {
  const lines = await runInNetns(`kiln-bench-netdev-${process.pid}`, fileURLToPath(import.meta.url), ctx.dir);
  lines.slice(0, -1).forEach((l) => ctx.log(l));
  ctx.result(lines.at(-1)!);
}

if (process.argv[2] === 'child') await child(process.argv[3]!);
