// `npm run bench -- launch`: how fast a VMM gets a guest running and how much it costs,
// Kiln against QEMU in the same run.
//
// The guests are the smallest that show their first instruction: Kiln boots a 1-page
// PVH kernel whose entry writes 'K' to the serial port; QEMU (-M microvm, the CPU model
// this host's KVM accepts) runs a 64 KiB firmware whose reset vector does the same. The
// clock stops when that byte reaches the VMM's standard output.
//
// - cold: from spawning `kiln-vmm --config-file` (the bin as a user runs it) to the byte;
// - pool: a kiln-vmm started ahead and waiting for its API (as the daemon's pool keeps
//   them), from the first configuration request to the byte;
// - pool_restore: the same waiting kiln-vmm given PUT /snapshot/load (resume_vm) of the
//   idle guest: until its vCPU runs again (kiln-vmm's own "snapshot loaded in" figure;
//   the request's round trip is logged beside it);
// - overhead: resident memory of a running 1-vCPU VM with virtio devices (a disk, entropy,
//   vsock) less its guest RAM;
// - pss_10vm: proportional set size per VM with 10 such VMMs running, and QEMU's with 10
//   of its own running the idle firmware.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { ensurePackages } from '../src/guestkit/build.js';
import { vmmEnvironment } from '../src/host.js';
import { unixHttp } from '../src/manager/manager.js';
import { pvhKernel, SAY_K, THEN_EXIT, THEN_IDLE } from '../src/guest/pvh-kernel.js';
import { median, overheadMiB, pssMiB, type BenchContext } from './util.js';

const RUNS = 10;
const MEMORY_MIB = 128;
const VMM = fileURLToPath(new URL('../src/vmm-cli.cjs', import.meta.url));
const QEMU = '/usr/bin/qemu-system-x86_64';

// Real mode at the reset vector: mov dx,0x3f8; mov al,'K'; out dx,al; then isa-debug-exit or cli; hlt.
const QEMU_SAY_K = [0xba, 0xf8, 0x03, 0xb0, 0x4b, 0xee];
const QEMU_EXIT = [0xb0, 0x00, 0xe6, 0xf4, 0xf4];
const QEMU_IDLE = [0xfa, 0xf4, 0xeb, 0xfd];

/** QEMU's firmware: 64 KiB of hlt with `code` at the reset vector (offset 0xfff0). */
function qemuFirmware(code: readonly number[]): Uint8Array {
  const image = new Uint8Array(0x1_0000).fill(0xf4);
  image.set(code, 0xfff0);
  return image;
}

interface Launched {
  child: ChildProcess;
  /** Resolves with performance.now() when 'K' first appears on the child's stdout. */
  said: Promise<number>;
  exited: Promise<number | null>;
  output: () => string;
}

function launch(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Launched {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  let out = '';
  const said = new Promise<number>((resolve, reject) => {
    child.stdout!.on('data', (c: Buffer) => {
      if (c.includes(0x4b)) resolve(performance.now());
      out += c.toString('latin1');
    });
    child.once('exit', (code) => reject(new Error(`${cmd} exited with ${code} before the guest ran: ${out}`)));
  });
  said.catch(() => {});
  child.stderr!.on('data', (c: Buffer) => (out += c.toString('latin1')));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
  return { child, said, exited, output: () => out };
}

async function stop(l: Launched): Promise<void> {
  if (l.child.exitCode === null && l.child.signalCode === null) l.child.kill('SIGKILL');
  await l.exited;
}

async function waitForSocket(path: string, l: Launched): Promise<void> {
  for (let i = 0; i < 400 && !existsSync(path); i++) await sleep(10);
  if (!existsSync(path)) throw new Error(`kiln-vmm did not serve ${path}: ${l.output()}`);
}

/**
 * A kiln-vmm waiting for its API as the daemon's pool keeps them: started, given a second
 * to get ready, and asked GET / (as the pool asks before it hands one out).
 */
async function waitingVmm(sock: string): Promise<{ sock: string; l: Launched }> {
  const l = launch(VMM, ['--api-sock', sock], vmmEnvironment());
  try {
    await waitForSocket(sock, l);
    await sleep(1000);
    await unixHttp(sock, 'GET', '/');
  } catch (err) {
    await stop(l);
    throw err;
  }
  return { sock, l };
}

async function put(api: string, path: string, body: unknown): Promise<void> {
  const r = await unixHttp(api, 'PUT', path, body, 60_000);
  if (r.status !== 204) throw new Error(`PUT ${path}: ${r.status} ${JSON.stringify(r.body)}`);
}

export async function benchLaunch(ctx: BenchContext): Promise<void> {
  ensurePackages(['qemu-system-x86'], 'the launch benchmark', ctx.log);
  const exitKernel = join(ctx.dir, 'exit.elf');
  const idleKernel = join(ctx.dir, 'idle.elf');
  writeFileSync(exitKernel, pvhKernel([...SAY_K, ...THEN_EXIT]));
  writeFileSync(idleKernel, pvhKernel([...SAY_K, ...THEN_IDLE]));
  const disk = join(ctx.dir, 'disk.img');
  writeFileSync(disk, Buffer.alloc(1 << 20));
  const firmwareExit = join(ctx.dir, 'exit.rom');
  const firmwareIdle = join(ctx.dir, 'idle.rom');
  writeFileSync(firmwareExit, qemuFirmware([...QEMU_SAY_K, ...QEMU_EXIT]));
  writeFileSync(firmwareIdle, qemuFirmware([...QEMU_SAY_K, ...QEMU_IDLE]));
  const config = (kernel: string, devices: boolean, i: number) => ({
    'boot-source': { kernel_image_path: kernel },
    'machine-config': { vcpu_count: 1, mem_size_mib: MEMORY_MIB },
    ...(devices
      ? {
          drives: [{ drive_id: 'root', path_on_host: disk, is_root_device: false, is_read_only: true }],
          entropy: {},
          vsock: { guest_cid: 3, uds_path: join(ctx.dir, `v-${i}.sock`) },
        }
      : {}),
  });
  const configFile = (name: string, kernel: string, devices: boolean, i = 0) => {
    const path = join(ctx.dir, `${name}.json`);
    writeFileSync(path, JSON.stringify(config(kernel, devices, i)));
    return path;
  };
  const api = (name: string) => join(ctx.dir, `${name}.api`);

  // Cold: spawn to the guest's first byte.
  const exitConfig = configFile('exit', exitKernel, false);
  const cold: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t0 = performance.now();
    const l = launch(VMM, ['--api-sock', api(`cold-${i}`), '--config-file', exitConfig], vmmEnvironment());
    cold.push((await l.said) - t0);
    await l.exited;
  }
  const qemuArgs = (firmware: string) => [
    '-M',
    'microvm',
    '-enable-kvm',
    '-cpu',
    'host,-arch-capabilities',
    '-m',
    String(MEMORY_MIB),
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-serial',
    'stdio',
    '-bios',
    firmware,
    '-device',
    'isa-debug-exit,iobase=0xf4,iosize=4',
  ];
  const qemu: number[] = [];
  for (let i = 0; i < RUNS && existsSync(QEMU); i++) {
    const t0 = performance.now();
    const l = launch(QEMU, qemuArgs(firmwareExit));
    qemu.push((await l.said) - t0);
    await l.exited;
  }
  ctx.log(
    `cold start to the guest's first byte (median of ${RUNS}): kiln-vmm ${median(cold).toFixed(1)} ms, QEMU ${qemu.length ? median(qemu).toFixed(1) : 'n/a'} ms`,
  );

  // From a waiting kiln-vmm: configuration + InstanceStart to the first byte.
  const pool: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const { sock, l } = await waitingVmm(api(`pool-${i}`));
    try {
      const t0 = performance.now();
      await put(sock, '/boot-source', { kernel_image_path: exitKernel });
      await put(sock, '/machine-config', { vcpu_count: 1, mem_size_mib: MEMORY_MIB });
      await put(sock, '/actions', { action_type: 'InstanceStart' });
      pool.push((await l.said) - t0);
    } finally {
      await stop(l);
    }
  }
  ctx.log(`from a waiting kiln-vmm, configuration to the guest's first byte: ${median(pool).toFixed(1)} ms`);

  // A snapshot of the idle guest, then loads into waiting kiln-vmm processes.
  const snapState = join(ctx.dir, 'idle.snap');
  const snapMem = join(ctx.dir, 'idle.mem');
  {
    const sock = api('snap');
    const l = launch(
      VMM,
      ['--api-sock', sock, '--config-file', configFile('idle', idleKernel, true, 99)],
      vmmEnvironment(),
    );
    try {
      await l.said;
      await waitForSocket(sock, l);
      const r = await unixHttp(sock, 'PATCH', '/vm', { state: 'Paused' }, 60_000);
      if (r.status !== 204) throw new Error(`pause: ${JSON.stringify(r.body)}`);
      await put(sock, '/snapshot/create', { snapshot_path: snapState, mem_file_path: snapMem, snapshot_type: 'Full' });
    } finally {
      await stop(l);
    }
  }
  const restore: number[] = [];
  const trips: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const { sock, l } = await waitingVmm(api(`restore-${i}`));
    try {
      const t0 = performance.now();
      await put(sock, '/snapshot/load', {
        snapshot_path: snapState,
        mem_backend: { backend_type: 'File', backend_path: snapMem },
        resume_vm: true,
        // The vsock socket of the snapshotted VM is in use by nobody now; give this one its own.
        vsock_override: { uds_path: join(ctx.dir, `vr-${i}.sock`) },
      });
      trips.push(performance.now() - t0);
      const own = /snapshot loaded: .* in ([\d.]+) ms/.exec(l.output());
      if (!own) throw new Error(`kiln-vmm did not log its load time: ${l.output()}`);
      restore.push(Number(own[1]));
    } finally {
      await stop(l);
    }
  }
  ctx.log(
    `snapshot load into a waiting kiln-vmm to a running vCPU: ${median(restore).toFixed(1)} ms (request round trip ${median(trips).toFixed(1)} ms)`,
  );

  // Footprint: 10 idle guests with virtio devices at once, then 10 QEMU.
  const running: Launched[] = [];
  let overhead: number;
  let pss: number;
  let qemuPss = 0;
  try {
    for (let i = 0; i < 10; i++) {
      const l = launch(
        VMM,
        ['--api-sock', api(`fp-${i}`), '--config-file', configFile(`fp-${i}`, idleKernel, true, i)],
        vmmEnvironment(),
      );
      running.push(l);
      await l.said;
    }
    await sleep(2000);
    overhead = overheadMiB(running[0]!.child.pid!, MEMORY_MIB) ?? NaN;
    pss = running.reduce((n, l) => n + (pssMiB(l.child.pid!) ?? NaN), 0) / running.length;
  } finally {
    await Promise.all(running.splice(0).map(stop));
  }
  if (existsSync(QEMU)) {
    try {
      for (let i = 0; i < 10; i++) {
        const l = launch(QEMU, qemuArgs(firmwareIdle));
        running.push(l);
        await l.said;
      }
      await sleep(2000);
      qemuPss = running.reduce((n, l) => n + (pssMiB(l.child.pid!) ?? NaN), 0) / running.length;
    } finally {
      await Promise.all(running.splice(0).map(stop));
    }
  }
  ctx.log(
    `a running 1-vCPU VM with a disk, entropy and vsock: ${overhead.toFixed(1)} MiB besides guest RAM; PSS with 10 running: Kiln ${pss.toFixed(1)} MiB, QEMU ${qemuPss.toFixed(1)} MiB each`,
  );
  const f = (v: number) => (Number.isFinite(v) ? v.toFixed(1) : 'failed');
  ctx.result(
    `launch cold_ms=${f(median(cold))} pool_ms=${f(median(pool))} pool_restore_ms=${f(median(restore))} overhead_mib=${f(overhead)} pss_10vm_mib=${f(pss)} qemu_ms=${qemu.length ? f(median(qemu)) : 'failed'} qemu_pss_mib=${qemuPss ? f(qemuPss) : 'failed'}`,
  );
}
