// `npm run bench -- blk`: virtio-blk throughput and IOPS seen by a guest driver, next
// to the host's own throughput on the same file in the same run.
// - Guest: the ring-3 driver in guests/bench/blk.c keeps 8 requests in flight through
//   the whole Kiln path (ioeventfd kick, I/O thread, pread/pwrite into guest memory,
//   used ring). Time is the vCPU's run time (KVM_RUN entry to guest exit).
// - Host: bench/c/blk-host.c, pread/pwrite on the same file with the same request size
//   and total, timed inside the process; page cache warm for both.
// QEMU cannot run here (it aborts on this host's KVM, see the boot benchmark).
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadProgram } from '../src/guest/kit.js';
import { DEBUG_EXIT_MMIO_BASE, DEBUG_EXIT_MMIO_SIZE, KIT_DATA, MiB } from '../src/layout.js';
import { pciIntxGsi } from '../src/layout.js';
import { attachPciHost } from '../src/platform/pci.js';
import { blkOptions } from '../src/virtio/blk.js';
import { addVirtioPciDevice } from '../src/platform/virtio.js';
import { Vm } from '../src/vm.js';
import { median, type BenchContext } from './util.js';

const DISK_BYTES = 256 * MiB;
const DRIVER = readFileSync(fileURLToPath(new URL('../../guests/bench/blk.c', import.meta.url)), 'utf8');

export interface Run {
  readonly seconds: number;
  readonly requests: number;
}

/** One guest run: `requests` requests of `reqBytes` (op 0 reads, 1 writes), 8 in flight; `limiter`: the drive's rate limiter cells. */
export async function guestRun(
  path: string,
  op: 0 | 1,
  reqBytes: number,
  requests: number,
  random: boolean,
  limiter?: SharedArrayBuffer,
): Promise<Run> {
  const vm = Vm.create({ memoryBytes: 64 * MiB, vcpus: 1, irqchip: true });
  const fd = openSync(path, 'r+');
  vm.adoptFd(fd);
  try {
    vm.addDevice({
      id: 'exit',
      kind: 'debug-exit',
      bus: 'mmio',
      base: DEBUG_EXIT_MMIO_BASE,
      size: DEBUG_EXIT_MMIO_SIZE,
    });
    const pci = attachPciHost(vm);
    const slot = pci.takeSlot();
    addVirtioPciDevice(vm, pci.root, pci.bars, {
      id: 'disk',
      slot,
      intxGsi: pciIntxGsi(slot),
      device: {
        kind: 'blk',
        options: { ...blkOptions(fd, path, false, 'bench'), ...(limiter ? { limiter } : {}) },
      },
    });
    loadProgram(vm, {
      mode: 'long64',
      cpl: 3,
      source: 'call kit_main\nud2',
      c: [DRIVER],
      defines: {
        SLOT0: slot,
        OP: op,
        REQ_BYTES: reqBytes,
        REQUESTS: requests,
        DISK_BYTES,
        RANDOM: random ? 1 : 0,
        QD: Number(process.env.KILN_BENCH_QD ?? 8),
      },
    });
    await vm.start();
    const result = await vm.wait();
    if (result.exitCode !== 0) throw new Error(`blk guest ended badly: ${result.detail}`);
    const done = Number(vm.memory.readU64(KIT_DATA));
    return { seconds: result.vcpus[0]!.runMs / 1000, requests: done };
  } finally {
    await vm.destroy();
  }
}

/** The host's own: bench/c/blk-host.c, the same request size and total, timed inside the process. */
function hostRun(
  exe: string,
  path: string,
  mode: 'read' | 'write' | 'randread',
  reqBytes: number,
  total: number,
): { seconds: number; requests: number } {
  const out = execFileSync(exe, [mode, path, String(reqBytes), String(total)], { encoding: 'utf8' });
  const m = /bytes=(\d+) ns=(\d+) requests=(\d+)/.exec(out);
  if (!m) throw new Error(`blk-host printed: ${out}`);
  return { seconds: Number(m[2]) / 1e9, requests: Number(m[3]) };
}

export async function benchBlk(ctx: BenchContext): Promise<void> {
  const path = join(ctx.dir, 'disk.img');
  const chunk = Buffer.alloc(MiB, 0xa5);
  const fd = openSync(path, 'w');
  for (let i = 0; i < DISK_BYTES / MiB; i++) writeFileSync(fd, chunk);
  closeSync(fd);
  const exe = join(ctx.dir, 'blk-host');
  execFileSync('gcc', ['-O2', '-o', exe, fileURLToPath(new URL('../../bench/c/blk-host.c', import.meta.url))]);
  hostRun(exe, path, 'read', MiB, DISK_BYTES); // warm the page cache

  const ROUNDS = 3;
  const seqRequests = (4 * DISK_BYTES) / MiB; // 1 GiB in 1 MiB requests
  const mbps = (bytes: number, s: number) => bytes / MiB / s;
  const guestRead: number[] = [];
  const hostRead: number[] = [];
  const guestWrite: number[] = [];
  const hostWrite: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const g = await guestRun(path, 0, MiB, seqRequests, false);
    guestRead.push(mbps(g.requests * MiB, g.seconds));
    hostRead.push(mbps(seqRequests * MiB, hostRun(exe, path, 'read', MiB, seqRequests * MiB).seconds));
    const w = await guestRun(path, 1, MiB, seqRequests, false);
    guestWrite.push(mbps(w.requests * MiB, w.seconds));
    hostWrite.push(mbps(seqRequests * MiB, hostRun(exe, path, 'write', MiB, seqRequests * MiB).seconds));
    ctx.log(
      `round ${r + 1}: read guest ${guestRead[r]!.toFixed(0)} MiB/s host ${hostRead[r]!.toFixed(0)} MiB/s; write guest ${guestWrite[r]!.toFixed(0)} MiB/s host ${hostWrite[r]!.toFixed(0)} MiB/s`,
    );
  }
  const randRequests = 50_000;
  const iops: number[] = [];
  const hostIops: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const g = await guestRun(path, 0, 4096, randRequests, true);
    iops.push(g.requests / g.seconds);
    const h = hostRun(exe, path, 'randread', 4096, randRequests * 4096);
    hostIops.push(h.requests / h.seconds);
  }
  ctx.log(
    `rand 4k read: guest ${iops.map((v) => v.toFixed(0)).join(', ')} IOPS (queue depth 8); host (one thread, pread) ${hostIops.map((v) => v.toFixed(0)).join(', ')} IOPS`,
  );
  const readRatio = median(guestRead) / median(hostRead);
  const writeRatio = median(guestWrite) / median(hostWrite);
  ctx.log(
    `median: read guest ${median(guestRead).toFixed(0)} / host ${median(hostRead).toFixed(0)} MiB/s; write guest ${median(guestWrite).toFixed(0)} / host ${median(hostWrite).toFixed(0)} MiB/s; qemu: not run (QEMU 7.2 aborts on this host's KVM)`,
  );
  ctx.result(
    `blk seq_read_ratio=${readRatio.toFixed(3)} seq_write_ratio=${writeRatio.toFixed(3)} rand4k_read_iops=${median(iops).toFixed(0)}`,
  );
}
