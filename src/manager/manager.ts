// The manager: VM definitions in the store, one `kiln-vmm` process per running VM.
// VMM processes are started detached (their own session, console to a file), so they
// outlive the daemon; a VM's state is always derived from what is true now: is its VMM
// process alive (pid file + /proc, checked to be that VM's kiln-vmm), and what does
// its API say (Running / Paused). After a daemon crash and restart nothing is "unknown".
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KilnError } from '../errors.js';
import { buildInitramfs, buildMinimalKernel } from '../guestkit/build.js';
import { placeInCgroup, removeCgroup } from './cgroup.js';
import { Store, type VmSpec } from './store.js';

export type VmState = 'stopped' | 'starting' | 'running' | 'paused';

export interface VmStatus {
  readonly name: string;
  readonly state: VmState;
  readonly pid: number | null;
  readonly cpus: number;
  readonly memoryMiB: number;
}

const VMM_CLI = fileURLToPath(new URL('../vmm-cli.js', import.meta.url));

/** One JSON-over-HTTP call on a Unix socket (a VMM's API, or the daemon's). */
export function unixHttp(socket: string, method: string, path: string, body?: unknown, timeoutMs = 5000): Promise<{ status: number; body: unknown }> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, method, path, timeout: timeoutMs, headers: payload ? { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) } : {} }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text ? (JSON.parse(text) as unknown) : undefined }));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    if (payload) req.write(payload);
    req.end();
  });
}

export class Manager {
  constructor(
    readonly store: Store,
    private readonly progress: (line: string) => void = () => undefined,
  ) {}

  private pidOf(name: string): number | null {
    const file = join(this.store.runDir(name), 'vmm.pid');
    if (!existsSync(file)) return null;
    const pid = Number(readFileSync(file, 'utf8').trim());
    if (!Number.isInteger(pid) || pid <= 0) return null;
    // Alive, and that VM's kiln-vmm (not a recycled pid).
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const i = cmdline.indexOf('--id');
      return cmdline.some((a) => a.endsWith('vmm-cli.js')) && cmdline[i + 1] === name ? pid : null;
    } catch {
      // No /proc entry: the process is gone.
      return null;
    }
  }

  async status(spec: VmSpec): Promise<VmStatus> {
    const pid = this.pidOf(spec.name);
    let state: VmState = 'stopped';
    if (pid !== null) {
      state = 'starting';
      try {
        const info = await unixHttp(join(this.store.runDir(spec.name), 'api.sock'), 'GET', '/');
        const s = (info.body as { state?: string } | undefined)?.state;
        if (s === 'Running') state = 'running';
        else if (s === 'Paused') state = 'paused';
      } catch {
        // The API is not up yet (the process is starting): 'starting'.
      }
    }
    // A VM that ended by itself (the guest powered off) leaves an empty cgroup behind.
    if (pid === null) removeCgroup(spec.name);
    return { name: spec.name, state, pid, cpus: spec.cpus, memoryMiB: spec.memoryMiB };
  }

  async list(): Promise<{ vms: VmStatus[]; broken: Array<{ name: string; file: string; error: string }> }> {
    const { vms, broken } = this.store.list();
    return { vms: await Promise.all(vms.map((v) => this.status(v))), broken };
  }

  /** Refuses a start that would overcommit the host beyond the configured ratios. */
  private async checkLimits(spec: VmSpec): Promise<void> {
    const limits = this.store.limits();
    const { vms } = await this.list();
    const running = vms.filter((v) => v.state !== 'stopped' && v.name !== spec.name);
    const cpuCap = Math.floor(cpus().length * limits.cpuOvercommit);
    const memCapMiB = Math.floor((totalmem() / (1024 * 1024)) * limits.memoryOvercommit);
    const usedCpus = running.reduce((s, v) => s + v.cpus, 0);
    const usedMiB = running.reduce((s, v) => s + v.memoryMiB, 0);
    if (usedCpus + spec.cpus > cpuCap) throw new KilnError(`starting '${spec.name}' (${spec.cpus} vCPUs) would exceed the vCPU limit of ${cpuCap} (${cpus().length} host CPUs x ${limits.cpuOvercommit}); ${Math.max(0, cpuCap - usedCpus)} vCPUs are left`);
    if (usedMiB + spec.memoryMiB > memCapMiB) throw new KilnError(`starting '${spec.name}' (${spec.memoryMiB} MiB) would exceed the memory limit of ${memCapMiB} MiB (host RAM x ${limits.memoryOvercommit}); ${Math.max(0, memCapMiB - usedMiB)} MiB are left`);
  }

  /** The VM's definition as kiln-vmm's --config-file (Firecracker's JSON). */
  private async vmmConfig(spec: VmSpec): Promise<Record<string, unknown>> {
    let kernel = spec.kernel;
    let initrd = spec.initrd;
    if (!kernel) {
      kernel = (await buildMinimalKernel(this.progress)).vmlinux;
      initrd = (await buildInitramfs(this.progress)).path;
    }
    return {
      'boot-source': { kernel_image_path: kernel, ...(initrd ? { initrd_path: initrd } : {}), ...(spec.cmdline ? { boot_args: spec.cmdline } : {}) },
      'machine-config': { vcpu_count: spec.cpus, mem_size_mib: spec.memoryMiB },
      drives: spec.disks.map((d, i) => ({ drive_id: `disk${i}`, path_on_host: d.path, is_root_device: d.root ?? false, is_read_only: d.readOnly ?? false })),
      'network-interfaces': spec.nets.map((n, i) => ({ iface_id: `net${i}`, host_dev_name: n.tap, ...(n.mac ? { guest_mac: n.mac } : {}) })),
      ...(spec.rng ? { entropy: {} } : {}),
      ...(spec.vsock ? { vsock: { guest_cid: spec.vsock.guestCid, uds_path: spec.vsock.uds } } : {}),
      ...(spec.balloonMiB !== undefined ? { balloon: { amount_mib: spec.balloonMiB, deflate_on_oom: false, stats_polling_interval_s: 1 } } : {}),
    };
  }

  async start(name: string): Promise<VmStatus> {
    const spec = this.store.get(name);
    const current = await this.status(spec);
    if (current.state !== 'stopped') throw new KilnError(`'${name}' is already ${current.state}`);
    await this.checkLimits(spec);
    const run = this.store.runDir(name);
    mkdirSync(run, { recursive: true });
    const sock = join(run, 'api.sock');
    // A stale socket from a VMM that died.
    rmSync(sock, { force: true });
    writeFileSync(join(run, 'config.json'), JSON.stringify(await this.vmmConfig(spec), null, 2));
    const log = openSync(join(run, 'console.log'), 'a');
    const child = spawn(process.execPath, [VMM_CLI, '--api-sock', sock, '--config-file', join(run, 'config.json'), '--id', name, '--serial-sock', join(run, 'serial.sock')], {
      detached: true,
      stdio: ['ignore', log, log],
    });
    closeSync(log);
    const pid = child.pid!;
    child.unref();
    writeFileSync(join(run, 'vmm.pid'), `${pid}\n`);
    try {
      placeInCgroup(name, pid, { cpuWeight: spec.cpuWeight, cpuQuotaPercent: spec.cpuQuotaPercent, memoryBytes: spec.memoryMiB * 1024 * 1024 + 512 * 1024 * 1024 });
    } catch (err) {
      this.progress(`'${name}' runs without its cgroup limits: ${(err as Error).message}`);
    }
    if (spec.pinCpus.length > 0) void this.pinVcpus(name, pid, spec.pinCpus);
    for (let i = 0; i < 200; i++) {
      const s = await this.status(spec);
      if (s.state === 'running' || s.state === 'stopped') return s;
      await new Promise((r) => setTimeout(r, 50));
    }
    return this.status(spec);
  }

  /** Pins each `fc_vcpu N` thread to pinCpus[N % length] once the threads exist. */
  private async pinVcpus(name: string, pid: number, pinCpus: readonly number[]): Promise<void> {
    for (let i = 0; i < 100; i++) {
      const tasks = existsSync(`/proc/${pid}/task`) ? readdirSync(`/proc/${pid}/task`) : [];
      const vcpus = tasks.map((tid) => ({ tid, comm: readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim() })).filter((t) => t.comm.startsWith('fc_vcpu'));
      if (vcpus.length > 0) {
        for (const t of vcpus) {
          const index = Number(t.comm.split(' ')[1] ?? 0);
          spawn('taskset', ['-p', '-c', String(pinCpus[index % pinCpus.length]), t.tid], { stdio: 'ignore' });
        }
        return;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    this.progress(`'${name}': no vCPU threads appeared to pin`);
  }

  /** Graceful: the ACPI power button, then SIGTERM after `timeoutMs`; forced: SIGTERM at once. */
  async stop(name: string, force = false, timeoutMs = 30_000): Promise<VmStatus> {
    const spec = this.store.get(name);
    const pid = this.pidOf(name);
    if (pid === null) return this.status(spec);
    if (!force) {
      await unixHttp(join(this.store.runDir(name), 'api.sock'), 'PUT', '/actions', { action_type: 'SendCtrlAltDel' }).catch(() => undefined);
      for (let waited = 0; waited < timeoutMs && this.pidOf(name) !== null; waited += 100) await new Promise((r) => setTimeout(r, 100));
    }
    if (this.pidOf(name) !== null) process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 150 && this.pidOf(name) !== null; i++) await new Promise((r) => setTimeout(r, 100));
    if (this.pidOf(name) !== null) process.kill(pid, 'SIGKILL');
    removeCgroup(name);
    return this.status(spec);
  }

  async setPaused(name: string, paused: boolean): Promise<VmStatus> {
    const spec = this.store.get(name);
    if (this.pidOf(name) === null) throw new KilnError(`'${name}' is not running`);
    const r = await unixHttp(join(this.store.runDir(name), 'api.sock'), 'PATCH', '/vm', { state: paused ? 'Paused' : 'Resumed' });
    if (r.status !== 204) throw new KilnError(`'${name}': ${(r.body as { fault_message?: string } | undefined)?.fault_message ?? `status ${r.status}`}`);
    return this.status(spec);
  }

  async remove(name: string): Promise<void> {
    const spec = this.store.get(name);
    if ((await this.status(spec)).state !== 'stopped') throw new KilnError(`'${name}' is running; stop it first (kiln stop ${name})`);
    this.store.remove(name);
    removeCgroup(name);
  }

  /** The last `bytes` of the VM's console log (its scroll-back). */
  logs(name: string, bytes = 64 * 1024): string {
    this.store.get(name);
    const file = join(this.store.runDir(name), 'console.log');
    if (!existsSync(file)) return '';
    const size = statSync(file).size;
    const buf = Buffer.alloc(Math.min(bytes, size));
    const fd = openSync(file, 'r');
    try {
      readSync(fd, buf, 0, buf.length, size - buf.length);
    } finally {
      closeSync(fd);
    }
    return buf.toString('utf8');
  }
}
