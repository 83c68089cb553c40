// Driving a kiln-vmm process as an orchestrator does: its API socket and its serial
// console (a Unix socket), for tests and benchmarks that run a guest through it.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { unixHttp } from '../src/manager/manager.js';

const VMM = fileURLToPath(new URL('../src/vmm-cli.cjs', import.meta.url));

export interface RunningVmm {
  child: ChildProcess;
  api: string;
  console: Socket;
  output: () => string;
  exited: Promise<number | null>;
}

export async function startVmm(
  dir: string,
  name: string,
  /** `memoryFd`: a guest memory file the VMM inherits as fd 3 (a live upgrade's destination). */
  opts: { memoryFd?: number } = {},
): Promise<RunningVmm> {
  const api = join(dir, `${name}.api`);
  const serial = join(dir, `${name}.serial`);
  const child = spawn(process.execPath, [VMM, '--api-sock', api, '--serial-sock', serial, '--id', name], {
    stdio: ['ignore', 'ignore', 'pipe', ...(opts.memoryFd !== undefined ? [opts.memoryFd] : [])],
  });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
  for (let i = 0; i < 400 && !(existsSync(api) && existsSync(serial)); i++) await sleep(25);
  assert.ok(existsSync(api), `kiln-vmm ${name} serves its API: ${stderr}`);
  const console = createConnection(serial);
  let out = '';
  console.setEncoding('utf8').on('data', (c: string) => (out += c));
  await new Promise<void>((resolve, reject) => console.once('connect', resolve).once('error', reject));
  return { child, api, console, output: () => out + stderr, exited };
}

export async function put(api: string, path: string, body: unknown, method = 'PUT'): Promise<void> {
  const r = await unixHttp(api, method, path, body, 60_000);
  assert.equal(r.status, 204, `${method} ${path}: ${JSON.stringify(r.body)}`);
}

/** Shell that sets $c to the count a guest loop keeps writing to /tmp/count (never the empty file between its truncation and its write). */
export const READ_COUNT = 'c=; while [ -z "$c" ]; do c=$(cat /tmp/count); done;';

/** Types `command` until `answer` appears in the output (the shell may still be starting). */
export async function ask(
  vmm: RunningVmm,
  command: string,
  answer: RegExp,
  seconds: number,
  /** How long to wait for the answer before typing again (a busy guest answers slowly; each retry queues). */
  everyMs = 5000,
): Promise<string> {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    vmm.console.write(`${command}\n`);
    for (let i = 0; i < everyMs / 250; i++) {
      const m = answer.exec(vmm.output());
      if (m) return m[0];
      await sleep(250);
    }
  }
  assert.fail(`no ${answer} within ${seconds} s; the console ended with:\n${vmm.output().slice(-2000)}`);
}

/**
 * Boots the kit's Linux with a shell (`kiln.shell`, 1 vCPU) in a fresh kiln-vmm until the
 * shell answers on its console; resolves with the milliseconds from InstanceStart to that.
 */
export async function bootShell(
  vmm: RunningVmm,
  guest: {
    kernel: string;
    initrd: string;
    memoryMiB: number;
    entropy?: boolean;
    /** Read-only data disks (vda, vdb, ... in this order). */
    disks?: ReadonlyArray<{ id: string; path: string }>;
    nets?: ReadonlyArray<{ id: string; tap: string; mac: string }>;
    /** Guest RAM in a shared memory file (machine-config shared_memory), which a live upgrade hands over. */
    sharedMemory?: boolean;
  },
  seconds: number,
): Promise<number> {
  await put(vmm.api, '/boot-source', {
    kernel_image_path: guest.kernel,
    initrd_path: guest.initrd,
    boot_args: 'kiln.shell',
  });
  await put(vmm.api, '/machine-config', {
    vcpu_count: 1,
    mem_size_mib: guest.memoryMiB,
    ...(guest.sharedMemory ? { shared_memory: true } : {}),
  });
  if (guest.entropy) await put(vmm.api, '/entropy', {});
  for (const d of guest.disks ?? [])
    await put(vmm.api, `/drives/${d.id}`, {
      drive_id: d.id,
      path_on_host: d.path,
      is_root_device: false,
      is_read_only: true,
    });
  for (const n of guest.nets ?? [])
    await put(vmm.api, `/network-interfaces/${n.id}`, { iface_id: n.id, host_dev_name: n.tap, guest_mac: n.mac });
  const t0 = performance.now();
  await put(vmm.api, '/actions', { action_type: 'InstanceStart' });
  await ask(vmm, 'echo booted-$((6*7))', /booted-42/, seconds);
  return performance.now() - t0;
}

/** Pauses the VM and takes a Full snapshot; resolves with the milliseconds the create took. */
export async function pauseAndSnapshot(vmm: RunningVmm, state: string, memory: string): Promise<number> {
  await put(vmm.api, '/vm', { state: 'Paused' }, 'PATCH');
  const t0 = performance.now();
  await put(vmm.api, '/snapshot/create', { snapshot_path: state, mem_file_path: memory, snapshot_type: 'Full' });
  return performance.now() - t0;
}
