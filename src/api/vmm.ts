// One VM behind the Firecracker API: its definition (what the API has PUT so far), and
// once InstanceStart has run, the live Linux VM built from it. Pre-boot-only resources
// are refused after the start, as Firecracker refuses them.
import {
  closeSync,
  constants as fsConstants,
  existsSync,
  lstatSync,
  openSync,
  readSync,
  statSync,
  writeSync,
} from 'node:fs';
import { dirname } from 'node:path';
import { isNullDevice, requireKind } from '../special-files.js';
import { hugePagesFree } from '../host.js';
import { createLinuxVm, DROPPED_BOOT_ARGS, type LinuxVm } from '../boot/linux.js';
import { KilnError } from '../errors.js';
import { checkGuestMemoryFile, SharedMemoryError } from '../memory/shared-memory.js';
import { ConfigError, parseVmConfig, type VmConfig } from '../config/vm-config.js';
import { balloonControl, blkControl, openDisk } from '../platform/virtio.js';
import { openTap } from '../virtio/net.js';
import { KERNEL_HEADER_BYTES, kernelFormatOf } from '../boot/loader.js';
import type { BalloonControl } from '../virtio/balloon.js';
import type { VmResult } from '../vm.js';
import type { BootTimerOptions } from '../devices/boot-timer.js';
import { MmdsError, MmdsStore } from '../mmds/store.js';
import type { RateLimiterConfig } from '../virtio/rate-limiter.js';
import { Deltas, MetricCounters } from './metrics.js';
import type { SeccompPrograms } from '../seccomp/policy.js';
import { writeAll, writeFileAtomically } from '../atomic-file.js';
import type { CompatConfig } from '../compat/pvm.js';
import { encodeStateFile, readStateFile } from '../snapshot/format.js';
import { openMemoryFile, writeDiffMemoryFile, writeMemoryFile } from '../snapshot/memory-file.js';
import { handOverToUffd } from '../snapshot/uffd.js';
import { KILN_VERSION } from '../version.js';
import {
  IncomingMigration,
  MigrationError,
  OutgoingMigration,
  type MigrationProgress,
  type ReceiveRequest,
  type SendRequest,
} from '../migration/migration.js';
import type { BootSummary } from '../boot/linux.js';
import type { MachineState } from '../vm.js';
import {
  ApiError,
  type SnapshotCreate,
  type SnapshotLoad,
  type ConfigChange,
  type LoggerConfig,
  type MetricsConfig,
  type VmmSettings,
} from './resources.js';

const isLink = (path: string): boolean => {
  try {
    return lstatSync(path).isSymbolicLink();
  } catch {
    return false;
  }
};

/** Firecracker's default limit on an API request's body. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 51200;

export type InstanceState = 'Not started' | 'Running' | 'Paused';

/** The fault message Firecracker gives for a pre-boot-only request after the start. */
export const AFTER_START = 'The requested operation is not supported after starting the microVM.';
export const BEFORE_START = 'The requested operation is not supported before starting the microVM.';

/** What kiln-vmm's state file holds (snapshot/format.ts frames it). */
interface VmmSnapshot {
  readonly kiln: string;
  readonly createdAt: string;
  readonly config: VmConfig;
  readonly boot: BootSummary;
  readonly compat: CompatConfig | null;
  readonly memoryBytes: number;
  /** Full, or Diff (the memory file held only what changed; it is laid over its base to load). */
  readonly memoryType?: 'Full' | 'Diff';
  readonly machine: MachineState;
}

/**
 * The first `bytes` of the regular file at `path` (opened non-blocking, so a FIFO given
 * as a kernel never stalls the API), or a 400 that says why it cannot be used.
 */
function readHead(path: string, what: string, bytes: number): Uint8Array {
  let fd: number;
  try {
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
  } catch (err) {
    throw new ApiError(`Cannot open the ${what} file ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  try {
    requireKind(fd, path, `the ${what} file`, ['regular file']);
    const head = Buffer.alloc(bytes);
    let got = 0;
    while (got < bytes) {
      const n = readSync(fd, head, got, bytes - got, got);
      if (n === 0) break;
      got += n;
    }
    return head.subarray(0, got);
  } catch (err) {
    if (err instanceof KilnError) throw new ApiError(`Cannot use ${err.message}`);
    throw new ApiError(`Cannot read the ${what} file ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  } finally {
    closeSync(fd);
  }
}

export class Vmm {
  /** The VM as configured so far: always a checked VmConfig (a change that would break it is refused whole). */
  config: VmConfig = parseVmConfig({});
  /** The logger and metrics (the VMM process's, not the VM's). */
  settings: VmmSettings = {};
  private live: LinuxVm | null = null;
  private balloon: BalloonControl | null = null;
  private paused = false;
  private metricsFd = -1;
  readonly ended: Promise<VmResult>;
  /** Firecracker's boot timer (--boot-timer): added to a VM InstanceStart boots (not to a restored one). */
  bootTimer: BootTimerOptions | null = null;
  /** The largest API request body taken (--http-api-max-payload-size; Firecracker's default 51200). */
  maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES;
  /** MMDS's data store (PUT/PATCH/GET /mmds; --metadata; sized by --mmds-size-limit). */
  mmds = new MmdsStore();
  /** Called with the VM once it is built, before its vCPUs run (e.g. to attach the serial console). */
  onStart: ((vm: LinuxVm) => void) | null = null;
  private resolveEnded!: (r: VmResult) => void;

  constructor(
    readonly id: string,
    private readonly serialOutFd: number,
    private readonly log: (line: string) => void,
  ) {
    this.ended = new Promise((resolve) => (this.resolveEnded = resolve));
  }

  private logFd = -1;
  /** The seccomp programs the VM's threads load at InstanceStart (null: --no-seccomp). */
  seccomp: SeccompPrograms | null = null;
  /** Every image a drive of the running VM has opened (and so holds locked until the VM ends). */
  private readonly lockedImages: string[] = [];

  /**
   * A line for the VMM's log: always to stderr; with PUT /logger also to its log_path,
   * when `level` passes the configured one (Error < Warning < Info < Debug < Trace).
   */
  note(level: 'Error' | 'Warning' | 'Info' | 'Debug', text: string): void {
    this.log(text);
    const logger = this.settings.logger;
    if (!logger?.log_path) return;
    const order = ['Off', 'Error', 'Warning', 'Info', 'Debug', 'Trace'];
    if (order.indexOf(level) > order.indexOf(logger.level)) return;
    if (this.logFd < 0) return;
    this.emit(
      this.logFd,
      `${new Date().toISOString()} ${logger.show_level ? `[${level}] ` : ''}[${this.id}] ${text}\n`,
    );
  }

  /** Lines a full FIFO (no reader keeping up) did not take: dropped, never waited for. */
  dropped = 0;

  private emit(fd: number, line: string): void {
    try {
      writeSync(fd, line);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
      this.dropped++;
    }
  }

  /**
   * Opens a log or metrics path when it is configured, as Firecracker does: appending,
   * created if missing, and non-blocking, so a FIFO with no reader neither blocks the
   * VMM's main thread (the API, SIGTERM) nor loses the VMM its process: a full FIFO drops lines.
   */
  private openOutput(path: string, what: string): number {
    let fd: number;
    try {
      fd = openSync(
        path,
        fsConstants.O_RDWR | fsConstants.O_APPEND | fsConstants.O_CREAT | fsConstants.O_NONBLOCK,
        0o600,
      );
    } catch (err) {
      throw new ApiError(
        `Cannot open the ${what} file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
      );
    }
    // A file or a FIFO, as Firecracker's logger and metrics take; never a device or a /proc file.
    try {
      if (!isNullDevice(fd)) requireKind(fd, path, `the ${what} path`, ['regular file', 'FIFO']);
    } catch (err) {
      closeSync(fd);
      throw new ApiError(`Cannot use ${(err as Error).message}`);
    }
    return fd;
  }

  /** PUT /logger: the file is opened now, so a bad path is a 400 at once. */
  setLogger(logger: LoggerConfig): void {
    const fd = logger.log_path !== undefined ? this.openOutput(logger.log_path, 'log') : -1;
    if (this.logFd >= 0) closeSync(this.logFd);
    this.logFd = fd;
    this.settings.logger = logger;
  }

  /** Where the guest's serial output goes instead of stdout (PUT /serial); -1: stdout (or the serial socket). */
  private serialFileFd = -1;

  /**
   * PUT /serial: the guest's serial output to `path` (opened now, as the logger's: a
   * regular file or a FIFO, appending, non-blocking; a FIFO nobody reads drops output
   * rather than stalling a vCPU). No path: back to stdout.
   */
  setSerial(path: string | undefined): void {
    const fd = path !== undefined ? this.openOutput(path, 'serial output') : -1;
    if (this.serialFileFd >= 0) closeSync(this.serialFileFd);
    this.serialFileFd = fd;
  }

  /** PUT /metrics: the file is opened now. */
  setMetrics(metrics: MetricsConfig): void {
    const fd = this.openOutput(metrics.metrics_path, 'metrics');
    if (this.metricsFd >= 0) closeSync(this.metricsFd);
    this.metricsFd = fd;
    this.settings.metrics = metrics;
    this.startMetricsTimer();
  }

  get state(): InstanceState {
    if (!this.live) return 'Not started';
    return this.paused ? 'Paused' : 'Running';
  }

  get started(): boolean {
    return this.live !== null;
  }

  /** Applies a change to the configuration, or throws its fault and changes nothing. */
  apply(change: ConfigChange): void {
    this.config = this.check(change);
  }

  /**
   * PUT /network-interfaces: the TAP is opened now, as Firecracker opens it at the PUT, so
   * a name the host refuses (busy, no permission, not a TAP) is a 400 here; it is closed
   * again (a TAP nobody made persistent goes with it) and opened for good at the start.
   */
  setNetworkInterface(change: ConfigChange, id: string): void {
    const next = this.check(change);
    const tap = next.nets.find((n) => n.id === id)?.tap;
    if (tap !== undefined) {
      let fd: number;
      try {
        fd = openTap(tap);
      } catch (err) {
        if (err instanceof KilnError)
          throw new ApiError(`Could not create the network device: Open tap device failed: ${err.message}`);
        throw err;
      }
      closeSync(fd);
    }
    this.config = next;
  }

  /**
   * PUT /vsock: its Unix socket path is checked now, so a path the VMM could not bind at
   * the start is a 400 here: its directory must exist, and nothing may be there yet.
   */
  setVsock(change: ConfigChange): void {
    const next = this.check(change);
    const uds = next.vsock?.uds;
    if (uds !== undefined) {
      let dirOk = false;
      try {
        dirOk = statSync(dirname(uds)).isDirectory();
      } catch {
        // missing: said below
      }
      if (!dirOk) throw new ApiError(`Cannot use the vsock socket path ${uds}: its directory does not exist`);
      if (existsSync(uds) || isLink(uds))
        throw new ApiError(`Cannot use the vsock socket path ${uds}: something is already there (Address in use)`);
      if (Buffer.byteLength(uds) > 107)
        throw new ApiError(
          `Cannot use the vsock socket path ${uds}: longer than a Unix socket path may be (107 bytes)`,
        );
    }
    this.config = next;
  }

  /**
   * PUT or PATCH /machine-config. With `huge_pages: 2M` the host's hugetlb pool must have
   * the VM's memory free in 2 MiB pages now (an honest 400 where it has none); the pages
   * are taken at InstanceStart.
   */
  setMachineConfig(change: ConfigChange): void {
    const next = this.check(change);
    if (next.hugePages === '2M') {
      const pool = hugePagesFree();
      const need = Math.ceil((next.memoryMiB * 1024 * 1024) / (pool?.bytes ?? 2 * 1024 * 1024));
      if (pool && (pool.bytes !== 2 * 1024 * 1024 || pool.pages < need))
        throw new ApiError(
          pool.bytes !== 2 * 1024 * 1024
            ? `machine-config: huge_pages 2M needs 2 MiB huge pages; this host's are ${pool.bytes / 1024} KiB`
            : `machine-config: huge_pages 2M needs ${need} free 2 MiB huge pages for ${next.memoryMiB} MiB; this host has ${pool.pages} (raise vm.nr_hugepages)`,
        );
    }
    this.config = next;
  }

  /**
   * PUT /boot-source, with Firecracker's timing: the kernel (an ELF vmlinux or a bzImage)
   * and the initrd are opened and checked now, so a missing, unreadable or non-kernel
   * file is a 400 here rather than at InstanceStart.
   */
  setBootSource(change: ConfigChange): void {
    const next = this.check(change);
    const kernel = readHead(next.kernel!, 'kernel', KERNEL_HEADER_BYTES);
    if (!kernelFormatOf(kernel))
      throw new ApiError(
        `The kernel file ${next.kernel} is not a Linux kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no "HdrS" setup header)`,
      );
    if (next.initrd !== undefined) readHead(next.initrd, 'initrd', 0);
    this.config = next;
  }

  /**
   * PUT /drives/ID, with Firecracker's timing: the image is opened (read-write unless the
   * drive is read-only) and its lock taken now, so a missing, unwritable, locked or
   * non-disk file is a 400 here. The lock is let go again until InstanceStart takes it
   * for the VM's lifetime.
   */
  setDrive(change: ConfigChange, id: string): void {
    const next = this.check(change);
    const index = next.disks.findIndex((d) => d.id === id);
    const disk = next.disks[index]!;
    try {
      closeSync(openDisk(disk, index).fd);
    } catch (err) {
      if (err instanceof KilnError) throw new ApiError(`Unable to use the drive ${id}: ${err.message}`);
      throw err;
    }
    this.config = next;
  }

  /** The configuration `change` would make, checked; nothing is changed. */
  check(change: ConfigChange): VmConfig {
    this.notReceiving();
    const input = structuredClone(this.config) as unknown as Record<string, unknown>;
    change(input);
    try {
      return parseVmConfig(input);
    } catch (err) {
      if (err instanceof ConfigError) throw new ApiError(err.message);
      throw err;
    }
  }

  /** Throws the Firecracker fault for a pre-boot-only change after the start. */
  /** The whole VM's configuration, replacing anything configured so far (PUT /kiln/vm-config). */
  setVmConfig(body: unknown): void {
    try {
      this.config = parseVmConfig(body);
    } catch (err) {
      if (err instanceof ConfigError) throw new ApiError(`Invalid VM configuration: ${err.message}`);
      throw err;
    }
  }

  /** A change to MMDS's data store; one that does not fit is a 400 and changes nothing. */
  mmdsWrite(write: () => void): void {
    try {
      write();
    } catch (err) {
      if (err instanceof MmdsError) throw new ApiError(err.message);
      throw err;
    }
  }

  preBoot(): void {
    if (this.live) throw new ApiError(AFTER_START);
  }

  /** InstanceStart: builds the VM from the definition and starts its vCPUs. */
  async start(): Promise<void> {
    this.preBoot();
    this.notReceiving();
    const c = this.config;
    if (c.kernel === undefined) throw new ApiError('Cannot start microvm without kernel configuration.');
    const args = (c.cmdline ?? '').split(/\s+/);
    for (const [arg, why] of DROPPED_BOOT_ARGS)
      if (args.includes(arg)) this.note('Warning', `dropped \`${arg}\` from boot_args: ${why}`);
    let live: LinuxVm;
    try {
      live = createLinuxVm(c, { ...this.runtime(), ...(this.bootTimer ? { bootTimer: this.bootTimer } : {}) });
    } catch (err) {
      if (err instanceof KilnError) throw new ApiError(`Cannot start microvm: ${err.message}`);
      throw err;
    }
    this.adopt(live, c);
    await live.vm.start({ seccomp: this.seccomp });
    this.note(
      'Info',
      `InstanceStart: ${c.kernel} (${live.boot.format}), ${c.cpus} vCPU, ${c.memoryMiB} MiB, ${c.disks.length} drive(s), ${c.nets.length} network interface(s)`,
    );
    this.watchEnd(live);
  }

  /** How this process runs a VM: the serial console's fd, and its log lines as warnings. */
  private runtime(): { serialOutFd: number; log: (line: string) => void; mmdsStore: SharedArrayBuffer } {
    return {
      serialOutFd: this.serialFileFd >= 0 ? this.serialFileFd : this.serialOutFd,
      log: (line) => this.note('Warning', line),
      mmdsStore: this.mmds.shared,
    };
  }

  /** Makes `live` this VMM's VM (built from `config`), before its vCPUs run. */
  private adopt(live: LinuxVm, config: VmConfig): void {
    this.config = config;
    this.live = live;
    this.balloon = live.virtio.balloon ? balloonControl(live.virtio.balloon) : null;
    this.lockedImages.push(...config.disks.map((d) => d.path));
    this.onStart?.(live);
  }

  /**
   * PUT /snapshot/create: the paused VM's state file and memory file; the VM stays paused.
   * Both files are written whole or not at all. A Diff's memory file holds only the pages
   * that changed since the last snapshot of this VM (or since it was started or loaded
   * with track_dirty_pages); any snapshot starts the next diff afresh, and a Full one
   * starts tracking on a VM that was not.
   */
  async createSnapshot(req: SnapshotCreate): Promise<void> {
    if (!this.live) throw new ApiError(BEFORE_START);
    this.notMigrating();
    if (!this.paused)
      throw new ApiError('Cannot create a snapshot while the microVM is running: pause it first (PATCH /vm Paused).');
    const live = this.live;
    if (req.type === 'Diff' && !live.vm.tracksDirtyPages)
      throw new ApiError(
        'Diff snapshots are not allowed on uVMs with dirty page tracking disabled: set track_dirty_pages (machine-config or /snapshot/load), or take a Full snapshot first (Kiln tracks from there on).',
      );
    const started = performance.now();
    let mem = { bytes: 0, written: 0 };
    try {
      const machine = await live.vm.saveMachine(() => {
        // Taken before writing: a Full snapshot starts the next diff afresh too. A VM that
        // was not tracking starts at its first Full, so a Diff can follow it (Kiln's own).
        const dirty = live.vm.tracksDirtyPages ? live.vm.takeDirtyPages() : null;
        if (!dirty) live.vm.startTrackingDirtyPages();
        mem =
          req.type === 'Diff'
            ? writeDiffMemoryFile(req.memFilePath, live.vm.memory, dirty!)
            : writeMemoryFile(req.memFilePath, live.vm.memory);
      });
      const body: VmmSnapshot = {
        kiln: KILN_VERSION,
        createdAt: new Date().toISOString(),
        config: this.config,
        boot: live.boot,
        compat: live.compat,
        memoryBytes: mem.bytes,
        memoryType: req.type,
        machine,
      };
      writeFileAtomically(req.snapshotPath, (fd) => writeAll(fd, encodeStateFile(body)));
    } catch (err) {
      if (err instanceof KilnError || (err as NodeJS.ErrnoException).code)
        throw new ApiError(`Cannot create the snapshot: ${(err as Error).message}`);
      throw err;
    }
    this.measured(req.type === 'Diff' ? 'diff_create_snapshot' : 'full_create_snapshot', started);
    this.note(
      'Info',
      `${req.type} snapshot created: ${req.snapshotPath}, memory ${req.memFilePath} (${mem.bytes} bytes, ${mem.written} written) in ${(performance.now() - started).toFixed(1)} ms`,
    );
  }

  /** Whether anything but the logger and metrics has been configured (a load must come first). */
  private get configured(): boolean {
    return JSON.stringify(this.config) !== JSON.stringify(parseVmConfig({}));
  }

  /**
   * PUT /snapshot/load, in a fresh kiln-vmm: the VM the snapshot was taken of, rebuilt
   * with its RAM mapped from the memory file (pages come in as the guest touches them),
   * its state restored, paused unless `resume_vm`. A load that fails leaves the VMM as it
   * was (nothing configured) and writes nothing.
   */
  async loadSnapshot(req: SnapshotLoad): Promise<void> {
    this.notMigrating();
    if (this.live || this.configured)
      throw new ApiError('Loading a microVM snapshot not allowed after configuring boot-specific resources.');
    const started = performance.now();
    let snapshot: VmmSnapshot;
    try {
      snapshot = readStateFile(req.snapshotPath) as VmmSnapshot;
    } catch (err) {
      throw new ApiError(`Cannot load the snapshot: ${(err as Error).message}`);
    }
    let config: VmConfig;
    try {
      const saved = parseVmConfig(snapshot.config);
      for (const id of req.networkOverrides.keys())
        if (!saved.nets.some((n) => n.id === id))
          throw new KilnError(`network_overrides: the snapshot has no network interface ${id}`);
      if (req.vsockUds !== undefined && !saved.vsock)
        throw new KilnError('vsock_override: the snapshot has no vsock device');
      config = parseVmConfig({
        ...saved,
        // The load's track_dirty_pages decides for the loaded VM (as Firecracker's).
        trackDirtyPages: req.trackDirtyPages,
        nets: saved.nets.map((n) =>
          req.networkOverrides.has(n.id) ? { ...n, tap: req.networkOverrides.get(n.id)!, passt: undefined } : n,
        ),
        ...(saved.vsock && req.vsockUds !== undefined
          ? {
              vsock: {
                ...saved.vsock,
                uds: req.vsockUds,
                ...(req.vsockCid !== undefined ? { guestCid: req.vsockCid } : {}),
              },
            }
          : {}),
      });
      if (!Array.isArray(snapshot.machine?.vcpus) || snapshot.machine.vcpus.length !== config.cpus)
        throw new KilnError(
          `the snapshot's state has ${snapshot.machine?.vcpus?.length ?? 0} vCPU(s), its configuration ${config.cpus}`,
        );
      if (snapshot.memoryBytes !== config.memoryMiB * 1024 * 1024)
        throw new KilnError(
          `the snapshot's memory (${snapshot.memoryBytes} bytes) does not match its configuration (${config.memoryMiB} MiB)`,
        );
    } catch (err) {
      throw new ApiError(`Cannot load the snapshot: ${(err as Error).message}`);
    }
    const read = performance.now();
    let built: number;
    let fd = -1;
    let live: LinuxVm | null = null;
    try {
      // File: guest RAM maps the memory file. Uffd: anonymous RAM, its pages filled by the
      // page-fault handler on backend_path, which gets it before anything touches it.
      if (req.backend === 'File') fd = openMemoryFile(req.memFilePath, snapshot.memoryBytes);
      live = createLinuxVm(config, this.runtime(), {
        memoryFileFd: fd,
        boot: snapshot.boot,
        compat: snapshot.compat,
      });
      if (fd >= 0) closeSync(fd);
      fd = -1;
      if (req.backend === 'Uffd') handOverToUffd(live.vm.memory, req.memFilePath);
      built = performance.now();
      live.vm.restoreMachine(snapshot.machine, { clockRealtime: req.clockRealtime });
    } catch (err) {
      if (fd >= 0) closeSync(fd);
      await live?.vm.destroy();
      if (err instanceof KilnError) throw new ApiError(`Cannot load the snapshot: ${err.message}`);
      throw err;
    }
    this.adopt(live, config);
    this.paused = !req.resume;
    const restored = performance.now();
    await live.vm.start({ seccomp: this.seccomp, restore: { vcpus: snapshot.machine.vcpus, paused: !req.resume } });
    // Once the vCPUs hold their restored LAPICs: a new generation ID, announced (the guest reseeds its RNG).
    live.newGeneration();
    const end = performance.now();
    const ms = (from: number, to: number) => (to - from).toFixed(1);
    this.measured('load_snapshot', started);
    this.note(
      'Info',
      `snapshot loaded: ${req.snapshotPath} (${config.cpus} vCPU, ${config.memoryMiB} MiB) in ${ms(started, end)} ms (state file ${ms(started, read)}, machine built ${ms(read, built)}, state restored ${ms(built, restored)}, threads started ${ms(restored, end)}); ${req.resume ? 'running' : 'paused'}`,
    );
    this.watchEnd(live);
  }

  /** The migration under way or last run (GET /migration shows its progress). */
  private migration: OutgoingMigration | IncomingMigration | null = null;

  /** Whether a migration has the VM now (pause, resume, snapshots and another migration wait). */
  private get migrating(): boolean {
    const p = this.migration?.progress.phase;
    return p !== undefined && p !== 'completed' && p !== 'failed';
  }

  /** Refuses configuring or starting a VMM that waits for (or takes) an incoming migration. */
  private notReceiving(): void {
    if (this.migration instanceof IncomingMigration && this.migration.progress.phase !== 'failed' && !this.live)
      throw new ApiError(
        'This microVM is waiting for an incoming migration: it takes its configuration from the source.',
      );
  }

  private notMigrating(): void {
    if (this.migrating) throw new ApiError('A live migration of this microVM is in progress (GET /migration).');
  }

  /**
   * PUT /migration/send: reaches the destination, proves the token and has it accept
   * the VM's configuration (any failure is this request's 400, the VM untouched), then
   * answers and moves the VM in the background. Once the destination runs it, this
   * process's VM ends (and kiln-vmm exits 0); if the migration fails the VM runs on here.
   */
  async sendMigration(req: SendRequest): Promise<void> {
    if (!this.live) throw new ApiError(BEFORE_START);
    this.notMigrating();
    const live = this.live;
    const out = new OutgoingMigration(
      { live, config: this.config, userPaused: this.paused, log: (text) => this.note('Info', text) },
      req,
    );
    this.migration = out;
    try {
      await out.connect();
    } catch (err) {
      if (err instanceof MigrationError) throw new ApiError(`Cannot migrate: ${err.message}`);
      throw err;
    }
    this.note('Info', `migration to ${out.progress.address} started`);
    void out.run().then(
      async () => {
        this.note(
          'Info',
          `migration to ${out.progress.address} completed in ${out.progress.total_ms} ms (at the stop: ${out.stopTimes}); this VMM ends`,
        );
        await live.vm.destroy();
      },
      (err: Error) =>
        this.note('Error', `migration to ${out.progress.address} failed; the VM runs on here: ${err.message}`),
    );
  }

  /**
   * PUT /migration/receive, in a fresh kiln-vmm: listens for a source; the VM it sends
   * becomes this VMM's once the source has let go.
   */
  async receiveMigration(req: ReceiveRequest): Promise<void> {
    if (this.live || this.configured)
      throw new ApiError('Receiving a migration is not allowed after configuring boot-specific resources.');
    this.notMigrating();
    if (req.memoryFd !== undefined)
      try {
        checkGuestMemoryFile(req.memoryFd, `migration/receive: \`memory_fd\` ${req.memoryFd}`);
      } catch (err) {
        if (err instanceof SharedMemoryError) throw new ApiError(err.message);
        throw err;
      }
    let incoming: IncomingMigration;
    try {
      incoming = new IncomingMigration(
        {
          runtime: this.runtime(),
          seccomp: this.seccomp,
          log: (text) => this.note('Info', text),
          adopt: (live, config, paused) => {
            this.adopt(live, config);
            this.paused = paused;
            this.watchEnd(live);
          },
        },
        req,
      );
      await incoming.listen();
    } catch (err) {
      if (err instanceof MigrationError) throw new ApiError(`Cannot receive a migration: ${err.message}`);
      throw err;
    }
    this.migration = incoming;
    this.note('Info', `waiting for a migration on ${incoming.progress.address}`);
  }

  /** GET /migration. */
  migrationProgress(): MigrationProgress {
    if (!this.migration) throw new ApiError('No migration has been started on this microVM.');
    return this.migration.progress;
  }

  private watchEnd(live: LinuxVm): void {
    void live.vm.wait().then(async (result) => {
      this.note('Info', `the VM ended: ${result.detail}`);
      await live.vm.destroy();
      this.resolveEnded(result);
    });
  }

  async pause(): Promise<void> {
    if (!this.live) throw new ApiError(BEFORE_START);
    this.notMigrating();
    const started = performance.now();
    await this.live.vm.pause();
    this.measured('pause_vm', started);
    this.paused = true;
    this.note('Info', 'paused');
  }

  resume(): void {
    if (!this.live) throw new ApiError(BEFORE_START);
    this.notMigrating();
    const started = performance.now();
    this.live.vm.resume();
    this.measured('resume_vm', started);
    this.paused = false;
    this.note('Info', 'resumed');
  }

  /** SendCtrlAltDel: Kiln's guests have no i8042 keyboard to press it on; the ACPI power button asks for the same orderly shutdown. */
  ctrlAltDel(): void {
    if (!this.live) throw new ApiError(BEFORE_START);
    this.live.pressPowerButton();
    this.note('Info', 'SendCtrlAltDel: pressed the ACPI power button');
  }

  /** PATCH /drives/{id} after the start: the drive's backing file changes under the running guest. */
  /** A running device's rate limiter (`drive:ID`, `net-rx:ID`, `net-tx:ID`): the device uses it from its next request. */
  setLimiter(key: string, config: RateLimiterConfig | undefined): void {
    const cells = this.live?.virtio.limiters.get(key);
    if (!cells) throw new ApiError(`No rate limiter ${key} on the running microVM`);
    cells.write(config);
    this.note('Info', `rate limiter ${key} changed`);
  }

  patchDrive(driveId: string, path: string): void {
    if (!this.live) throw new ApiError(BEFORE_START);
    const drive = this.config.disks.find((d) => d.id === driveId);
    if (!drive) throw new ApiError(`Invalid block device ID: ${driveId}`);
    const device = this.live.virtio.disks.get(driveId);
    if (!device) throw new ApiError(`Drive ${driveId} was added after the start and has no device`);
    let opened;
    try {
      // The same image again (resized, say): this VM holds its lock already, through the drive's first fd.
      const same = (a: string, b: string) => {
        try {
          const [x, y] = [statSync(a), statSync(b)];
          return x.dev === y.dev && x.ino === y.ino;
        } catch {
          return false;
        }
      };
      opened = openDisk(
        { path, readOnly: drive.readOnly, serial: drive.serial },
        0,
        this.lockedImages.some((p) => same(p, path)),
      );
      this.lockedImages.push(path);
    } catch (err) {
      throw new ApiError(`Unable to patch the block device: ${(err as Error).message}`);
    }
    this.live.vm.adoptFd(opened.fd);
    blkControl(device).swap(opened.fd, Number(opened.options.sectors));
    this.note('Info', `drive ${driveId} now backed by ${path}`);
  }

  setBalloonTarget(mib: number): void {
    if (!this.balloon) throw new ApiError(this.live ? 'The balloon device is not configured.' : BEFORE_START);
    this.balloon.setTargetPages(Math.floor((mib * 1024 * 1024) / 4096));
  }

  /** The running balloon, with free page hinting configured: Firecracker's errors otherwise. */
  private hinting(): BalloonControl {
    if (!this.config.balloon) throw new ApiError('The balloon device is not configured.');
    if (!this.config.balloon.freePageHinting)
      throw new ApiError(
        'Attempting to use hinting when not enabled: the balloon was configured without free_page_hinting.',
      );
    if (!this.balloon) throw new ApiError(BEFORE_START);
    return this.balloon;
  }

  /** PATCH /balloon/hinting/start: a new run; with `ackOnStop` the device ends it when the guest has sent all it found. */
  startHinting(ackOnStop: boolean): void {
    const cmd = this.hinting().startHinting(ackOnStop);
    this.note('Info', `balloon: free page hinting run ${cmd} started`);
  }

  /** PATCH /balloon/hinting/stop: the guest may use the pages it hinted again. */
  stopHinting(): void {
    this.hinting().stopHinting();
  }

  hintingStatus(): Record<string, number> {
    const s = this.hinting().hintingStatus();
    return { host_cmd: s.hostCmd, ...(s.guestCmd !== null ? { guest_cmd: s.guestCmd } : {}) };
  }

  balloonStats(): Record<string, number> {
    if (!this.balloon || !this.config.balloon) throw new ApiError('The balloon device is not configured.');
    if (this.config.balloon.statsIntervalS === 0)
      throw new ApiError('Statistics for the balloon device are not enabled');
    this.balloon.requestStats();
    const target = this.config.balloon.targetMiB;
    const actualPages = this.balloon.actualPages;
    // virtio 1.2, 5.5.6.3 tags -> Firecracker's names.
    const names = [
      'swap_in',
      'swap_out',
      'major_faults',
      'minor_faults',
      'free_memory',
      'total_memory',
      'available_memory',
      'disk_caches',
      'hugetlb_allocations',
      'hugetlb_failures',
    ];
    const stats: Record<string, number> = {
      target_pages: Math.floor((target * 1024 * 1024) / 4096),
      actual_pages: actualPages,
      target_mib: target,
      actual_mib: Math.floor((actualPages * 4096) / (1024 * 1024)),
    };
    names.forEach((name, tag) => {
      if (this.balloon!.statsUpdates > 0) stats[name] = Number(this.balloon!.stat(tag));
    });
    return stats;
  }

  /** API requests and other events since the last flush (metrics.ts). */
  readonly counters = new MetricCounters();
  private readonly deltas = new Deltas();
  /** The last duration measured of each operation, microseconds (Firecracker's latencies_us). */
  private readonly latencies: Record<string, number> = {};
  /** How long the process took to serve its API, from its (or its jailer's) start (api_server). */
  startup: { us: number; cpuUs: number } | null = null;
  private metricsTimer: NodeJS.Timeout | null = null;

  /** Records how long an operation took (latencies_us). */
  measured(name: string, startedMs: number): void {
    this.latencies[name] = Math.round((performance.now() - startedMs) * 1000);
  }

  /**
   * FlushMetrics (and every 60 s while a metrics path is set): one JSON line in
   * Firecracker's shape. Counters are what happened since the previous flush; the
   * aggregate `block` and `net` groups sum every drive and NIC, `block_ID` and `net_ID`
   * are each one's.
   */
  flushMetrics(): void {
    const m = this.settings.metrics;
    if (!m) throw new ApiError('Metrics are not configured (PUT /metrics first).');
    const line: Record<string, unknown> = {
      utc_timestamp_ms: Date.now(),
      api_server: {
        process_startup_time_us: this.startup?.us ?? 0,
        process_startup_time_cpu_us: this.startup?.cpuUs ?? 0,
      },
      ...this.counters.take(),
      vmm: {
        state: this.state,
        vcpus: this.config.cpus,
        dropped_log_lines: this.deltas.delta('vmm.dropped', this.dropped),
      },
      latencies_us: { ...this.latencies },
      // A call the filters forbid kills the process in the kernel (SIGSYS, which its parent
      // sees): no handler runs, so no live process has a fault to count.
      seccomp: { num_faults: 0 },
      signals: Object.fromEntries(
        Object.entries(this.signals).map(([name, n]) => [
          name,
          name === 'sigpipe' ? this.deltas.delta('signals.sigpipe', n) : n,
        ]),
      ),
    };
    const groups: Record<string, Record<string, number>> = {
      block: { rate_limiter_throttled_events: 0 },
      net: { rx_rate_limiter_throttled: 0, tx_rate_limiter_throttled: 0 },
      entropy: { entropy_rate_limiter_throttled: 0 },
      mmds: {},
    };
    const sum = (group: Record<string, number>, name: string, n: number) => (group[name] = (group[name] ?? 0) + n);
    for (const [key, counters] of this.live?.virtio.counters ?? []) {
      const [kind, id] = key.split(':') as [string, string];
      if (kind === 'vsock' || kind === 'balloon') {
        groups[kind] = Object.fromEntries(
          Object.entries(counters.read()).map(([name, total]) => [name, this.deltas.delta(`${kind}.${name}`, total)]),
        );
        continue;
      }
      const own: Record<string, number> = {};
      for (const [name, total] of Object.entries(counters.read())) {
        const d = this.deltas.delta(`${key}.${name}`, total);
        if (name.startsWith('mmds_')) sum(groups.mmds!, name.slice(5), d);
        else {
          own[name] = d;
          sum(kind === 'drive' ? groups.block! : groups.net!, name, d);
        }
      }
      groups[`${kind === 'drive' ? 'block' : 'net'}_${id}`] = own;
    }
    for (const [key, cells] of this.live?.virtio.limiters ?? []) {
      const d = this.deltas.delta(`${key}.throttled`, cells.throttled);
      const [kind, id] = key.split(':') as [string, string | undefined];
      const [group, name] =
        kind === 'drive'
          ? ['block', 'rate_limiter_throttled_events']
          : kind === 'net-rx'
            ? ['net', 'rx_rate_limiter_throttled']
            : kind === 'net-tx'
              ? ['net', 'tx_rate_limiter_throttled']
              : ['entropy', 'entropy_rate_limiter_throttled'];
      sum(groups[group]!, name, d);
      if (id !== undefined) sum((groups[`${group}_${id}`] ??= {}), name, d);
    }
    if (this.live)
      groups.vcpu = Object.fromEntries(
        Object.entries(this.live.vm.exitCounts()).map(([name, total]) => [
          name,
          this.deltas.delta(`vcpu.${name}`, total),
        ]),
      );
    Object.assign(line, groups);
    this.emit(this.metricsFd, `${JSON.stringify(line)}\n`);
  }

  /**
   * GET /kiln/counters (Kiln's own, for the manager's dashboard): the devices' totals since
   * the VM started, summed over the drives and the NICs; rates are the reader's to take.
   */
  counterTotals(): { block: { readBytes: number; writeBytes: number }; net: { rxBytes: number; txBytes: number } } {
    const out = { block: { readBytes: 0, writeBytes: 0 }, net: { rxBytes: 0, txBytes: 0 } };
    for (const [key, counters] of this.live?.virtio.counters ?? []) {
      const c = counters.read() as Record<string, number>;
      if (key.startsWith('drive:')) {
        out.block.readBytes += c.read_bytes ?? 0;
        out.block.writeBytes += c.write_bytes ?? 0;
      } else if (key.startsWith('net:')) {
        out.net.rxBytes += c.rx_bytes_count ?? 0;
        out.net.txBytes += c.tx_bytes_count ?? 0;
      }
    }
    return out;
  }

  /** Firecracker flushes the metrics every 60 s on its own; so does Kiln once a path is set. */
  private startMetricsTimer(): void {
    if (this.metricsTimer) return;
    this.metricsTimer = setInterval(() => {
      try {
        this.flushMetrics();
      } catch (err) {
        this.log(`metrics: ${(err as Error).message}`);
      }
    }, 60_000);
    this.metricsTimer.unref();
  }

  /**
   * Signals as Firecracker's metrics count them: SIGPIPE is counted and survived; a fatal
   * one (SIGHUP, SIGXFSZ, SIGXCPU) is logged, counted and flushed in a last metrics line
   * before the process ends (vmm-main.ts). SIGBUS, SIGSEGV and SIGILL keep their default
   * action: a handler would return to the faulting instruction (a JS listener runs later,
   * on the event loop), which faults again forever.
   */
  readonly signals = { sigbus: 0, sigsegv: 0, sigxfsz: 0, sigxcpu: 0, sigpipe: 0, sighup: 0, sigill: 0 };

  /**
   * Counts a signal the process survives (SIGPIPE). Only the first is logged: the log's own
   * stderr may be the broken pipe, and a line per signal would raise the next one.
   */
  countSignal(name: 'sigpipe'): void {
    if (this.signals[name]++ === 0)
      this.note('Error', 'Received signal 13, code 0. (Later ones are counted in the metrics only.)');
  }

  /** A fatal signal arrived: logged as Firecracker logs it and written in one last metrics line. */
  interceptedSignal(name: 'sighup' | 'sigxfsz' | 'sigxcpu', signo: number): void {
    this.signals[name] = 1;
    this.note('Error', `Shutting down VM after intercepting signal ${signo}, code 0.`);
    if (!this.settings.metrics) return;
    try {
      this.flushMetrics();
    } catch (err) {
      this.log(`metrics: ${(err as Error).message}`);
    }
  }

  /** SIGTERM or the end of the process: stop the VM if it runs. */
  async shutdown(): Promise<void> {
    if (this.migration instanceof IncomingMigration) this.migration.close();
    if (this.live) await this.live.vm.destroy();
    if (this.metricsTimer) clearInterval(this.metricsTimer);
    if (this.metricsFd >= 0) closeSync(this.metricsFd);
    if (this.logFd >= 0) closeSync(this.logFd);
    if (this.serialFileFd >= 0) closeSync(this.serialFileFd);
  }
}
