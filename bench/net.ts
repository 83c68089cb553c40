// `npm run bench -- net`: virtio-net throughput seen by a guest driver against the host's
// own on the same TAP, in one run. Everything happens inside a network namespace the
// benchmark creates (it re-runs itself there), so no host interface or address is touched.
// - tx: the guest (guests/bench/net.c) sends 1514-byte frames through Kiln to the TAP;
//   the host's own: a C program (bench/c/net-host.c) writes the same frames to a TAP fd.
//   Frames go to a MAC nobody has, so the kernel drops them early on both sides.
// - rx: the same C program sends frames into the TAP's interface with an AF_PACKET
//   socket as fast as it can; the receiver is the guest (through Kiln) or a C reader on
//   the TAP's fd. Throughput is bytes received over the sender's time, so a receiver that
//   falls behind loses frames (the TAP queue overflows) and scores lower.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadProgram } from '../src/guest/kit.js';
import { DEBUG_EXIT_MMIO_BASE, DEBUG_EXIT_MMIO_SIZE, KIT_DATA, MiB } from '../src/layout.js';
import { pciIntxGsi } from '../src/layout.js';
import { attachPciHost } from '../src/platform/pci.js';
import { openNet } from '../src/platform/virtio.js';
import { addVirtioPciDevice } from '../src/platform/virtio.js';
import { Vm } from '../src/vm.js';
import { runInNetns, runNetHost, type NetCount } from './net-host.js';
import { median, type BenchContext } from './util.js';

const TAP = 'kbench0';
const FRAMES = 200_000;
const ROUNDS = 3;
const DRIVER = readFileSync(fileURLToPath(new URL('../../guests/bench/net.c', import.meta.url)), 'utf8');

function openUpTap(): number {
  const { fd } = openNet({ tap: TAP, mac: '06:00:00:00:00:01' }, 0);
  execFileSync('ip', ['link', 'set', TAP, 'up']);
  return fd;
}

async function guest(
  mode: 0 | 1,
  during: (vm: Vm) => Promise<NetCount | null>,
): Promise<{ frames: number; bytes: number; runMs: number; sender: NetCount | null }> {
  const vm = Vm.create({ memoryBytes: 64 * MiB, vcpus: 1, irqchip: true });
  try {
    const fd = openUpTap();
    vm.adoptFd(fd);
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
      id: 'net',
      slot,
      intxGsi: pciIntxGsi(slot),
      device: { kind: 'net', options: { fd, mac: '06:00:00:00:00:01', backend: 'tap' } },
    });
    loadProgram(vm, {
      mode: 'long64',
      cpl: 3,
      source: 'call kit_main\nud2',
      c: [DRIVER],
      defines: { SLOT0: slot, MODE: mode, FRAMES },
    });
    await vm.start();
    const sender = await during(vm);
    const result = await vm.wait();
    if (result.exitCode !== 0) throw new Error(`net guest ended badly: ${result.detail}`);
    return {
      frames: Number(vm.memory.readU64(KIT_DATA)),
      bytes: Number(vm.memory.readU64(KIT_DATA + 8)),
      runMs: result.vcpus[0]!.runMs,
      sender,
    };
  } finally {
    await vm.destroy();
  }
}

/** The part that runs inside the namespace. */
async function child(dir: string): Promise<void> {
  const exe = join(dir, 'net-host');
  execFileSync('gcc', ['-O2', '-o', exe, fileURLToPath(new URL('../../bench/c/net-host.c', import.meta.url))]);
  execFileSync('ip', ['link', 'set', 'lo', 'up']);
  const gbps = (bytes: number, ns: number) => (bytes * 8) / ns;
  const txGuest: number[] = [];
  const txHost: number[] = [];
  const rxGuest: number[] = [];
  const rxHost: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const fd = openUpTap();
    const h = await runNetHost(exe, ['tx', String(FRAMES)], fd);
    execFileSync('ip', ['link', 'del', TAP]);
    txHost.push(gbps(h.bytes, h.ns));
    const g = await guest(0, async () => null);
    txGuest.push(gbps(g.bytes, g.runMs * 1e6));

    const rfd = openUpTap();
    const reader = runNetHost(exe, ['read', '300'], rfd);
    const sent = await runNetHost(exe, ['send', TAP, String(FRAMES)], null);
    const got = await reader;
    execFileSync('ip', ['link', 'del', TAP]);
    rxHost.push(gbps(got.bytes, sent.ns));
    const gr = await guest(1, async (vm) => {
      while (vm.memory.readU64(KIT_DATA + 72) !== 1n) await new Promise((res) => setTimeout(res, 5));
      return runNetHost(exe, ['send', TAP, String(FRAMES)], null);
    });
    rxGuest.push(gbps(gr.bytes, gr.sender!.ns));
    process.stdout.write(
      `round ${r + 1}: tx guest ${txGuest[r]!.toFixed(2)} Gbit/s (${g.frames} frames) host ${txHost[r]!.toFixed(2)}; rx guest ${rxGuest[r]!.toFixed(2)} Gbit/s (${gr.frames} of ${gr.sender!.frames} frames) host ${rxHost[r]!.toFixed(2)} (${got.frames} frames)\n`,
    );
  }
  process.stdout.write(
    `net tx_ratio=${(median(txGuest) / median(txHost)).toFixed(3)} rx_ratio=${(median(rxGuest) / median(rxHost)).toFixed(3)}\n`,
  );
}

export async function benchNet(ctx: BenchContext): Promise<void> {
  const lines = await runInNetns(`kiln-bench-${process.pid}`, fileURLToPath(import.meta.url), ctx.dir);
  lines.slice(0, -1).forEach((l) => ctx.log(l));
  ctx.log("qemu: not run (QEMU 7.2 aborts on this host's KVM, see the boot benchmark)");
  ctx.result(lines.at(-1)!);
}

if (process.argv[2] === 'child') await child(process.argv[3]!);
