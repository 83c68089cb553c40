// The manager: VM definitions in the store, one `kiln-vmm` process per running VM.
// VMM processes are started detached (their own session, console to a file), so they
// outlive the daemon; a VM's state is always derived from what is true now: is its VMM
// process alive (pid file + /proc, checked to be that VM's kiln-vmm), and what does
// its API say (Running / Paused). After a daemon crash and restart nothing is "unknown".
import {
  chmodSync,
  chownSync,
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  readSync,
  renameSync,
  rmSync,
  rmdirSync,
  statSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { request } from 'node:http';
import { cpus, totalmem } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { KilnError } from '../errors.js';
import { KILN_VMM } from '../host.js';
import { openGuestMemoryOf } from '../memory/shared-memory.js';
import { randomBytes } from 'node:crypto';
import { createConnection, createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseVmConfig } from '../config/vm-config.js';
import { parsePeer, peerCall, peerStream, splice } from './peer.js';
import { KILN_VERSION } from '../version.js';
import { buildInitramfs, buildMinimalKernel } from '../guestkit/build.js';
import { cgroupDirs, prepareCgroup, removeCgroup, spawnInCgroup } from './cgroup.js';
import { parseDefinition, vmConfigOf, type VmDefinition } from './definition.js';
import { TMP_MARK } from '../atomic-file.js';
import {
  buildChainMemory,
  checkTag,
  copyDisk,
  defaultTag,
  listSnapshots,
  MEMORY_FILE,
  moveFile,
  readSnapshot,
  removeSnapshotDir,
  sizeOnDisk,
  snapshotChain,
  snapshotExists,
  STATE_FILE,
  writeMeta,
  type SnapshotMeta,
} from './snapshots.js';
import { checkStartable } from './preflight.js';
import {
  allocateJailUid,
  NOT_JAILED,
  prepareJail,
  readJailRecord,
  JAIL_NEW_SNAPSHOT,
  JAIL_SNAPSHOT_MEMORY,
  JAIL_SNAPSHOT_STATE,
  JAIL_VSOCK,
  isKilnVmm,
  removeSocketLinks,
  returnLentFiles,
  unmountAll,
  writeJailRecord,
  type JailRecord,
} from './jail.js';
import { markInUse, type VmmPool } from './pool.js';
import type { VmConfig } from '../config/vm-config.js';
import type { InfoReply, ListReply, StartReply, UpgradeReply, VmState, VmStatus } from './protocol.js';
import { PRIVATE_DIR, PRIVATE_FILE, type Limits, type Store } from './store.js';
import { waitFor } from './wait.js';

export type { VmState, VmStatus } from './protocol.js';

/** Memory the VMM process itself may use beyond the guest's RAM (its Node heap, buffers). */
const VMM_OVERHEAD_BYTES = 512 * 1024 * 1024;
/** How long a start may take to reach 'running' (the VM is built before the API says so). */
const START_TIMEOUT_MS = 60_000;

/** Asks the daemon to stream progress lines before its answer (PROGRESS_TYPE, one JSON object a line). */
export const PROGRESS_HEADER = 'x-kiln-progress';
export const PROGRESS_TYPE = 'application/x-ndjson';

/**
 * One JSON-over-HTTP call on a Unix socket (a VMM's API, or the daemon's). With `onProgress`, a daemon that streams (a long
 * verb: snapshot, restore, clone, merge) answers with lines: `{"progress"}` as it goes,
 * then `{"status", "body"}`, which is what this resolves with.
 */
export function unixHttp(
  socket: string,
  method: string,
  path: string,
  body?: unknown,
  timeoutMs = 5000,
  onProgress?: (line: string) => void,
): Promise<{ status: number; body: unknown }> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath: socket,
        // A connection of its own each time: a kept-alive one would go on reaching the
        // process that was at this path before (a VMM replaced by kiln upgrade).
        agent: false,
        method,
        path,
        timeout: timeoutMs,
        headers: {
          ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) } : {}),
          ...(onProgress ? { [PROGRESS_HEADER]: '1' } : {}),
        },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        const streamed = onProgress !== undefined && res.headers['content-type'] === PROGRESS_TYPE;
        let final: { status: number; body: unknown } | null = null;
        const line = (l: string) => {
          if (l.trim() === '') return;
          const m = JSON.parse(l) as { progress?: string; status?: number; body?: unknown };
          if (typeof m.progress === 'string') onProgress!(m.progress);
          else final = { status: m.status ?? 0, body: m.body };
        };
        res.on('data', (c: string) => {
          text += c;
          if (!streamed) return;
          for (let nl = text.indexOf('\n'); nl >= 0; nl = text.indexOf('\n')) {
            line(text.slice(0, nl));
            text = text.slice(nl + 1);
          }
        });
        res.on('end', () => {
          try {
            if (!streamed)
              return resolve({ status: res.statusCode ?? 0, body: text ? (JSON.parse(text) as unknown) : undefined });
            line(text);
            if (final === null) reject(new Error('the daemon ended its answer early'));
            else resolve(final);
          } catch (err) {
            reject(err as Error);
          }
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    if (payload) req.write(payload);
    req.end();
  });
}

/** A console log past this is rotated (the daemon checks every ROTATE_EVERY_MS). */
export const MAX_CONSOLE_LOG_BYTES = 16 * 1024 * 1024;
export const ROTATE_EVERY_MS = 10_000;

/** The last `bytes` of a file (empty if it is not there). */
function tail(file: string, bytes: number): Buffer {
  if (bytes <= 0 || !existsSync(file)) return Buffer.alloc(0);
  const size = statSync(file).size;
  const buf = Buffer.alloc(Math.min(bytes, size));
  const fd = openSync(file, 'r');
  try {
    readSync(fd, buf, 0, buf.length, size - buf.length);
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** A line of progress of a long verb. */
type Progress = (line: string) => void;

/** A snapshot a start loads instead of booting (kiln restore, kiln clone). */
interface RestoreSource {
  /** The configuration the VMM runs (host paths). */
  readonly config: VmConfig;
  readonly state: string;
  readonly memory: string;
  /** Disk path the VMM opens -> the file bound there (a clone's copies). */
  readonly diskSources: ReadonlyMap<string, string>;
  /** Track dirty pages from the load on (a restore: its next diff builds on the snapshot). */
  readonly trackDirtyPages?: boolean;
}

/** An incoming migration (kiln daemon --listen): the VMM waits for its source. */
interface IncomingSource {
  /** The configuration the source's VMM runs (host paths). */
  readonly config: VmConfig;
  /** The token the source's VMM proves (one per migration, made by this daemon). */
  readonly receiveToken: string;
  /** drive_id -> the copy made here (kiln migrate --copy-disks). */
  readonly diskOverrides?: ReadonlyMap<string, string>;
}

/** How long an incoming migration's VMM waits for its source. */
const INCOMING_WAIT_MS = 120_000;

/** Where a VMM (jailed or not) listens for an incoming migration, and where the daemon reaches it. */
const JAIL_MIGRATE_IN = '/run/migrate-in.sock';
const JAIL_MIGRATE_OUT = '/run/migrate-out.sock';

/**
 * A Unix socket at `path` (the jail user's when `uid` is given) whose every connection
 * is piped to a new connection from `connect`: how a jailed VMM's migration stream
 * leaves its jail.
 */
async function relayFrom(
  path: string,
  uid: number | null,
  connect: () => Promise<Socket>,
  say: (line: string) => void,
): Promise<NetServer> {
  rmSync(path, { force: true });
  const server = createNetServer((inside) => {
    connect().then(
      (other) => splice(inside, other),
      (err: Error) => {
        say(err.message);
        inside.destroy();
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, resolve);
  });
  if (uid !== null) chownSync(path, uid, uid);
  return server;
}

/** Whether a jail record still holds something of the host's (files, TAPs, links). */
function holdsAnything(record: JailRecord | null): record is JailRecord {
  return (
    record !== null &&
    Boolean(record.lent?.length || record.taps.length || record.links?.length || record.mounts?.length)
  );
}

/** NIC `n` on `own`'s host end (its TAP or its passt socket) instead of its own. */
function withHostEnd<N extends { tap?: string; passt?: string }>(n: N, own: { tap?: string; passt?: string }): N {
  const { tap: _tap, passt: _passt, ...rest } = n;
  return { ...rest, ...(own.tap !== undefined ? { tap: own.tap } : { passt: own.passt! }) } as N;
}

/** A VMM API error's fault message (or its status). */
function faultOf(r: { status: number; body: unknown }): string {
  return (r.body as { fault_message?: string } | undefined)?.fault_message ?? `status ${r.status}`;
}

/** The host's capacity under the overcommit limits, and what the VMs that are not stopped take of it. */
export function hostCapacity(limits: Limits, vms: readonly VmStatus[]) {
  const running = vms.filter((v) => v.state !== 'stopped');
  const hostCpus = cpus().length;
  const memoryMiB = Math.floor(totalmem() / (1024 * 1024));
  return {
    cpus: hostCpus,
    memoryMiB,
    cpuOvercommit: limits.cpuOvercommit,
    memoryOvercommit: limits.memoryOvercommit,
    vcpuLimit: Math.floor(hostCpus * limits.cpuOvercommit),
    memoryLimitMiB: Math.floor(memoryMiB * limits.memoryOvercommit),
    vcpusUsed: running.reduce((n, v) => n + v.cpus, 0),
    memoryUsedMiB: running.reduce((n, v) => n + v.memoryMiB, 0),
  };
}

export class Manager {
  /** The daemon's pool of pre-started VMMs (pool.ts), when it keeps one. */
  pool: VmmPool | null = null;

  constructor(
    readonly store: Store,
    private readonly progress: (line: string) => void = () => undefined,
  ) {}

  private pidOf(name: string): number | null {
    const file = join(this.store.runDir(name), 'vmm.pid');
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch {
      // No pid file (or not a file): no VMM of ours.
      return null;
    }
    const pid = Number(text.trim());
    if (!Number.isInteger(pid) || pid <= 0) return null;
    // Alive, and that VM's kiln-vmm (not a recycled pid); one from the pool keeps its pool id.
    const id = readJailRecord(this.store.runDir(name))?.vmmId ?? name;
    try {
      return isKilnVmm(pid, id) ? pid : null;
    } catch {
      // No /proc entry: the process is gone.
      return null;
    }
  }

  /** Checks a definition as create does, storing nothing (the dashboard's form, as it is filled in). */
  check(input: unknown): VmDefinition {
    const spec = parseDefinition(input);
    checkStartable(spec);
    return spec;
  }

  /** Defines a VM (kiln create, the dashboard's form): checked, startable on this host, stored. */
  async create(input: unknown): Promise<VmStatus> {
    const spec = this.check(input);
    this.store.create(spec);
    return this.status(spec);
  }

  /** What is true of VM `spec` now. Reads only: a query never changes anything. */
  async status(spec: VmDefinition): Promise<VmStatus> {
    const pid = this.pidOf(spec.name);
    let state: VmState = 'stopped';
    let startedAt: string | null = null;
    if (pid !== null) {
      state = 'starting';
      try {
        startedAt = statSync(join(this.store.runDir(spec.name), 'vmm.pid')).mtime.toISOString();
        const info = await unixHttp(join(this.store.runDir(spec.name), 'api.sock'), 'GET', '/');
        const s = (info.body as { state?: string } | undefined)?.state;
        if (s === 'Running') state = 'running';
        else if (s === 'Paused') state = 'paused';
      } catch {
        // The API is not up yet (the process is starting): 'starting'.
      }
    }
    return { name: spec.name, state, pid, cpus: spec.cpus, memoryMiB: spec.memoryMiB, startedAt };
  }

  async list(): Promise<ListReply> {
    const { vms, broken } = this.store.list();
    return { vms: await Promise.all(vms.map((v) => this.status(v))), broken };
  }

  async info(name: string): Promise<InfoReply> {
    const definition = this.store.get(name);
    return {
      ...(await this.status(definition)),
      definition,
      cgroup: {
        dirs: cgroupDirs(name),
        cpuWeight: definition.cpuWeight,
        cpuQuotaPercent: definition.cpuQuotaPercent,
        memoryLimitBytes: definition.memoryMiB * 1024 * 1024 + VMM_OVERHEAD_BYTES,
      },
      consoleLog: join(this.store.runDir(name), 'console.log'),
      jail: readJailRecord(this.store.runDir(name)),
      snapshots: listSnapshots(this.snapshotsDir(name)).map((s) => s.tag),
    };
  }

  /**
   * What a start checks before it builds or spawns anything (the definition's files, the
   * host's limits): `kiln start` asks first, so a refused start does not wait for the
   * default guest's build.
   */
  async preflight(name: string): Promise<{ ok: true }> {
    const spec = this.store.get(name);
    if (this.pidOf(name) === null) {
      checkStartable(spec);
      await this.checkLimits(spec);
    }
    return { ok: true };
  }

  /** Refuses a start that would overcommit the host beyond the configured ratios. */
  private async checkLimits(spec: VmDefinition): Promise<void> {
    const limits = this.store.limits();
    const { vms } = await this.list();
    const {
      vcpuLimit: cpuCap,
      memoryLimitMiB: memCapMiB,
      vcpusUsed: usedCpus,
      memoryUsedMiB: usedMiB,
    } = hostCapacity(
      limits,
      vms.filter((v) => v.name !== spec.name),
    );
    if (usedCpus + spec.cpus > cpuCap)
      throw new KilnError(
        `starting '${spec.name}' (${spec.cpus} vCPUs) would exceed the vCPU limit of ${cpuCap} (${cpus().length} host CPUs x ${limits.cpuOvercommit}); ${Math.max(0, cpuCap - usedCpus)} vCPUs are left`,
      );
    if (usedMiB + spec.memoryMiB > memCapMiB)
      throw new KilnError(
        `starting '${spec.name}' (${spec.memoryMiB} MiB) would exceed the memory limit of ${memCapMiB} MiB (host RAM x ${limits.memoryOvercommit}); ${Math.max(0, memCapMiB - usedMiB)} MiB are left`,
      );
  }

  /** The VM configuration kiln-vmm runs: the definition's, with the default guest filled in. */
  private async vmmConfig(spec: VmDefinition): Promise<Record<string, unknown>> {
    const config = vmConfigOf(spec);
    if (config.kernel !== undefined) return config;
    // The default guest: the kit's minimal Linux, which stays up with a shell on its serial console.
    const kernel = (await buildMinimalKernel(this.progress)).vmlinux;
    const initrd = (await buildInitramfs(this.progress)).path;
    return { ...config, kernel, initrd, cmdline: `${config.cmdline ?? ''} kiln.shell`.trim() };
  }

  /** The last lines of a VM's console log (for a start that failed). */
  private consoleTail(name: string, lines = 5): string {
    return this.logs(name, 4096).trimEnd().split('\n').slice(-lines).join('\n');
  }

  /** One state-changing operation per VM at a time (two starts must not spawn two VMMs). */
  private readonly busy = new Map<string, Promise<unknown>>();

  private serialised<T>(name: string, work: () => Promise<T>): Promise<T> {
    const previous = this.busy.get(name) ?? Promise.resolve();
    const next = previous.then(work, work);
    const settled = next.catch(() => undefined);
    this.busy.set(name, settled);
    void settled.then(() => {
      if (this.busy.get(name) === settled) this.busy.delete(name);
    });
    return next;
  }

  /** Starts VM `name`'s VMM, jailed unless `jail` is false (kiln start --no-jail). */
  start(name: string, opts: { jail?: boolean } = {}): Promise<StartReply> {
    return this.serialised(name, () => this.startNow(name, opts.jail ?? true));
  }

  /** The jail uids of the other VMs that are running now. */
  jailUidsInUse(except: string): Set<number> {
    const used = new Set<number>();
    for (const v of this.store.list().vms) {
      if (v.name === except || this.pidOf(v.name) === null) continue;
      const uid = readJailRecord(this.store.runDir(v.name))?.uid;
      if (uid != null) used.add(uid);
    }
    return used;
  }

  /** kiln-vmm run directly (--no-jail): root, the host's namespaces, sockets in the run directory. */
  private directVmm(name: string, run: string, withConfig = true): string[] {
    return [
      process.execPath,
      KILN_VMM,
      '--api-sock',
      join(run, 'api.sock'),
      ...(withConfig ? ['--kiln-config', join(run, 'config.json')] : []),
      '--id',
      name,
      '--serial-sock',
      join(run, 'serial.sock'),
    ];
  }

  /** Undoes what a previous start lent its jail (files' ownership, TAP persistence); the VMM is gone. */
  private async releaseJail(name: string): Promise<void> {
    const run = this.store.runDir(name);
    const record = readJailRecord(run);
    if (!holdsAnything(record)) return;
    removeSocketLinks(run, record);
    if (record.mounts?.length || record.poolDir) {
      // A pool process's jail: its binds are the host's mounts; its slot goes once they are undone.
      const failed = unmountAll(record.mounts ?? []);
      for (const f of failed) this.progress(`'${name}': cannot unmount ${f}`);
      if (failed.length === 0 && record.poolDir) rmSync(record.poolDir, { recursive: true, force: true });
    }
    for (const failure of returnLentFiles(record)) this.progress(`'${name}': cannot give back ${failure}`);
    if (record.taps.length) {
      const { releaseTap } = await import('../virtio/net.js');
      for (const tap of record.taps) {
        try {
          releaseTap(tap);
        } catch (err) {
          this.progress(`TAP '${tap}' of '${name}' stays: ${(err as Error).message}`);
        }
      }
    }
    writeJailRecord(run, { ...record, taps: [], lent: [], links: [], mounts: [] });
  }

  /**
   * Gives back what the jail of a VM whose VMM has ended still holds (lent files, TAPs,
   * socket links): called when the daemon sees its VMM exit, at daemon start and every
   * few seconds (a VMM the daemon did not spawn), and before a VM is removed.
   */
  reclaimEndedJails(names?: readonly string[]): Promise<void[]> {
    const all = names ?? this.store.list().vms.map((v) => v.name);
    return Promise.all(
      all.map((name) =>
        this.pidOf(name) !== null || !holdsAnything(readJailRecord(this.store.runDir(name)))
          ? undefined
          : this.serialised(name, async () => {
              if (this.pidOf(name) === null) await this.releaseJail(name);
            }).catch((err: unknown) => this.progress(`'${name}': ${(err as Error).message}`)),
      ),
    );
  }

  private async startNow(name: string, jail: boolean, from?: RestoreSource | IncomingSource): Promise<StartReply> {
    const restore = from && 'state' in from ? from : undefined;
    const spec = this.store.get(name);
    const current = await this.status(spec);
    if (current.state !== 'stopped') throw new KilnError(`'${name}' is already ${current.state}`);
    checkStartable(spec);
    await this.checkLimits(spec);
    const run = this.store.runDir(name);
    mkdirSync(run, { recursive: true, mode: PRIVATE_DIR });
    const sock = join(run, 'api.sock');
    // A stale socket from a VMM that died.
    rmSync(sock, { force: true });
    rmSync(join(run, 'serial.sock'), { force: true });
    // A new run: no snapshot to diff against yet (a restore records its own after the load).
    this.setDiffBase(name, null);
    await this.releaseJail(name);
    const config = from ? from.config : ((await this.vmmConfig(spec)) as VmConfig);
    if (restore && !jail && restore.diskSources.size > 0)
      throw new KilnError(`a clone runs its own disk copies through its jail: start '${name}' without --no-jail`);
    writeFileSync(join(run, 'config.json'), JSON.stringify(config, null, 2), {
      mode: PRIVATE_FILE,
    });
    const warnings: string[] = [];
    let procs: string[] = [];
    try {
      removeCgroup(name);
      procs = prepareCgroup(name, {
        cpuWeight: spec.cpuWeight,
        cpuQuotaPercent: spec.cpuQuotaPercent,
        memoryBytes: spec.memoryMiB * 1024 * 1024 + VMM_OVERHEAD_BYTES,
      });
    } catch (err) {
      warnings.push(`'${name}' runs without its cgroup limits: ${(err as Error).message}`);
    }
    let record: JailRecord = NOT_JAILED;
    let vmm: string[];
    // The configuration as the jailed VMM sees it (its own socket paths).
    let jailedConfig = config;
    // A jailed VM takes a pre-started VMM from the daemon's pool when one is ready.
    const pooled = jail && this.pool ? await this.pool.take() : null;
    if (jail) {
      // TAP control needs the FFI; loaded only when a VM has a TAP.
      const tapApi = config.nets.some((n) => n.tap !== undefined) ? await import('../virtio/net.js') : null;
      let prepared: ReturnType<typeof prepareJail>;
      try {
        prepared = prepareJail(
          run,
          name,
          config,
          pooled ? pooled.uid : allocateJailUid(new Set([...this.jailUidsInUse(name), ...(this.pool?.uids ?? [])])),
          (tap, uid) => tapApi!.lendTap(tap, uid, uid),
          restore ? { state: restore.state, memory: restore.memory } : from ? 'receive' : undefined,
          restore?.diskSources,
          pooled ? { root: pooled.root, dir: pooled.dir, id: pooled.id } : undefined,
        );
      } catch (err) {
        pooled?.child.kill('SIGKILL');
        throw err;
      }
      vmm = prepared.argv;
      record = prepared.record;
      jailedConfig = prepared.config;
    } else {
      warnings.push(`'${name}' runs WITHOUT its jail (--no-jail): its VMM is root in the host's namespaces`);
      vmm = this.directVmm(name, run, !from);
    }
    writeJailRecord(run, record);
    let child: ChildProcess;
    if (pooled) {
      try {
        markInUse(pooled, name);
        // Into the VM's cgroup before it is configured: no guest code runs outside it.
        for (const f of procs) writeFileSync(f, `${pooled.pid}\n`);
        this.adoptPoolLog(run, pooled.log);
      } catch (err) {
        // Its end gives back what its jail holds (reclaimEndedJails).
        pooled.child.once('exit', () => void this.reclaimEndedJails([name]));
        pooled.child.kill('SIGKILL');
        throw err;
      }
      child = pooled.child;
    } else {
      const log = openSync(join(run, 'console.log'), 'a', PRIVATE_FILE);
      // Attach before exec, as Firecracker's jailer does: no guest code runs outside the cgroup.
      child = spawnInCgroup(procs, vmm, { detached: true, stdio: ['ignore', log, log] });
      closeSync(log);
    }
    const pid = child.pid!;
    child.unref();
    // The guest may power off on its own: its jail's loans are given back when the VMM ends.
    child.once('exit', () => void this.reclaimEndedJails([name]));
    try {
      writeFileSync(join(run, 'vmm.pid'), `${pid}\n`, { mode: PRIVATE_FILE });
    } catch (err) {
      // An untracked VMM would run on, invisible to every verb: stop it rather than lose it.
      process.kill(pid, 'SIGKILL');
      await waitFor(() => (this.processAlive(pid) ? null : true), 5_000);
      removeCgroup(name);
      throw new KilnError(
        `cannot record the VMM's pid for '${name}' (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); it was stopped`,
      );
    }
    if (restore) await this.loadInto(name, pid, jail, restore);
    else if (pooled && !from) await this.configureInto(name, pid, jailedConfig);
    else if (from && 'receiveToken' in from) {
      // An incoming migration: the VM runs once its source has sent it (watchIncoming).
      await this.receiveInto(name, pid, jail, from.receiveToken, from.diskOverrides);
      return { ...(await this.status(spec)), warnings };
    }
    // The shell becomes kiln-vmm (same pid): wait for its API to answer, or for it to end.
    const s = await waitFor(async () => {
      const now = await this.status(spec);
      if (now.state === 'running' || now.state === 'paused') return now;
      return this.processAlive(pid) ? null : now;
    }, START_TIMEOUT_MS);
    if (s === null)
      throw new KilnError(
        `'${name}' did not reach running within ${START_TIMEOUT_MS / 1000} s (its VMM, pid ${pid}, is still starting; see kiln logs ${name})`,
      );
    if (s.state === 'stopped') {
      removeCgroup(name);
      throw new KilnError(
        `'${name}' did not start: its VMM exited. The end of its console log:\n${this.consoleTail(name)}`,
      );
    }
    if (spec.pinCpus.length > 0) warnings.push(...(await this.pinVcpus(pid, spec.pinCpus)));
    for (const w of warnings) this.progress(w);
    return { ...s, warnings };
  }

  /** A pool process's console log becomes the VM's (the one before becomes console.log.1). */
  private adoptPoolLog(run: string, log: string): void {
    const file = join(run, 'console.log');
    try {
      renameSync(file, `${file}.1`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    renameSync(log, file);
  }

  /** Gives a pool process (already jailed, waiting) the VM's configuration and starts it. */
  private async configureInto(name: string, pid: number, config: VmConfig): Promise<void> {
    const api = join(this.store.runDir(name), 'api.sock');
    for (const [method, path, body] of [
      ['PUT', '/kiln/vm-config', config],
      ['PUT', '/actions', { action_type: 'InstanceStart' }],
    ] as const) {
      const r = await unixHttp(api, method, path, body, START_TIMEOUT_MS);
      if (r.status !== 204) {
        process.kill(pid, 'SIGKILL');
        await waitFor(() => (this.processAlive(pid) ? null : true), 5_000);
        removeCgroup(name);
        throw new KilnError(`'${name}' did not start (${config.kernel ?? 'the kit kernel'}): ${faultOf(r)}`);
      }
    }
  }

  /** Has a freshly started VMM (no configuration yet) listen for its migration's source. */
  private async receiveInto(
    name: string,
    pid: number,
    jail: boolean,
    token: string,
    disks: ReadonlyMap<string, string> = new Map(),
  ): Promise<void> {
    const run = this.store.runDir(name);
    await this.apiUp(name, pid);
    const inside = jail ? JAIL_MIGRATE_IN : join(run, 'migrate-in.sock');
    if (jail) {
      rmSync(join(run, 'migrate-in.sock'), { force: true });
      symlinkSync(join(readJailRecord(run)!.root!, JAIL_MIGRATE_IN), join(run, 'migrate-in.sock'));
    }
    const r = await unixHttp(join(run, 'api.sock'), 'PUT', '/migration/receive', {
      listen: `unix:${inside}`,
      token,
      ...(disks.size > 0
        ? { disk_overrides: [...disks].map(([id, path]) => ({ drive_id: id, path_on_host: path })) }
        : {}),
    });
    if (r.status !== 204) {
      process.kill(pid, 'SIGKILL');
      await waitFor(() => (this.processAlive(pid) ? null : true), 5_000);
      removeCgroup(name);
      throw new KilnError(`'${name}': the VMM cannot receive the migration: ${faultOf(r)}`);
    }
  }

  /** Waits for a freshly started VMM's API; kills it and throws if it never answers. */
  private async apiUp(name: string, pid: number): Promise<void> {
    const api = join(this.store.runDir(name), 'api.sock');
    const up = await waitFor(async () => {
      try {
        return (await unixHttp(api, 'GET', '/')).status === 200 ? true : null;
      } catch {
        return this.processAlive(pid) ? null : false;
      }
    }, START_TIMEOUT_MS);
    if (up !== true) {
      if (this.processAlive(pid)) process.kill(pid, 'SIGKILL');
      removeCgroup(name);
      throw new KilnError(
        `'${name}' did not start: its VMM never answered. The end of its console log:\n${this.consoleTail(name)}`,
      );
    }
  }

  /** Has a freshly started VMM (no configuration yet) load a snapshot and run it. */
  private async loadInto(name: string, pid: number, jail: boolean, from: RestoreSource): Promise<void> {
    const api = join(this.store.runDir(name), 'api.sock');
    await this.apiUp(name, pid);
    const r = await unixHttp(
      api,
      'PUT',
      '/snapshot/load',
      {
        snapshot_path: jail ? JAIL_SNAPSHOT_STATE : from.state,
        mem_backend: { backend_type: 'File', backend_path: jail ? JAIL_SNAPSHOT_MEMORY : from.memory },
        resume_vm: true,
        ...(from.trackDirtyPages ? { track_dirty_pages: true } : {}),
        // TAPs by name (a clone's own; a passt socket is at the same place in every jail).
        network_overrides: from.config.nets.flatMap((n) =>
          n.tap !== undefined ? [{ iface_id: n.id, host_dev_name: n.tap }] : [],
        ),
        ...(from.config.vsock
          ? {
              vsock_override: {
                uds_path: jail ? JAIL_VSOCK : from.config.vsock.uds,
                guest_cid: from.config.vsock.guestCid,
              },
            }
          : {}),
      },
      5 * 60_000,
    );
    if (r.status !== 204) {
      process.kill(pid, 'SIGKILL');
      await waitFor(() => (this.processAlive(pid) ? null : true), 5_000);
      removeCgroup(name);
      throw new KilnError(`'${name}': the snapshot did not load: ${faultOf(r)}`);
    }
  }

  // ---- migration ----

  /** Incoming migrations: 'receiving' while under way, then 'completed' or why it failed. */
  private readonly incoming = new Map<
    string,
    {
      phase: 'receiving' | 'completed' | 'failed';
      error?: string;
      downtime_ms?: number;
      pages?: number;
      /** Disk copies made for it (removed if it fails). */
      copies?: string[];
    }
  >();

  /** Removes the disk copies an incoming migration made, and their directory if empty. */
  private removeCopies(name: string, copies: readonly string[] | undefined): void {
    if (!copies) return;
    for (const path of copies) rmSync(path, { force: true });
    try {
      rmdirSync(join(this.store.dir, 'disks', name));
    } catch {
      // other files there, or none made
    }
  }

  /**
   * An incoming migration, asked for by the source host's daemon: checks this host can
   * take the VM (its name free, its disks here: shared storage), records its definition
   * and starts a jailed VMM that waits for it; resolves with the token the source's VMM
   * must prove. The definition stays only if the VM comes to run here (watchIncoming).
   */
  async prepareIncoming(input: unknown): Promise<{ token: string }> {
    const b = (typeof input === 'object' && input !== null ? input : {}) as {
      definition?: unknown;
      config?: unknown;
      diskBytes?: unknown;
    };
    const received = parseDefinition(b.definition);
    let config: VmConfig;
    try {
      config = parseVmConfig(b.config);
    } catch (err) {
      throw new KilnError(`the migrating VM's configuration: ${(err as Error).message}`);
    }
    // --copy-disks: each writable disk's size; those images come with the VM into new
    // files here (read-only disks must be here already, as without it).
    const sizes = b.diskBytes as Record<string, unknown> | undefined;
    const writable = config.disks.filter((d) => !d.readOnly);
    if (
      sizes !== undefined &&
      (typeof sizes !== 'object' ||
        sizes === null ||
        !writable.every((d) => {
          const n = sizes[d.id];
          return Number.isSafeInteger(n) && (n as number) >= 0 && (n as number) % 512 === 0;
        }))
    )
      throw new KilnError('diskBytes must give each writable disk its size in bytes (a multiple of 512)');
    const copies = sizes
      ? new Map(writable.map((d) => [d.id, join(this.store.dir, 'disks', received.name, `${d.id}.img`)]))
      : null;
    const spec = copies
      ? parseDefinition({
          ...received,
          disks: received.disks.map((d, i) => ({ ...d, path: copies.get(config.disks[i]!.id) ?? d.path })),
        })
      : received;
    return this.serialised(spec.name, async () => {
      if (this.store.exists(spec.name)) throw new KilnError(`a VM named '${spec.name}' already exists on this host`);
      // Every check before anything is made here.
      for (const path of copies?.values() ?? [])
        if (existsSync(path)) throw new KilnError(`'${path}' exists: a copied disk never replaces a file`);
      for (const d of config.disks)
        if (!copies?.has(d.id) && !existsSync(d.path))
          throw new KilnError(
            `disk '${d.path}' of '${spec.name}' is not on this host: a migration needs the VM's disks on shared storage, at the same paths on both hosts (or kiln migrate --copy-disks, for writable disks)`,
          );
      // A NIC's host end is this host's: its TAP (made here under the same name, in this
      // daemon's network namespace) or a passt socket that must be at the same path.
      for (const n of config.nets)
        if (n.passt !== undefined && !existsSync(n.passt))
          throw new KilnError(
            `network interface ${n.id} of '${spec.name}' uses the passt socket '${n.passt}', which is not on this host: start passt there first`,
          );
      if (copies) {
        mkdirSync(join(this.store.dir, 'disks', spec.name), { recursive: true, mode: PRIVATE_DIR });
        const made: string[] = [];
        try {
          for (const [id, path] of copies) {
            writeFileSync(path, '', { mode: PRIVATE_FILE, flag: 'wx' });
            made.push(path);
            truncateSync(path, sizes![id] as number);
          }
        } catch (err) {
          this.removeCopies(spec.name, made);
          throw new KilnError(`cannot make the disk copies: ${(err as Error).message}`);
        }
        config = { ...config, disks: config.disks.map((d) => ({ ...d, path: copies.get(d.id) ?? d.path })) };
      }
      this.store.create(spec);
      const receiveToken = randomBytes(32).toString('hex');
      try {
        // No kernel or initrd: the source's memory holds the guest.
        const { kernel: _k, initrd: _i, ...rest } = config;
        await this.startNow(spec.name, true, {
          config: rest as VmConfig,
          receiveToken,
          ...(copies ? { diskOverrides: copies } : {}),
        });
      } catch (err) {
        await this.releaseJail(spec.name).catch(() => undefined);
        this.store.remove(spec.name);
        this.removeCopies(spec.name, copies ? [...copies.values()] : undefined);
        throw err;
      }
      this.incoming.set(spec.name, { phase: 'receiving', ...(copies ? { copies: [...copies.values()] } : {}) });
      void this.watchIncoming(spec.name);
      return { token: receiveToken };
    });
  }

  /** GET /migrations/NAME on the peer channel. */
  incomingStatus(name: string): { phase: string; error?: string } {
    const m = this.incoming.get(name);
    if (!m) throw new KilnError(`no migration of '${name}' is coming in here`);
    return m;
  }

  /** The socket a migration's stream into VM `name` goes to (the daemon pipes it there). */
  incomingSocket(name: string): string {
    if (this.incoming.get(name)?.phase !== 'receiving')
      throw new KilnError(`no migration of '${name}' is coming in here`);
    return join(this.store.runDir(name), 'migrate-in.sock');
  }

  /** Ends an incoming migration that has not completed (its source gave up before it connected). */
  abortIncoming(name: string): { aborted: string } {
    if (this.incoming.get(name)?.phase !== 'receiving')
      throw new KilnError(`no migration of '${name}' is coming in here`);
    const pid = this.pidOf(name);
    if (pid !== null) process.kill(pid, 'SIGKILL');
    return { aborted: name };
  }

  /**
   * Watches an incoming migration's VMM until the VM runs here (its definition stays) or
   * the migration fails, its VMM ends, or no source comes: then nothing of it is left.
   */
  private async watchIncoming(name: string): Promise<void> {
    const api = join(this.store.runDir(name), 'api.sock');
    const began = Date.now();
    let error = 'its VMM ended';
    for (;;) {
      await sleep(200);
      if (this.pidOf(name) === null) break;
      const p = (await unixHttp(api, 'GET', '/migration').catch(() => null))?.body as
        { phase?: string; error?: string; downtime_ms?: number; pages_sent?: number } | undefined;
      if (p?.phase === 'completed') {
        this.incoming.set(name, { phase: 'completed', downtime_ms: p.downtime_ms ?? 0, pages: p.pages_sent ?? 0 });
        this.progress(`'${name}' migrated in and runs here`);
        return;
      }
      if (p?.phase === 'failed') {
        error = p.error ?? 'it failed';
        break;
      }
      if (p?.phase === 'listening' && Date.now() - began > INCOMING_WAIT_MS) {
        error = `no source connected within ${INCOMING_WAIT_MS / 1000} s`;
        break;
      }
    }
    const copies = this.incoming.get(name)?.copies;
    this.incoming.set(name, { phase: 'failed', error });
    this.progress(`the migration of '${name}' into this host failed (${error}); nothing of it is left here`);
    await this.serialised(name, async () => {
      const pid = this.pidOf(name);
      if (pid !== null) process.kill(pid, 'SIGKILL');
      await waitFor(() => (this.pidOf(name) === null ? true : null), 5_000);
      removeCgroup(name);
      await this.releaseJail(name);
      if (this.store.exists(name)) this.store.remove(name);
      this.removeCopies(name, copies);
    }).catch((err: unknown) => this.progress(`'${name}': ${(err as Error).message}`));
  }

  /**
   * kiln migrate NAME --to ADDR:PORT: moves running VM `name` to the daemon at `to`
   * (which must share the token and the VM's disks). Its VMM's migration stream goes
   * through a Unix socket this daemon pipes to the peer daemon. The definition moves
   * with it: removed here only once the destination runs the VM; on any failure the VM
   * runs on here and the destination keeps nothing.
   */
  migrate(
    name: string,
    opts: {
      to: string;
      token: string;
      downtimeMs?: number;
      copyDisks?: boolean;
      /** PEM CA: the peer channel, and the stream, are TLS, the destination's certificate checked against it. */
      tlsCa?: string;
      progress?: Progress;
    },
  ): Promise<{ migrated: string; to: string }> {
    return this.serialised(name, async () => {
      const say = this.reporter(opts.progress);
      const peer = { ...parsePeer(opts.to, '--to'), ...(opts.tlsCa !== undefined ? { ca: opts.tlsCa } : {}) };
      const spec = this.store.get(name);
      if (this.pidOf(name) === null)
        throw new KilnError(`'${name}' is not running: kiln migrate moves a running VM (start it first)`);
      const run = this.store.runDir(name);
      const config = JSON.parse(readFileSync(join(run, 'config.json'), 'utf8')) as VmConfig;
      const snaps = listSnapshots(this.snapshotsDir(name));
      if (snaps.length > 0)
        throw new KilnError(
          `'${name}' has snapshot(s) here (${snaps.map((x) => x.tag).join(', ')}); they do not move with it: remove them first (kiln snapshot rm ${name} TAG)`,
        );
      say(`asking ${opts.to} to take '${name}'`);
      // --copy-disks: the images go with it (regular files; their sizes go ahead).
      const diskBytes = opts.copyDisks
        ? Object.fromEntries(
            config.disks
              .filter((d) => !d.readOnly)
              .map((d) => {
                const st = statSync(d.path);
                if (!st.isFile()) throw new KilnError(`--copy-disks copies regular files; disk '${d.path}' is not one`);
                return [d.id, st.size];
              }),
          )
        : undefined;
      const { token } = await peerCall<{ token: string }>(peer, opts.token, 'POST', '/migrations', {
        definition: spec,
        config,
        ...(diskBytes ? { diskBytes } : {}),
      });
      const record = readJailRecord(run);
      const root = record?.jailed ? record.root : null;
      const outside = root ? join(root, JAIL_MIGRATE_OUT) : join(run, 'migrate-out.sock');
      const proxy = await relayFrom(
        outside,
        root ? record!.uid : null,
        () => peerStream(peer, opts.token, `/migrations/${encodeURIComponent(name)}/stream`),
        say,
      );
      const api = join(run, 'api.sock');
      try {
        const r = await unixHttp(api, 'PUT', '/migration/send', {
          destination: `unix:${root ? JAIL_MIGRATE_OUT : outside}`,
          token,
          downtime_ms: opts.downtimeMs ?? 300,
          ...(opts.copyDisks ? { copy_disks: true } : {}),
        });
        if (r.status !== 204) {
          await peerCall(peer, opts.token, 'POST', `/migrations/${encodeURIComponent(name)}/abort`).catch(
            () => undefined,
          );
          throw new KilnError(`'${name}' cannot migrate: ${faultOf(r)}`);
        }
        let last = '';
        for (;;) {
          await sleep(200);
          if (this.pidOf(name) === null) break;
          const p = (await unixHttp(api, 'GET', '/migration').catch(() => null))?.body as
            | {
                phase: string;
                iteration: number;
                pages_sent: number;
                dirty_pages_left: number;
                throttle_percent: number;
                error?: string;
              }
            | undefined;
          if (!p?.phase) continue;
          if (p.phase === 'failed')
            throw new KilnError(`the migration of '${name}' failed; it runs on here: ${p.error ?? 'no reason given'}`);
          const line = `${p.phase}: iteration ${p.iteration}, ${p.pages_sent} pages sent, ${p.dirty_pages_left} dirty${p.throttle_percent ? `, vCPUs throttled to ${p.throttle_percent}%` : ''}`;
          if (line !== last) say(line);
          last = line;
        }
        // This VMM ended once the destination had the VM: it must say it runs it.
        const there = await waitFor(async () => {
          const m = await peerCall<{ phase: string; error?: string; downtime_ms?: number; pages?: number }>(
            peer,
            opts.token,
            'GET',
            `/migrations/${encodeURIComponent(name)}`,
          );
          return m.phase === 'receiving' ? null : m;
        }, 30_000);
        if (there?.phase !== 'completed')
          throw new KilnError(
            `'${name}''s VMM here ended, but ${opts.to} says the migration ${there ? `failed: ${there.error}` : 'is still under way'}; its definition stays here`,
          );
        removeCgroup(name);
        await this.releaseJail(name);
        this.store.remove(name);
        say(
          `'${name}' runs on ${opts.to} (${there.pages ?? 0} pages sent, paused for ${there.downtime_ms ?? 0} ms); its definition moved there`,
        );
        return { migrated: name, to: opts.to };
      } finally {
        proxy.close();
        rmSync(outside, { force: true });
      }
    });
  }

  /**
   * kiln upgrade NAME: moves running VM `name` into a new kiln-vmm of the Kiln installed
   * now, on this host, by a local migration over Unix sockets. Where the VM's RAM is a
   * shared guest memory file (sharedMemory, the manager's default), the daemon opens the
   * old VMM's file again and the new VMM inherits it (kiln-jailer --pass-fd): no memory is
   * copied, the guest pauses only while its vCPU and device state moves. Otherwise (a VM
   * restored from a snapshot's memory file, or sharedMemory off) memory is copied by a live
   * migration's pre-copy. The new VMM is jailed as the old one was (the old jail is moved
   * aside meanwhile) and joins the same cgroup. On failure the old VMM runs on, as before.
   */
  upgrade(name: string, progress?: Progress): Promise<UpgradeReply> {
    return this.serialised(name, async () => {
      const say = this.reporter(progress);
      const spec = this.store.get(name);
      const oldPid = this.pidOf(name);
      if (oldPid === null) throw new KilnError(`'${name}' is not running: there is nothing to upgrade`);
      const run = this.store.runDir(name);
      const config = JSON.parse(readFileSync(join(run, 'config.json'), 'utf8')) as VmConfig;
      if (config.nets.length > 0)
        throw new KilnError(
          `'${name}' has network interfaces: its TAP or passt end cannot be open in two VMMs at once`,
        );
      const old = readJailRecord(run) ?? NOT_JAILED;
      if (!old.jailed || old.root === null || old.uid === null)
        throw new KilnError(`'${name}' runs without its jail (--no-jail): kiln upgrade moves jailed VMMs only`);
      // The old jail moves aside (its VMM keeps its root: a chroot holds the directory, not its path).
      const aside = join(run, 'jail.old');
      rmSync(aside, { recursive: true, force: true });
      renameSync(join(run, 'jail'), aside);
      const oldRoot = join(aside, old.root.slice(join(run, 'jail').length));
      const limits = (memoryBytes: number) => ({
        cpuWeight: spec.cpuWeight,
        cpuQuotaPercent: spec.cpuQuotaPercent,
        memoryBytes,
      });
      const vmBytes = spec.memoryMiB * 1024 * 1024;
      let newPid: number | null = null;
      let relay: NetServer | null = null;
      // The old VMM's guest memory file, when its RAM is one: the new VMM inherits it as fd 3.
      let memoryFd: number | null = null;
      try {
        memoryFd = openGuestMemoryOf(oldPid, vmBytes);
        if (memoryFd === null)
          say(`'${name}''s memory is private (restored from a snapshot, or sharedMemory off): it is copied`);
      } catch (err) {
        say(`'${name}''s memory is copied: ${(err as Error).message}`);
      }
      const handed = memoryFd !== null;
      try {
        const { kernel: _k, initrd: _i, ...rest } = config;
        const prepared = prepareJail(run, name, rest as VmConfig, old.uid, () => false, 'receive');
        // The same jail user: what the old jail was lent stays lent, and is given back at the end.
        const record: JailRecord = {
          ...prepared.record,
          lent: [...(old.lent ?? []), ...(prepared.record.lent ?? [])],
          links: old.links ?? [],
        };
        let procs: string[] = [];
        try {
          // Copied memory is in both VMMs for a while; a handed-over file is charged once.
          procs = prepareCgroup(
            name,
            limits(handed ? vmBytes + 2 * VMM_OVERHEAD_BYTES : 2 * vmBytes + VMM_OVERHEAD_BYTES),
          );
        } catch (err) {
          say(`the new VMM runs without its cgroup limits: ${(err as Error).message}`);
        }
        const argv = [...prepared.argv];
        if (handed) argv.splice(argv.indexOf('--'), 0, '--pass-fd', '3');
        const log = openSync(join(run, 'console.log'), 'a', PRIVATE_FILE);
        const child = spawnInCgroup(procs, argv, {
          detached: true,
          stdio: ['ignore', log, log, ...(handed ? [memoryFd!] : [])],
        });
        closeSync(log);
        if (memoryFd !== null) closeSync(memoryFd);
        memoryFd = null;
        newPid = child.pid!;
        child.unref();
        child.once('exit', () => void this.reclaimEndedJails([name]));
        await this.apiUp(name, newPid);
        const token = randomBytes(32).toString('hex');
        const newRoot = prepared.record.root!;
        const api = join(run, 'api.sock');
        const listening = await unixHttp(api, 'PUT', '/migration/receive', {
          listen: `unix:${JAIL_MIGRATE_IN}`,
          token,
          ...(handed ? { memory_fd: 3 } : {}),
        });
        if (listening.status !== 204) throw new KilnError(`the new VMM cannot receive: ${faultOf(listening)}`);
        relay = await relayFrom(
          join(oldRoot, JAIL_MIGRATE_OUT),
          old.uid,
          () =>
            new Promise<Socket>((resolve, reject) => {
              const c = createConnection(join(newRoot, JAIL_MIGRATE_IN), () => resolve(c));
              c.once('error', reject);
            }),
          say,
        );
        const oldApi = join(oldRoot, 'run', 'api.sock');
        say(
          `moving '${name}' into a new VMM (pid ${newPid}) of Kiln ${KILN_VERSION}${handed ? ', handing its guest memory over' : ''}`,
        );
        const sent = await unixHttp(oldApi, 'PUT', '/migration/send', {
          destination: `unix:${JAIL_MIGRATE_OUT}`,
          token,
          downtime_ms: 50,
          ...(handed ? { local: true } : {}),
        });
        if (sent.status !== 204) throw new KilnError(`the old VMM cannot send: ${faultOf(sent)}`);
        const done = await waitFor(async () => {
          const p = (await unixHttp(api, 'GET', '/migration').catch(() => null))?.body as
            { phase?: string; error?: string; downtime_ms?: number } | undefined;
          if (p?.phase === 'failed') throw new KilnError(`the migration failed: ${p.error ?? 'no reason given'}`);
          return p?.phase === 'completed' && !this.processAlive(oldPid) ? p : null;
        }, 5 * 60_000);
        if (!done) throw new KilnError('the migration did not finish within 5 minutes');
        writeFileSync(join(run, 'vmm.pid'), `${newPid}\n`, { mode: PRIVATE_FILE });
        writeJailRecord(run, record);
        rmSync(aside, { recursive: true, force: true });
        try {
          prepareCgroup(name, limits(vmBytes + VMM_OVERHEAD_BYTES));
        } catch (err) {
          say(`the cgroup's memory limit stays raised: ${(err as Error).message}`);
        }
        const downtimeMs = done.downtime_ms ?? 0;
        say(`'${name}' runs in its new VMM (pid ${newPid}); it was paused for ${downtimeMs} ms`);
        return {
          ...(await this.status(spec)),
          warnings: [],
          memory: handed ? ('handed over' as const) : ('copied' as const),
          downtimeMs,
        };
      } catch (err) {
        // The old VMM runs on: the new one goes, the old jail comes back.
        if (newPid !== null && this.processAlive(newPid)) process.kill(newPid, 'SIGKILL');
        if (newPid !== null) await waitFor(() => (this.processAlive(newPid!) ? null : true), 5_000);
        rmSync(join(run, 'jail'), { recursive: true, force: true });
        renameSync(aside, join(run, 'jail'));
        for (const sock of ['api.sock', 'serial.sock']) {
          rmSync(join(run, sock), { force: true });
          symlinkSync(join(old.root, 'run', sock), join(run, sock));
        }
        writeJailRecord(run, old);
        throw new KilnError(
          `'${name}' was not upgraded (it runs on in its VMM, pid ${oldPid}): ${(err as Error).message}`,
        );
      } finally {
        relay?.close();
        if (memoryFd !== null) closeSync(memoryFd);
      }
    });
  }

  // ---- snapshots ----

  private snapshotsDir(name: string): string {
    return join(this.store.dir, 'snapshots', name);
  }

  /** kiln snapshots NAME: the VM's finished snapshots, oldest first. */
  snapshots(name: string): SnapshotMeta[] {
    this.store.get(name);
    return listSnapshots(this.snapshotsDir(name));
  }

  /**
   * kiln snapshot NAME [TAG]: pauses the VM (if it runs), has its VMM write its state and
   * memory, copies its writable disks, and resumes it. Built in a temporary directory and
   * renamed into place: an existing tag is never replaced.
   */
  snapshot(name: string, tag?: string, opts: { diff?: boolean; progress?: Progress } = {}): Promise<SnapshotMeta> {
    return this.serialised(name, () => this.snapshotNow(name, tag ?? defaultTag(), opts));
  }

  /** Progress of a long verb: to the daemon's log and to the client that asked for it. */
  private reporter(progress?: Progress): Progress {
    return (line) => {
      this.progress(line);
      progress?.(line);
    };
  }

  /** A disk-copy progress callback saying `what` and its percentage. */
  private copyProgress(say: Progress, what: string): (done: number, total: number) => void {
    return (done, total) => say(`${what}: ${Math.round((100 * done) / total)}%`);
  }

  private async snapshotNow(
    name: string,
    tag: string,
    opts: { diff?: boolean; progress?: Progress },
  ): Promise<SnapshotMeta> {
    const say = this.reporter(opts.progress);
    checkTag(tag);
    const spec = this.store.get(name);
    const before = await this.status(spec);
    if (before.state !== 'running' && before.state !== 'paused')
      throw new KilnError(`'${name}' is ${before.state}: only a running or paused VM can be snapshotted`);
    const dir = this.snapshotsDir(name);
    // A diff holds what changed since the last snapshot of this run (taken or restored from).
    const base = opts.diff ? this.diffBase(name) : undefined;
    mkdirSync(dir, { recursive: true, mode: PRIVATE_DIR });
    const final = join(dir, tag);
    const refuseTaken = () => {
      if (snapshotExists(dir, tag))
        throw new KilnError(`'${name}' already has a snapshot '${tag}'; choose another tag`);
    };
    refuseTaken();
    const work = `${final}${TMP_MARK}${process.pid}`;
    removeSnapshotDir(work);
    mkdirSync(work, { mode: PRIVATE_DIR });
    const run = this.store.runDir(name);
    const record = readJailRecord(run);
    const jailed = record?.jailed === true && record.root !== null;
    const config = JSON.parse(readFileSync(join(run, 'config.json'), 'utf8')) as VmConfig;
    const started = performance.now();
    // The VMM writes where it can: inside its jail, or straight into the snapshot.
    const inside = jailed ? JAIL_NEW_SNAPSHOT : { state: join(work, STATE_FILE), memory: join(work, MEMORY_FILE) };
    try {
      if (before.state === 'running') await this.apiCall(name, 'PATCH', '/vm', { state: 'Paused' });
      await this.apiCall(
        name,
        'PUT',
        '/snapshot/create',
        { snapshot_path: inside.state, mem_file_path: inside.memory, snapshot_type: base ? 'Diff' : 'Full' },
        10 * 60_000,
      );
      if (jailed) {
        moveFile(join(record.root!, inside.state), join(work, STATE_FILE));
        moveFile(join(record.root!, inside.memory), join(work, MEMORY_FILE));
      }
      for (const f of [STATE_FILE, MEMORY_FILE]) {
        chownSync(join(work, f), process.getuid?.() ?? 0, process.getgid?.() ?? 0);
        chmodSync(join(work, f), PRIVATE_FILE);
      }
      // The disks as they are at this instant (the VM is paused): a restore is consistent.
      const disks: Array<{ id: string; path: string; file: string; bytes: number }> = [];
      for (const d of config.disks.filter((x) => !x.readOnly)) {
        const file = `disk-${d.id}`;
        const reflink = copyDisk(d.path, join(work, file), this.copyProgress(say, `'${name}': copying disk ${d.id}`));
        disks.push({ id: d.id, path: d.path, file, bytes: statSync(d.path).size });
        if (reflink) say(`'${name}': disk ${d.id} copied as a reflink`);
      }
      const meta: SnapshotMeta = {
        vm: name,
        tag,
        createdAt: new Date().toISOString(),
        config,
        jailed,
        stateBytes: statSync(join(work, STATE_FILE)).size,
        memoryBytes: statSync(join(work, MEMORY_FILE)).size,
        memoryOnDisk: sizeOnDisk(join(work, MEMORY_FILE)),
        disks,
        createMs: Math.round(performance.now() - started),
        type: base ? 'diff' : 'full',
        ...(base ? { base } : {}),
      };
      writeMeta(work, meta);
      // Checked again just before the rename: a tag is never replaced.
      refuseTaken();
      renameSync(work, final);
      this.setDiffBase(name, tag);
      return meta;
    } catch (err) {
      removeSnapshotDir(work);
      if (jailed) for (const f of Object.values(JAIL_NEW_SNAPSHOT)) rmSync(join(record.root!, f), { force: true });
      throw err;
    } finally {
      if (before.state === 'running')
        await this.apiCall(name, 'PATCH', '/vm', { state: 'Resumed' }).catch((err: unknown) =>
          this.progress(`'${name}': could not resume after the snapshot: ${(err as Error).message}`),
        );
    }
  }

  /** Where a run records the snapshot its memory was last saved to or restored from (a diff's base). */
  private diffBaseFile(name: string): string {
    return join(this.store.runDir(name), 'snapshot-base');
  }

  private setDiffBase(name: string, tag: string | null): void {
    if (tag === null) rmSync(this.diffBaseFile(name), { force: true });
    else writeFileSync(this.diffBaseFile(name), `${tag}\n`, { mode: PRIVATE_FILE });
  }

  /** The snapshot a diff of VM `name` (running now) would build on; throws when there is none. */
  private diffBase(name: string): string {
    let tag: string;
    try {
      tag = readFileSync(this.diffBaseFile(name), 'utf8').trim();
    } catch {
      throw new KilnError(
        `'${name}' has no snapshot of this run to diff against: take a full snapshot first (kiln snapshot ${name})`,
      );
    }
    if (!snapshotExists(this.snapshotsDir(name), tag))
      throw new KilnError(
        `'${name}': snapshot '${tag}', which a diff would build on, was removed: take a full snapshot first (kiln snapshot ${name})`,
      );
    return tag;
  }

  /** A call to VM `name`'s VMM that must succeed (a fault becomes the error). */
  private async apiCall(name: string, method: string, path: string, body: unknown, timeoutMs = 30_000): Promise<void> {
    const r = await unixHttp(join(this.store.runDir(name), 'api.sock'), method, path, body, timeoutMs);
    if (r.status !== 204) throw new KilnError(`'${name}': ${method} ${path}: ${faultOf(r)}`);
  }

  /** kiln snapshot rm NAME TAG. */
  removeSnapshot(name: string, tag: string): Promise<void> {
    return this.serialised(name, async () => {
      this.store.get(name);
      readSnapshot(this.snapshotsDir(name), name, tag);
      const onTop = listSnapshots(this.snapshotsDir(name)).filter((s) => s.type === 'diff' && s.base === tag);
      if (onTop.length > 0)
        throw new KilnError(
          `'${name}': snapshot '${tag}' is the base of diff ${onTop.map((s) => `'${s.tag}'`).join(', ')}; merge ${onTop.length === 1 ? 'it' : 'them'} first (kiln snapshot merge ${name} ${onTop[0]!.tag}) or remove ${onTop.length === 1 ? 'it' : 'them'}`,
        );
      removeSnapshotDir(join(this.snapshotsDir(name), tag));
    });
  }

  /**
   * kiln restore NAME TAG: the stopped VM's writable disks put back as they were at the
   * snapshot, and the VM started from its state and memory, running where it was.
   */
  restore(name: string, tag: string, opts: { jail?: boolean; progress?: Progress } = {}): Promise<StartReply> {
    const say = this.reporter(opts.progress);
    return this.serialised(name, async () => {
      const spec = this.store.get(name);
      const meta = readSnapshot(this.snapshotsDir(name), name, tag);
      const now = await this.status(spec);
      if (now.state !== 'stopped') throw new KilnError(`'${name}' is ${now.state}; stop it first (kiln stop ${name})`);
      const dir = join(this.snapshotsDir(name), tag);
      // A diff's memory is its chain laid over the full snapshot at its root, built first:
      // a broken chain fails before any disk is touched.
      const chain = snapshotChain(this.snapshotsDir(name), name, tag);
      let memory = join(dir, MEMORY_FILE);
      if (chain.length > 1) {
        memory = join(this.snapshotsDir(name), `${tag}.memory${TMP_MARK}${process.pid}`);
        await buildChainMemory(this.snapshotsDir(name), chain, memory, say);
      }
      try {
        for (const d of meta.disks) {
          // Copied beside the disk and renamed over it, its owner and mode kept: a copy that
          // fails (a full disk) leaves the disk as it was.
          const tmp = `${d.path}${TMP_MARK}${process.pid}`;
          rmSync(tmp, { force: true });
          try {
            copyDisk(join(dir, d.file), tmp, this.copyProgress(say, `'${name}': putting disk ${d.id} back`));
            const st = statSync(d.path, { throwIfNoEntry: false });
            if (st) {
              chownSync(tmp, st.uid, st.gid);
              chmodSync(tmp, st.mode & 0o7777);
            }
            renameSync(tmp, d.path);
          } catch (err) {
            rmSync(tmp, { force: true });
            throw err;
          }
        }
        const started = await this.startNow(name, opts.jail ?? true, {
          config: meta.config,
          state: join(dir, STATE_FILE),
          memory,
          diskSources: new Map(),
          trackDirtyPages: true,
        });
        // The next diff of this run builds on this snapshot.
        this.setDiffBase(name, tag);
        return started;
      } finally {
        // Once loaded, the VMM maps the built memory; the file's name is not needed.
        if (chain.length > 1) rmSync(memory, { force: true });
      }
    });
  }

  /**
   * kiln snapshot merge NAME TAG: a diff snapshot made whole (its chain laid over the full
   * one at its root, in place of its memory), so the snapshots under it can be removed.
   */
  mergeSnapshot(name: string, tag: string, progress?: Progress): Promise<SnapshotMeta> {
    const say = this.reporter(progress);
    return this.serialised(name, async () => {
      this.store.get(name);
      const dir = this.snapshotsDir(name);
      const chain = snapshotChain(dir, name, tag);
      const meta = chain[chain.length - 1]!;
      if (chain.length === 1) return meta;
      const final = join(dir, tag, MEMORY_FILE);
      const tmp = `${final}${TMP_MARK}${process.pid}`;
      await buildChainMemory(dir, chain, tmp, say);
      const { base: _base, ...rest } = meta;
      const merged: SnapshotMeta = { ...rest, type: 'full', memoryOnDisk: sizeOnDisk(tmp) };
      try {
        renameSync(tmp, final);
      } catch (err) {
        rmSync(tmp, { force: true });
        throw err;
      }
      writeMeta(join(dir, tag), merged);
      return merged;
    });
  }

  /**
   * kiln clone NAME NEWNAME [--from TAG]: a new VM running from a snapshot of NAME (a
   * fresh one of the running VM without --from), beside it, with copies of its writable
   * disks and sockets of its own.
   */
  async clone(
    name: string,
    newName: string,
    opts: {
      from?: string;
      nets?: ReadonlyArray<{ id?: string; tap?: string; passt?: string; mac?: string }>;
      progress?: Progress;
    } = {},
  ): Promise<StartReply> {
    const say = this.reporter(opts.progress);
    const spec = this.store.get(name);
    if (this.store.exists(newName)) throw new KilnError(`a VM named '${newName}' already exists`);
    // Each network interface gets the clone's own TAP or passt socket (two VMs cannot
    // share one); its guest keeps the MAC it has (a running guest reads it only at probe).
    // Without id=, the one interface a VM with one has.
    const soleId = spec.nets.length === 1 ? spec.nets[0]!.id : '';
    const givenNets = new Map((opts.nets ?? []).map((n) => [n.id ?? soleId, n]));
    for (const [id, n] of givenNets) {
      if (id === '')
        throw new KilnError(`'${name}' has ${spec.nets.length} network interfaces: --net id=ID,... names one`);
      if (!spec.nets.some((x) => x.id === id))
        throw new KilnError(`'${name}' has no network interface '${id}' (--net id=ID,... names one of its own)`);
      if (n.mac !== undefined)
        throw new KilnError(`--net ${id}: a clone's guest keeps the MAC it was snapshotted with; leave mac out`);
      if ((n.tap === undefined) === (n.passt === undefined))
        throw new KilnError(`--net ${id}: give the clone its own tap=NAME or passt=SOCKET`);
    }
    const nets = spec.nets.map((n) => {
      const own = givenNets.get(n.id);
      if (!own)
        throw new KilnError(
          `'${name}' has network interface '${n.id}'; a clone needs its own: --net id=${n.id},tap=NAME or --net id=${n.id},passt=SOCKET`,
        );
      return withHostEnd(n, own);
    });
    const meta = opts.from
      ? readSnapshot(this.snapshotsDir(name), name, opts.from)
      : await this.snapshot(name, `clone-${newName}`, { ...(opts.progress ? { progress: opts.progress } : {}) });
    const src = join(this.snapshotsDir(name), meta.tag);
    // The clone's own definition: its disks are copies, its sockets beside the original's.
    const diskDir = join(this.store.dir, 'disks', newName);
    mkdirSync(diskDir, { recursive: true, mode: PRIVATE_DIR });
    const renamed = (path: string) => join(dirname(path), `${newName}-${basename(path)}`);
    const diskSources = new Map<string, string>();
    for (const d of meta.disks) {
      const copy = join(diskDir, basename(d.path));
      copyDisk(join(src, d.file), copy, this.copyProgress(say, `'${newName}': copying disk ${d.id}`));
      diskSources.set(d.path, copy);
    }
    const definition = parseDefinition({
      ...spec,
      name: newName,
      disks: spec.disks.map((d) => ({ ...d, path: diskSources.get(d.path) ?? d.path })),
      nets,
      // Its own vsock CID (the guest reads it again at the transport reset after the load).
      ...(spec.vsock ? { vsock: { ...spec.vsock, uds: renamed(spec.vsock.uds), guestCid: this.freeCid() } } : {}),
      ...(spec.consoleSocket !== undefined ? { consoleSocket: renamed(spec.consoleSocket) } : {}),
    });
    this.store.create(definition);
    try {
      const config: VmConfig = {
        ...meta.config,
        ...(meta.config.vsock && definition.vsock
          ? { vsock: { ...meta.config.vsock, uds: definition.vsock.uds, guestCid: definition.vsock.guestCid } }
          : {}),
        ...(definition.consoleSocket !== undefined ? { consoleSocket: definition.consoleSocket } : {}),
        nets: meta.config.nets.map((n) =>
          withHostEnd(
            n,
            definition.nets.find((x) => x.id === n.id)!,
          ),
        ),
      };
      return await this.serialised(newName, () =>
        this.startNow(newName, true, {
          config,
          state: join(src, STATE_FILE),
          memory: join(src, MEMORY_FILE),
          diskSources,
        }),
      );
    } catch (err) {
      // A clone that did not start leaves nothing behind.
      this.store.remove(newName);
      removeSnapshotDir(diskDir);
      throw err;
    }
  }

  /** A vsock CID no defined VM uses (one above the highest, from 3). */
  private freeCid(): number {
    const used = this.store.list().vms.flatMap((d) => (d.vsock ? [d.vsock.guestCid] : []));
    const next = Math.max(2, ...used) + 1;
    if (next <= 0xffff_ffff) return next;
    for (let cid = 3; ; cid++) if (!used.includes(cid)) return cid;
  }

  private processAlive(pid: number): boolean {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      // A zombie (state Z) has ended; only its parent has not reaped it yet.
      return !/^\d+ \(.*\) Z/.test(stat);
    } catch {
      return false;
    }
  }

  /** Pins each `fc_vcpu N` thread to pinCpus[N % length] with sched_setaffinity; returns what failed. */
  private async pinVcpus(pid: number, pinCpus: readonly number[]): Promise<string[]> {
    const { pinThread } = await import('./affinity.js');
    const threads = await waitFor(() => {
      const tasks = existsSync(`/proc/${pid}/task`) ? readdirSync(`/proc/${pid}/task`) : [];
      const vcpus = tasks.flatMap((tid) => {
        try {
          const comm = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
          return comm.startsWith('fc_vcpu') ? [{ tid: Number(tid), index: Number(comm.split(' ')[1] ?? 0) }] : [];
        } catch {
          return [];
        }
      });
      return vcpus.length > 0 ? vcpus : null;
    }, 10_000);
    if (threads === null) return ['no vCPU threads appeared to pin'];
    const failures: string[] = [];
    for (const t of threads) {
      const cpu = pinCpus[t.index % pinCpus.length]!;
      const error = pinThread(t.tid, cpu);
      if (error) failures.push(`vCPU ${t.index} was not pinned to host CPU ${cpu}: ${error}`);
    }
    return failures;
  }

  /** Graceful: the ACPI power button, then SIGTERM after `timeoutMs`; forced: SIGTERM at once. */
  stop(name: string, force = false, timeoutMs = 30_000): Promise<VmStatus> {
    return this.serialised(name, () => this.stopNow(name, force, timeoutMs));
  }

  private async stopNow(name: string, force: boolean, timeoutMs: number): Promise<VmStatus> {
    const spec = this.store.get(name);
    const pid = this.pidOf(name);
    if (pid === null) return this.status(spec);
    const gone = () => (this.pidOf(name) === null ? true : null);
    if (!force) {
      await unixHttp(join(this.store.runDir(name), 'api.sock'), 'PUT', '/actions', {
        action_type: 'SendCtrlAltDel',
      }).catch(() => undefined);
      await waitFor(gone, timeoutMs);
    }
    if (this.pidOf(name) !== null) process.kill(pid, 'SIGTERM');
    if ((await waitFor(gone, 15_000)) === null && this.pidOf(name) !== null) process.kill(pid, 'SIGKILL');
    await waitFor(gone, 5_000);
    removeCgroup(name);
    if (this.pidOf(name) === null) await this.releaseJail(name);
    return this.status(spec);
  }

  async setPaused(name: string, paused: boolean): Promise<VmStatus> {
    const spec = this.store.get(name);
    if (this.pidOf(name) === null) throw new KilnError(`'${name}' is not running`);
    const r = await unixHttp(join(this.store.runDir(name), 'api.sock'), 'PATCH', '/vm', {
      state: paused ? 'Paused' : 'Resumed',
    });
    if (r.status !== 204) throw new KilnError(`'${name}': ${faultOf(r)}`);
    return this.status(spec);
  }

  /** Removes a VM (a broken definition too: that is how a user gets rid of one). */
  remove(name: string): Promise<void> {
    return this.serialised(name, () => this.removeNow(name));
  }

  private async removeNow(name: string): Promise<void> {
    if (!this.store.exists(name)) throw new KilnError(`no VM named '${name}'`);
    if (this.pidOf(name) !== null) throw new KilnError(`'${name}' is running; stop it first (kiln stop ${name})`);
    const snaps = listSnapshots(this.snapshotsDir(name));
    if (snaps.length > 0)
      throw new KilnError(
        `'${name}' has ${snaps.length} snapshot(s) (${snaps.map((x) => x.tag).join(', ')}); remove them first (kiln snapshot rm ${name} TAG)`,
      );
    // Its run directory (and jail record) goes with it: give back what its last jail held first.
    await this.releaseJail(name);
    this.store.remove(name);
    removeCgroup(name);
  }

  /** The last `bytes` of the VM's console log (its scroll-back), across one rotation. */
  logs(name: string, bytes = 64 * 1024): string {
    this.store.get(name);
    const run = this.store.runDir(name);
    const current = tail(join(run, 'console.log'), bytes);
    const older = current.length < bytes ? tail(join(run, 'console.log.1'), bytes - current.length) : Buffer.alloc(0);
    return Buffer.concat([older, current]).toString('utf8');
  }

  /**
   * Caps every VM's console log: past MAX_CONSOLE_LOG_BYTES its content becomes
   * console.log.1 (replacing the one before) and console.log starts again. The VMM writes
   * with O_APPEND, so it goes on at the new end; at most two caps of disk per VM.
   */
  rotateConsoleLogs(): void {
    for (const v of this.store.list().vms) {
      const file = join(this.store.runDir(v.name), 'console.log');
      try {
        if (statSync(file).size <= MAX_CONSOLE_LOG_BYTES) continue;
        copyFileSync(file, `${file}.1`);
        truncateSync(file, 0);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT')
          this.progress(`cannot rotate the console log of '${v.name}': ${(err as Error).message}`);
      }
    }
  }
}
