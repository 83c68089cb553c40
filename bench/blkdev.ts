// `npm run bench -- blkdev`: the virtio-blk device's own path on a disk image, without a
// guest (so it runs without /dev/kvm), against the host's own one-thread pread/pwrite
// (bench/c/blk-host.c) on the same file, in one run. The driver is
// test/virtio/fake-driver.ts in this process: it fills the ring, and only the device's
// work is timed (the backend handling a queue notification: walking the chains, the
// file's reads and writes, the status bytes, the used ring).
// - rand4k: 4 KiB reads at random 4 KiB-aligned offsets, 64 per notification.
// - seqread / seqwrite: 128 KiB requests in 32 segments of 4 KiB (a Linux driver's
//   shape for guest pages that are not contiguous), 32 per notification.
// The image lives in the page cache (read once before timing), as a hot disk does; what
// is measured is the path's cost, not the storage's. The host runs twice: into one hot
// buffer, and (`_spread`) into successive slots of an 8 MiB region, as the device fills
// a guest's buffers (fresh pages cost the kernel much more on some machines: see the
// netdev bench).
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { blkOptions, SECTOR_BYTES, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from '../src/virtio/blk.js';
import { IoRing } from '../src/virtio/uring.js';
import { FakeDevice } from '../test/virtio/fake-driver.js';
import { median, type BenchContext } from './util.js';

const IMAGE_BYTES = 64 << 20;
const ROUNDS = 5;
const RAND_REQUESTS = 64_000;
const SEQ_REQUESTS = 4_000;
const SEQ_BYTES = 128 << 10;
const SEGMENT = 4096;

type Mode = 'rand4k' | 'seqread' | 'seqwrite';

function header(type: number, sector: number): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeBigUInt64LE(BigInt(sector), 8);
  return h;
}

/** Kiln's device: ns per request, over `requests` requests of `mode`. */
function kiln(path: string, mode: Mode): number {
  const fd = openSync(path, 'r+');
  const dev = new FakeDevice({ kind: 'blk', options: blkOptions(fd, path, false, 'bench', false) });
  // A running guest's RAM is resident: its first-touch faults are not the device's cost.
  dev.mem.regionBytes(0).fill(0);
  const requests = mode === 'rand4k' ? RAND_REQUESTS : SEQ_REQUESTS;
  const perTurn = mode === 'rand4k' ? 64 : 32;
  const blocks = mode === 'rand4k' ? IMAGE_BYTES / 4096 : IMAGE_BYTES / SEQ_BYTES;
  const data = Buffer.alloc(SEQ_BYTES, 0x5a);
  let x = 0x9e3779b9;
  let ns = 0n;
  let done = 0;
  try {
    while (done < requests) {
      for (let i = 0; i < perTurn; i++) {
        const n = done + i;
        if (mode === 'rand4k') {
          x ^= x << 13;
          x ^= x >>> 17;
          x ^= x << 5;
          const sector = ((x >>> 0) % blocks) * (4096 / SECTOR_BYTES);
          dev.offer(0, [{ read: header(VIRTIO_BLK_T_IN, sector) }, { write: 4096 }, { write: 1 }]);
        } else {
          const sector = (n % blocks) * (SEQ_BYTES / SECTOR_BYTES);
          const pieces = Array.from({ length: SEQ_BYTES / SEGMENT }, (_, k) =>
            mode === 'seqread' ? { write: SEGMENT } : { read: data.subarray(k * SEGMENT, (k + 1) * SEGMENT) },
          );
          dev.offer(0, [
            { read: header(mode === 'seqread' ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT, sector) },
            ...pieces,
            { write: 1 },
          ]);
        }
      }
      const t0 = process.hrtime.bigint();
      dev.notify(0);
      ns += process.hrtime.bigint() - t0;
      const used = dev.used(0).length;
      if (used !== perTurn) throw new Error(`${perTurn} requests offered, ${used} returned`);
      done += used;
    }
    if (dev.logged.length) throw new Error(`the device logged: ${dev.logged.join('; ')}`);
    return Number(ns) / done;
  } finally {
    dev.close();
    closeSync(fd);
  }
}

/** The host's own: blk-host, the same request size, one request per call. */
function host(exe: string, path: string, mode: Mode, spread: boolean): Promise<number> {
  const [op, req, count] =
    mode === 'rand4k'
      ? ['randread', 4096, RAND_REQUESTS]
      : [mode === 'seqread' ? 'read' : 'write', SEQ_BYTES, SEQ_REQUESTS];
  return new Promise((resolve, reject) => {
    const args = [op, path, String(req), String(req * count), ...(spread ? ['spread'] : [])];
    const child = spawn(exe, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.on('error', reject);
    child.on('exit', (code) => {
      const m = /ns=(\d+) requests=(\d+)/.exec(out);
      if (code !== 0 || !m) return reject(new Error(`blk-host ${op} exited ${code}: ${out}`));
      resolve(Number(m[1]) / Number(m[2]));
    });
  });
}

export async function benchBlkdev(ctx: BenchContext): Promise<void> {
  const exe = join(ctx.dir, 'blk-host');
  execFileSync('gcc', ['-O2', '-o', exe, fileURLToPath(new URL('../../bench/c/blk-host.c', import.meta.url))]);
  const path = join(ctx.dir, 'disk.img');
  writeFileSync(path, Buffer.alloc(IMAGE_BYTES, 0x11));
  readFileSync(path); // into the page cache
  const ring = IoRing.open(2, 1);
  ctx.log(`io_uring: ${ring ? 'yes (requests of one drain go in one submit)' : 'no (one call per request)'}`);
  ring?.close();
  const modes: Mode[] = ['rand4k', 'seqread', 'seqwrite'];
  const k: Record<Mode, number[]> = { rand4k: [], seqread: [], seqwrite: [] };
  const h: Record<Mode, number[]> = { rand4k: [], seqread: [], seqwrite: [] };
  const hs: Record<Mode, number[]> = { rand4k: [], seqread: [], seqwrite: [] };
  for (let r = 0; r < ROUNDS; r++) {
    const parts: string[] = [];
    for (const mode of modes) {
      k[mode].push(kiln(path, mode));
      h[mode].push(await host(exe, path, mode, false));
      hs[mode].push(await host(exe, path, mode, true));
      const last = (x: number[]) => x.at(-1)!.toFixed(0);
      parts.push(`${mode} kiln ${last(k[mode])} host ${last(h[mode])} spread ${last(hs[mode])}`);
    }
    ctx.log(`round ${r + 1}: ns/request: ${parts.join('; ')}`);
  }
  const ratio = (mode: Mode) => (median(h[mode]) / median(k[mode])).toFixed(3);
  const spread = (mode: Mode) => (median(hs[mode]) / median(k[mode])).toFixed(3);
  const ns = (x: number[]) => median(x).toFixed(0);
  ctx.result(
    `blkdev rand4k_ratio=${ratio('rand4k')} seq_read_ratio=${ratio('seqread')} seq_write_ratio=${ratio('seqwrite')} ` +
      `rand4k_ns=${ns(k.rand4k)} seq_read_ns=${ns(k.seqread)} seq_write_ns=${ns(k.seqwrite)} ` +
      `host_rand4k_ns=${ns(h.rand4k)} host_seq_read_ns=${ns(h.seqread)} host_seq_write_ns=${ns(h.seqwrite)} ` +
      `rand4k_ratio_spread=${spread('rand4k')} seq_read_ratio_spread=${spread('seqread')} seq_write_ratio_spread=${spread('seqwrite')}`,
  );
}
