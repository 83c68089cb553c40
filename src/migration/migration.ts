// Live migration of a running VM between two kiln-vmm processes (wire.ts has the
// protocol). The source pre-copies guest memory while the guest runs, in iterations
// driven by the dirty log (KVM's, OR-ed with Kiln's own writes: Vm.takeDirtyPages),
// until what is left fits the downtime budget at the measured bandwidth; then it pauses
// the vCPUs, sends the last dirty pages and the machine's state, and ends once the
// destination has the VM ready. A guest that dirties memory faster than the link carries
// it is throttled (auto-converge: its vCPUs paused for a growing share of every 100 ms),
// and past the last step the migration gives up and the VM runs on at the source.
import { readFileSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { connect as tlsConnect, createServer as createTlsServer, type TLSSocket } from 'node:tls';
import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLinuxVm, type BootSummary, type LinuxRuntime, type LinuxVm } from '../boot/linux.js';
import type { CompatConfig } from '../compat/pvm.js';
import { parseVmConfig, type VmConfig } from '../config/vm-config.js';
import { KilnError } from '../errors.js';
import { PAGE_SIZE } from '../layout.js';
import { setDiskLocks } from '../platform/virtio.js';
import type { SeccompPrograms } from '../seccomp/policy.js';
import { decodeStateFile, encodeStateFile } from '../snapshot/format.js';
import { checkSameMemoryFile, memoryFileIdentity, type MemoryFileIdentity } from '../memory/shared-memory.js';
import { DISK_CHUNK_BYTES, type BlkOptions } from '../virtio/blk.js';
import { DiskSource, checkCopyTargets, diskBytes, diskOptions, syncDisks, writeChunk } from './disks.js';
import { KILN_VERSION } from '../version.js';
import { isLoopback } from '../host.js';
import type { MachineState } from '../vm.js';
import {
  FrameReader,
  Frame,
  MigrationError,
  PAGES_PER_FRAME,
  PROTOCOL,
  VERSIONS,
  formatAddress,
  frame,
  jsonFrame,
  newNonce,
  parseAddress,
  parseJson,
  proof,
  proofMatches,
  send,
  type Address,
} from './wire.js';

export { MigrationError } from './wire.js';

/** What GET /migration shows (one side's view). */
export interface MigrationProgress {
  role: 'send' | 'receive';
  phase: 'listening' | 'connecting' | 'pre-copy' | 'stop-and-copy' | 'completing' | 'completed' | 'failed';
  /** Pre-copy iterations done (0: the first whole pass is under way). */
  iteration: number;
  dirty_pages_left: number;
  pages_sent: number;
  bytes_sent: number;
  estimated_downtime_ms: number;
  throttle_percent: number;
  /** How guest memory moves: copied (pre-copy and the last dirty pages), or handed over (a local migration). */
  memory?: 'copied' | 'handed over';
  /** Bytes of disk images sent (copy_disks). */
  disk_bytes_sent?: number;
  /** The destination's address (send) or the address it listens on (receive). */
  address: string;
  /** Source pause to destination resume, measured on the destination (the hosts' clocks). */
  downtime_ms?: number;
  total_ms?: number;
  error?: string;
}

export interface SendRequest {
  readonly destination: string;
  readonly token: string;
  readonly downtimeMs: number;
  readonly maxBandwidthMiBs?: number;
  /** A CA certificate (PEM path): the connection is TLS and the destination's certificate is checked against it. */
  readonly tlsCa?: string;
  /** Pre-copy iterations before the migration gives up (auto-converge acts well before). */
  readonly maxIterations: number;
  readonly autoConverge: boolean;
  /** The disk images go with the VM (the destination has empty images of their sizes). */
  readonly copyDisks: boolean;
  /**
   * The destination is a VMM on this host that was handed this VM's shared guest memory
   * file (kiln upgrade): no memory is copied, only the machine's state at the stop.
   */
  readonly local: boolean;
}

export interface ReceiveRequest {
  readonly listen: string;
  readonly token: string;
  readonly tlsCert?: string;
  readonly tlsKey?: string;
  /** iface_id -> a TAP of this host (as snapshot/load's network_overrides). */
  readonly networkOverrides: ReadonlyMap<string, string>;
  readonly vsockUds?: string;
  /** drive_id -> this host's image for it (where a copied disk goes). */
  readonly diskOverrides: ReadonlyMap<string, string>;
  /**
   * An inherited fd of the source's shared guest memory file (kiln upgrade): the VM maps
   * it instead of receiving a copy, and only a source whose memory it is is taken.
   */
  readonly memoryFd?: number;
}

/** The first message after authentication: what the destination builds. */
interface Blueprint {
  readonly kiln: string;
  readonly config: VmConfig;
  readonly boot: BootSummary;
  readonly compat: CompatConfig | null;
  readonly memoryBytes: number;
  /** With copy_disks: the writable disks and their sizes (they come as DISK frames, indexed in this order). */
  readonly copiedDisks?: ReadonlyArray<{ readonly id: string; readonly bytes: number }>;
  /** A local migration: the source's shared guest memory file, which the destination must have been handed. */
  readonly sharedMemory?: MemoryFileIdentity;
}

interface FinalState {
  readonly machine: MachineState;
  /** The VM was paused by its user: it stays paused on the destination. */
  readonly paused: boolean;
  /** When the source's vCPUs stopped (epoch ms; downtime is measured from here). */
  readonly stoppedAt: number;
  /** Pre-copy iterations the source made (the destination reports them). */
  readonly iterations: number;
}

function startingProgress(
  role: MigrationProgress['role'],
  phase: MigrationProgress['phase'],
  address: Address,
): MigrationProgress {
  return {
    role,
    phase,
    iteration: 0,
    dirty_pages_left: 0,
    pages_sent: 0,
    bytes_sent: 0,
    estimated_downtime_ms: 0,
    throttle_percent: 0,
    address: formatAddress(address),
  };
}

/** Throttling steps: the share of every period the vCPUs are held paused. */
const THROTTLE_START = 20;
const THROTTLE_STEP = 20;
const THROTTLE_MAX = 80;
const THROTTLE_PERIOD_MS = 100;

// ---------------------------------------------------------------- the source

/** The source VM as the Vmm has it. */
export interface SourceVm {
  readonly live: LinuxVm;
  readonly config: VmConfig;
  /** Paused by its user (PATCH /vm). */
  readonly userPaused: boolean;
  readonly log: (text: string) => void;
}

/**
 * One outgoing migration. `connect()` reaches the destination, proves the token and has
 * the destination accept the configuration (each failure an error for the API call);
 * `run()` then moves the VM and resolves once the destination runs it (the caller ends
 * the source), or rejects with the VM running at the source as before.
 */
export class OutgoingMigration {
  readonly progress: MigrationProgress;
  private socket: Duplex | null = null;
  private reader: FrameReader | null = null;
  private throttle = 0;
  private throttleTimer: NodeJS.Timeout | null = null;
  private readonly started = Date.now();
  private readonly address: Address;

  constructor(
    private readonly vm: SourceVm,
    private readonly req: SendRequest,
  ) {
    this.address = parseAddress(req.destination, 'destination');
    this.progress = startingProgress('send', 'connecting', this.address);
  }

  async connect(): Promise<void> {
    try {
      const memoryFd = this.vm.live.vm.memory.memoryFd;
      if (this.req.local && memoryFd === null)
        throw new MigrationError(
          "a local migration hands guest memory over, and this VM's memory is private (sharedMemory off, or restored from a snapshot's memory file)",
        );
      if (this.req.local && this.req.copyDisks)
        throw new MigrationError(
          'a local migration leaves the disks where they are: give local or copy_disks, not both',
        );
      this.progress.memory = this.req.local ? 'handed over' : 'copied';
      const socket = await dial(this.address, this.req.tlsCa);
      this.socket = socket;
      const reader = new FrameReader(socket, 'the destination');
      this.reader = reader;
      const hello = parseJson(await reader.expect(Frame.HELLO, 'HELLO'), 'HELLO');
      if (hello.protocol !== PROTOCOL) throw new MigrationError('the destination does not speak Kiln migration');
      const theirs = Array.isArray(hello.versions) ? hello.versions.filter((v) => typeof v === 'number') : [];
      const version = Math.max(...VERSIONS.filter((v) => theirs.includes(v)), 0);
      if (version === 0)
        throw new MigrationError(
          `the destination speaks protocol version(s) ${theirs.join(', ') || 'none'}; this Kiln speaks ${VERSIONS.join(', ')}`,
        );
      const nonce = Buffer.from(typeof hello.nonce === 'string' ? hello.nonce : '', 'hex');
      if (nonce.length !== 32) throw new MigrationError('the destination sent a bad nonce');
      await send(socket, jsonFrame(Frame.AUTH, { version, proof: proof(this.req.token, nonce).toString('hex') }));
      await reader.expect(Frame.OK, 'the answer to the token');
      const blueprint: Blueprint = {
        kiln: KILN_VERSION,
        config: this.vm.config,
        boot: this.vm.live.boot,
        compat: this.vm.live.compat,
        memoryBytes: this.vm.config.memoryMiB * 1024 * 1024,
        ...(this.req.copyDisks
          ? {
              copiedDisks: diskOptions(this.vm.live.virtio, this.copiedIds()).map((d, i) => ({
                id: this.copiedIds()[i]!,
                bytes: diskBytes(d),
              })),
            }
          : {}),
        ...(this.req.local && memoryFd !== null ? { sharedMemory: memoryFileIdentity(memoryFd) } : {}),
      };
      await send(socket, frame(Frame.CONFIG, encodeStateFile(blueprint)));
      await reader.expect(Frame.OK, 'the answer to the configuration');
    } catch (err) {
      this.fail(err);
      throw this.asError(err);
    }
  }

  private asError(err: unknown): MigrationError {
    return err instanceof MigrationError ? err : new MigrationError((err as Error).message);
  }

  private fail(err: unknown): void {
    this.progress.phase = 'failed';
    this.progress.error = this.asError(err).message;
    void this.stopThrottle();
    this.socket?.destroy();
  }

  /** Moves the VM; on failure the VM runs on here (resumed unless its user paused it). */
  async run(): Promise<void> {
    const vm = this.vm.live.vm;
    let stopped = false;
    let unlocked = false;
    let parked = false;
    try {
      this.progress.phase = 'pre-copy';
      // A local migration copies no memory: the destination maps this VM's memory file.
      if (!this.req.local) await this.preCopy();
      // Stop and copy.
      this.holdPaused = true;
      stopped = true;
      await this.stopThrottle();
      this.progress.phase = 'stop-and-copy';
      const pausing = performance.now();
      if (!this.vm.userPaused) await vm.pause();
      const stoppedAt = Date.now();
      const paused = performance.now();
      let pagesDone = 0;
      // The I/O thread stays parked from here: a device's work after the state is saved
      // would be lost at the destination, and with handed-over memory would corrupt it.
      const machine = await vm.saveMachine(
        async () => {
          pagesDone = performance.now();
          if (this.req.local) return;
          const last = vm.takeDirtyPages();
          if (this.orDirty) last.forEach((bits, i) => bits.forEach((b, j) => (bits[j] = b | this.orDirty![i]![j]!)));
          this.progress.dirty_pages_left = countPages(last);
          await this.sendPages(last);
          if (this.disks) {
            // The I/O thread is parked: no write is under way, the record is complete.
            const lastDisk = this.disks
              .takeDirty()
              .map((c, i) => [...new Set([...c, ...(this.orDiskDirty?.[i] ?? [])])]);
            await this.sendDiskChunks(lastDisk, false);
          }
        },
        { keepParked: true },
      );
      parked = true;
      setDiskLocks(this.vm.live.virtio, false);
      unlocked = true;
      const saved = performance.now();
      const state: FinalState = { machine, paused: this.vm.userPaused, stoppedAt, iterations: this.progress.iteration };
      await send(this.socket!, frame(Frame.STATE, encodeStateFile(state)));
      const ms = (a: number, b: number) => (b - a).toFixed(1);
      this.stopTimes = `pausing ${ms(pausing, paused)} ms, vCPU and device state ${ms(paused, pagesDone)} ms, last pages ${ms(pagesDone, saved)} ms, state encoded and sent ${ms(saved, performance.now())} ms`;
      this.progress.phase = 'completing';
      await this.reader!.expect(Frame.READY, 'READY');
      await send(this.socket!, frame(Frame.GO));
      this.disks?.stopTracking();
      await new Promise<void>((resolve) => this.socket!.end(resolve));
      this.progress.dirty_pages_left = 0;
      this.progress.phase = 'completed';
      this.progress.total_ms = Date.now() - this.started;
    } catch (err) {
      this.holdPaused = false;
      this.disks?.stopTracking();
      this.fail(err);
      await this.stopThrottle();
      if (unlocked)
        try {
          setDiskLocks(this.vm.live.virtio, true);
        } catch (lockErr) {
          this.vm.log(`after the failed migration: ${(lockErr as Error).message}`);
        }
      if (parked) vm.unparkIo();
      if (stopped && !this.vm.userPaused) vm.resume();
      throw this.asError(err);
    }
  }

  /**
   * Pre-copy: every page and (copy_disks) disk chunk once, then what was dirtied meanwhile,
   * until what is left fits the downtime budget (it goes at the stop: orDirty, orDiskDirty).
   */
  private async preCopy(): Promise<void> {
    const vm = this.vm.live.vm;
    if (!vm.tracksDirtyPages) {
      // The log starts with the VM paused for an instant (a slot's flags change between runs).
      if (!this.vm.userPaused) await vm.pause();
      vm.startTrackingDirtyPages();
      if (!this.vm.userPaused) vm.resume();
    } else vm.takeDirtyPages();
    if (this.req.copyDisks) {
      this.disks = new DiskSource(diskOptions(this.vm.live.virtio, this.copiedIds()));
      this.disks.startTracking();
    }
    // Iteration 0: every page that is not zero (the destination's RAM starts zeroed),
    // and every disk chunk that is not (its images start empty).
    let t0 = performance.now();
    let sent = await this.sendPages(null);
    if (this.disks) sent += await this.sendDiskChunks(this.disks.allChunks(), true);
    let bandwidth = sent / Math.max(1, performance.now() - t0); // bytes per ms
    let previous = Infinity;
    let stalls = 0;
    for (;;) {
      const dirty = vm.takeDirtyPages();
      const dirtyDisk = this.disks?.takeDirty() ?? [];
      const diskChunks = dirtyDisk.reduce((n, c) => n + c.length, 0);
      const count = countPages(dirty) + (diskChunks * DISK_CHUNK_BYTES) / PAGE_SIZE;
      this.progress.dirty_pages_left = count;
      this.progress.estimated_downtime_ms = Math.round((count * PAGE_SIZE) / bandwidth);
      if (this.progress.estimated_downtime_ms <= this.req.downtimeMs) {
        // Not sent here: what was found now goes with the last of it, while paused.
        this.orDirty = dirty;
        this.orDiskDirty = dirtyDisk;
        break;
      }
      if (this.progress.iteration >= this.req.maxIterations)
        throw new MigrationError(
          `memory changes faster than the link carries it: ${count} pages still dirty after ${this.progress.iteration} iterations` +
            (this.req.autoConverge ? ` with the vCPUs throttled to ${this.throttle}%` : ' (auto-converge is off)') +
            `; the VM keeps running here`,
        );
      if (count > previous * 0.8) stalls++;
      previous = count;
      if (this.req.autoConverge && stalls >= 2 && this.throttle < THROTTLE_MAX) {
        this.setThrottle(this.throttle === 0 ? THROTTLE_START : this.throttle + THROTTLE_STEP);
        stalls = 0;
      }
      this.progress.iteration++;
      t0 = performance.now();
      sent = (await this.sendPages(dirty)) + (this.disks ? await this.sendDiskChunks(dirtyDisk, false) : 0);
      bandwidth = Math.max(bandwidth * 0.5, sent / Math.max(1, performance.now() - t0));
    }
  }

  /** The disks copy_disks copies: the writable ones (a read-only disk must be at the destination already). */
  private copiedIds(): string[] {
    return this.vm.config.disks.filter((d) => !d.readOnly).map((d) => d.id);
  }

  /** The disks copied with the VM (copy_disks), or null. */
  private disks: DiskSource | null = null;
  /** Disk chunks found dirty in the last pre-copy check, sent with the final ones. */
  private orDiskDirty: number[][] | null = null;

  /** Where the source's part of the downtime went (for the log). */
  stopTimes = '';

  /** Pages found dirty in the last pre-copy check, sent with the final ones. */
  private orDirty: Uint8Array[] | null = null;

  /**
   * Sends the pages `dirty` marks (null: every page that is not all zeros), in frames of
   * PAGES_PER_FRAME, at most max_bandwidth; resolves with the bytes sent.
   */
  private async sendPages(dirty: readonly Uint8Array[] | null): Promise<number> {
    const memory = this.vm.live.vm.memory;
    const zero = new Uint8Array(PAGE_SIZE);
    let bytesSent = 0;
    for (let region = 0; region < memory.regions.length; region++) {
      const bytes = memory.regionBytes(region);
      const pages = memory.regions[region]!.size / PAGE_SIZE;
      const bits = dirty?.[region];
      const batch: number[] = [];
      const flush = async () => {
        if (batch.length === 0) return;
        const payload = Buffer.allocUnsafe(8 + batch.length * 4 + batch.length * PAGE_SIZE);
        payload.writeUInt32LE(region, 0);
        payload.writeUInt32LE(batch.length, 4);
        const data = 8 + batch.length * 4;
        batch.forEach((p, k) => {
          payload.writeUInt32LE(p, 8 + k * 4);
          payload.set(bytes.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE), data + k * PAGE_SIZE);
        });
        bytesSent += await this.ship(Frame.PAGES, payload);
        this.progress.pages_sent += batch.length;
        batch.length = 0;
      };
      // The first pass skips a shared memory file's holes unread (reading one allocates it).
      const spans = (bits ? null : memory.allocatedRanges(region)) ?? [{ offset: 0, length: pages * PAGE_SIZE }];
      for (const span of spans) {
        const last = Math.ceil((span.offset + span.length) / PAGE_SIZE);
        for (let p = Math.floor(span.offset / PAGE_SIZE); p < last; p++) {
          if (bits) {
            if ((bits[p >>> 3]! & (1 << (p & 7))) === 0) continue;
          } else if (Buffer.compare(bytes.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE), zero) === 0) continue;
          batch.push(p);
          if (batch.length === PAGES_PER_FRAME) await flush();
        }
      }
      await flush();
    }
    return bytesSent;
  }

  /** Sends disk chunks (per disk, their indexes); the first pass skips chunks of zeros. */
  private async sendDiskChunks(chunks: readonly (readonly number[])[], firstPass: boolean): Promise<number> {
    let bytesSent = 0;
    for (let disk = 0; disk < chunks.length; disk++)
      for (const index of chunks[disk]!) {
        const payload = this.disks!.chunk(disk, index, firstPass);
        if (payload === null) continue;
        bytesSent += await this.ship(Frame.DISK, payload);
        this.progress.disk_bytes_sent = (this.progress.disk_bytes_sent ?? 0) + payload.length;
      }
    return bytesSent;
  }

  /** When sending began, for max_bandwidth. */
  private readonly rateFrom = performance.now();

  /** One frame sent, counted, and paced to max_bandwidth; resolves with its size. */
  private async ship(type: Frame, payload: Buffer): Promise<number> {
    await send(this.socket!, frame(type, payload));
    this.progress.bytes_sent += payload.length + 8;
    const limit = this.req.maxBandwidthMiBs !== undefined ? (this.req.maxBandwidthMiBs * 1024 * 1024) / 1000 : 0;
    if (limit > 0) {
      const ahead = this.progress.bytes_sent / limit - (performance.now() - this.rateFrom);
      if (ahead > 1) await sleep(ahead);
    }
    return payload.length;
  }

  /** Holds the vCPUs paused for `percent` of every THROTTLE_PERIOD_MS (auto-converge). */
  private setThrottle(percent: number): void {
    this.throttle = percent;
    this.progress.throttle_percent = percent;
    this.vm.log(`migration: the guest dirties memory faster than it can be sent; vCPUs throttled to ${percent}%`);
    if (this.throttleTimer) return;
    const vm = this.vm.live.vm;
    this.throttleTimer = setInterval(() => {
      if (this.throttleCycle || this.vm.userPaused) return;
      this.throttleCycle = (async () => {
        try {
          await vm.pause();
          await sleep((THROTTLE_PERIOD_MS * this.throttle) / 100);
        } finally {
          // Left paused when the stop-and-copy has taken over meanwhile.
          if (!this.holdPaused) vm.resume();
          this.throttleCycle = null;
        }
      })();
    }, THROTTLE_PERIOD_MS);
  }

  /** A throttling pause under way, and whether the migration keeps the vCPUs paused after it. */
  private throttleCycle: Promise<void> | null = null;
  private holdPaused = false;

  /** Ends throttling; resolves once a pause under way is over. */
  private async stopThrottle(): Promise<void> {
    if (this.throttleTimer) clearInterval(this.throttleTimer);
    this.throttleTimer = null;
    await this.throttleCycle?.catch(() => undefined);
  }
}

function countPages(bitmaps: readonly Uint8Array[]): number {
  let n = 0;
  for (const bits of bitmaps)
    for (const b of bits) {
      let v = b;
      while (v) {
        v &= v - 1;
        n++;
      }
    }
  return n;
}

function dial(address: Address, tlsCa: string | undefined): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) =>
      reject(new MigrationError(`cannot reach the destination ${formatAddress(address)}: ${err.code ?? err.message}`));
    const target = address.kind === 'unix' ? { path: address.path } : { host: address.host, port: address.port };
    let socket: Socket | TLSSocket;
    if (tlsCa !== undefined) {
      let ca: Buffer;
      try {
        ca = readFileSync(tlsCa);
      } catch (err) {
        return reject(new MigrationError(`cannot read tls_ca ${tlsCa}: ${(err as NodeJS.ErrnoException).code}`));
      }
      socket = tlsConnect({ ...target, ca, servername: address.kind === 'tcp' ? address.host : 'localhost' }, () =>
        resolve(socket),
      );
    } else socket = createConnection(target, () => resolve(socket));
    socket.setTimeout(30_000, () => socket.destroy(new Error('ETIMEDOUT')));
    socket.once('error', onError);
    socket.once('connect', () => socket.setTimeout(0));
  });
}

// ---------------------------------------------------------------- the destination

/** What the destination Vmm gives an incoming migration. */
export interface DestinationHost {
  readonly runtime: LinuxRuntime;
  readonly seccomp: SeccompPrograms | null;
  readonly log: (text: string) => void;
  /** Makes the migrated VM the Vmm's own, before its vCPUs run; `paused`: it stays paused. */
  readonly adopt: (live: LinuxVm, config: VmConfig, paused: boolean) => void;
}

/**
 * One incoming migration: listens (`listen()` resolves once it does), authenticates each
 * connection, builds the VM from the first good source's configuration and runs it once
 * the source lets go. A connection with a wrong token or an unknown version is refused
 * and the destination keeps listening; a source that fails after it began leaves
 * nothing running (the VM it was filling is destroyed).
 */
export class IncomingMigration {
  readonly progress: MigrationProgress;
  private server: Server | null = null;
  private claimed = false;
  private started = 0;
  /** Settles when the migration completed (the VM runs) or failed. */
  readonly done: Promise<void>;
  private settle!: (err?: Error) => void;

  constructor(
    private readonly host: DestinationHost,
    private readonly req: ReceiveRequest,
  ) {
    const address = parseAddress(req.listen, 'listen');
    if (address.kind === 'tcp' && req.tlsCert === undefined && !isLoopback(address.host))
      host.log(
        `migration: listening on ${req.listen} without TLS (give tls_cert and tls_key to encrypt the VM's memory)`,
      );
    this.progress = startingProgress('receive', 'listening', address);
    this.memoryFd = req.memoryFd ?? null;
    this.done = new Promise<void>((resolve, reject) => {
      this.settle = (err) => (err ? reject(err) : resolve());
    });
    this.done.catch(() => undefined);
  }

  async listen(): Promise<void> {
    const address = parseAddress(this.req.listen, 'listen');
    const onConnection = (socket: Duplex) => void this.serve(socket);
    let server: Server;
    if (this.req.tlsCert !== undefined || this.req.tlsKey !== undefined) {
      if (this.req.tlsCert === undefined || this.req.tlsKey === undefined)
        throw new MigrationError('give both tls_cert and tls_key, or neither');
      let cert: Buffer, key: Buffer;
      try {
        cert = readFileSync(this.req.tlsCert);
        key = readFileSync(this.req.tlsKey);
      } catch (err) {
        throw new MigrationError(`cannot read the TLS certificate or key: ${(err as NodeJS.ErrnoException).code}`);
      }
      server = createTlsServer({ cert, key }, onConnection);
    } else server = createServer(onConnection);
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) =>
        reject(new MigrationError(`cannot listen on ${this.req.listen}: ${err.code ?? err.message}`)),
      );
      if (address.kind === 'unix') server.listen(address.path, resolve);
      else server.listen(address.port, address.host, resolve);
    });
    server.on('error', (err) => this.host.log(`migration: ${err.message}`));
    this.server = server;
    const bound = server.address();
    if (bound && typeof bound === 'object')
      this.progress.address = formatAddress({ ...address, port: bound.port } as Address);
  }

  private closeServer(): void {
    this.server?.close();
    this.server = null;
  }

  private async serve(socket: Duplex): Promise<void> {
    const reader = new FrameReader(socket, 'the source');
    const refuse = async (message: string) => {
      await send(socket, jsonFrame(Frame.ERROR, { message })).catch(() => undefined);
      socket.end();
      this.host.log(`migration: refused a source: ${message}`);
    };
    let live: LinuxVm | null = null;
    let copyTargets: BlkOptions[] | null = null;
    let mine = false;
    try {
      if (this.claimed) return await refuse('a migration is already coming in here');
      const nonce = newNonce();
      await send(
        socket,
        jsonFrame(Frame.HELLO, { protocol: PROTOCOL, versions: VERSIONS, nonce: nonce.toString('hex') }),
      );
      const auth = parseJson(await reader.expect(Frame.AUTH, 'AUTH'), 'AUTH');
      if (typeof auth.version !== 'number' || !VERSIONS.includes(auth.version))
        return await refuse(`protocol version ${String(auth.version)} is not spoken here (${VERSIONS.join(', ')})`);
      if (!proofMatches(this.req.token, nonce, auth.proof)) return await refuse('wrong migration token');
      if (this.claimed) return await refuse('a migration is already coming in here');
      this.claimed = true;
      mine = true;
      this.started = Date.now();
      await send(socket, frame(Frame.OK));
      const blueprint = decodeStateFile(await reader.expect(Frame.CONFIG, 'CONFIG'), 'the configuration') as Blueprint;
      let config: VmConfig;
      try {
        config = this.configFor(blueprint);
        const handed = this.handedMemory(blueprint);
        this.progress.memory = handed ? 'handed over' : 'copied';
        live = createLinuxVm(config, this.host.runtime, {
          memoryFileFd: -1,
          boot: blueprint.boot,
          compat: blueprint.compat,
          deferDiskLocks: true,
          sharedMemory: handed || (config.sharedMemory ?? false),
          ...(handed ? { sharedMemoryFd: this.takeMemoryFd() } : {}),
        });
        if (blueprint.copiedDisks) {
          copyTargets = diskOptions(
            live.virtio,
            blueprint.copiedDisks.map((d) => d.id),
          );
          checkCopyTargets(
            copyTargets,
            blueprint.copiedDisks.map((d) => d.bytes),
          );
        }
      } catch (err) {
        if (!(err instanceof KilnError)) throw err;
        await live?.vm.destroy();
        live = null;
        // Nothing was built: this destination can still take a migration.
        this.claimed = false;
        mine = false;
        return await refuse(`cannot take this VM: ${err.message}`);
      }
      await send(socket, frame(Frame.OK));
      this.progress.phase = 'pre-copy';
      this.host.log(`migration: receiving ${config.cpus} vCPU, ${config.memoryMiB} MiB from a source`);
      const memory = live.vm.memory;
      let state: FinalState;
      let arrived = 0;
      for (;;) {
        const m = await reader.next();
        if (m.type === Frame.PAGES) {
          if (blueprint.sharedMemory) throw new MigrationError('the source sent pages of the memory it handed over');
          this.takePages(memory.regions.length, (i) => memory.regionBytes(i), m.payload);
          continue;
        }
        if (m.type === Frame.DISK) {
          if (!copyTargets) throw new MigrationError('the source sent disk data it did not announce');
          writeChunk(copyTargets, m.payload);
          this.progress.disk_bytes_sent = (this.progress.disk_bytes_sent ?? 0) + m.payload.length;
          this.progress.bytes_sent += m.payload.length + 8;
          continue;
        }
        if (m.type === Frame.STATE) {
          arrived = Date.now();
          state = decodeStateFile(m.payload, 'the migrated state') as FinalState;
          break;
        }
        if (m.type === Frame.ERROR) throw new MigrationError(`the source gave up`);
        throw new MigrationError(`the source sent frame type ${m.type} during the memory copy`);
      }
      this.progress.phase = 'completing';
      if (!Array.isArray(state.machine?.vcpus) || state.machine.vcpus.length !== config.cpus)
        throw new MigrationError(`the migrated state has the wrong number of vCPUs`);
      if (copyTargets) syncDisks(copyTargets);
      const synced = Date.now();
      live.vm.restoreMachine(state.machine);
      setDiskLocks(live.virtio, true);
      const restored = Date.now();
      await live.vm.start({
        seccomp: this.host.seccomp,
        restore: { vcpus: state.machine.vcpus, paused: true, kickLater: true },
      });
      const threads = Date.now();
      await send(socket, frame(Frame.READY));
      await reader.expect(Frame.GO, 'GO');
      const go = Date.now();
      this.host.adopt(live, config, state.paused);
      if (!state.paused) live.vm.resume();
      live.vm.kickQueues();
      this.progress.downtime_ms = Date.now() - state.stoppedAt;
      this.progress.iteration = typeof state.iterations === 'number' ? state.iterations : 0;
      this.progress.total_ms = Date.now() - this.started;
      this.progress.phase = 'completed';
      live = null;
      this.closeServer();
      socket.end();
      this.host.log(
        `migration: the VM runs here (downtime ${this.progress.downtime_ms} ms: the source's stop, last pages and state ${arrived - state.stoppedAt} ms, state decoded ${synced - arrived} ms (disk copies synced too), restored ${restored - synced} ms, threads started ${threads - restored} ms, READY to GO ${go - threads} ms; ${this.progress.pages_sent} pages, ${this.progress.total_ms} ms in all)`,
      );
      this.settle();
    } catch (err) {
      socket.destroy();
      if (!mine) return this.host.log(`migration: a connection failed before it began: ${(err as Error).message}`);
      const message = err instanceof KilnError ? err.message : (err as Error).message;
      this.progress.phase = 'failed';
      this.progress.error = message;
      this.closeServer();
      if (live) await live.vm.destroy();
      this.host.log(`migration: failed; nothing runs here: ${message}`);
      this.settle(new MigrationError(message));
    }
  }

  /**
   * Whether the source hands its guest memory over (a local migration): then this VMM
   * must have been given that very file (memory_fd); a VMM given one takes no other source.
   */
  private handedMemory(blueprint: Blueprint): boolean {
    const fd = this.req.memoryFd;
    if (blueprint.sharedMemory === undefined) {
      if (fd !== undefined)
        throw new KilnError(
          "this VMM was handed a guest memory file (memory_fd) and the source copies its memory: send with 'local'",
        );
      return false;
    }
    if (fd === undefined)
      throw new KilnError(
        'the source hands its guest memory over (a local migration); this VMM was given none (memory_fd)',
      );
    checkSameMemoryFile(fd, `memory_fd ${fd}`, blueprint.sharedMemory);
    if (blueprint.sharedMemory.bytes !== blueprint.memoryBytes)
      throw new KilnError(`the source's memory file does not hold its ${blueprint.memoryBytes} bytes of RAM`);
    return true;
  }

  /** The handed memory file's fd, once: the VM built on it owns it from here. */
  private takeMemoryFd(): number {
    const fd = this.memoryFd;
    if (fd === null) throw new KilnError('the guest memory file (memory_fd) was used by an earlier attempt');
    this.memoryFd = null;
    return fd;
  }

  /** memory_fd until a VM maps it. */
  private memoryFd: number | null = null;

  /** Checks a PAGES frame against this VM's memory and copies its pages in. */
  private takePages(regions: number, regionBytes: (i: number) => Uint8Array, payload: Buffer): void {
    if (payload.length < 8) throw new MigrationError('a PAGES frame is too short');
    const region = payload.readUInt32LE(0);
    const count = payload.readUInt32LE(4);
    if (region >= regions) throw new MigrationError(`a PAGES frame names memory region ${region} (of ${regions})`);
    if (count > PAGES_PER_FRAME || payload.length !== 8 + count * (4 + PAGE_SIZE))
      throw new MigrationError('a PAGES frame does not add up');
    const bytes = regionBytes(region);
    const pages = bytes.length / PAGE_SIZE;
    const data = 8 + count * 4;
    for (let k = 0; k < count; k++) {
      const p = payload.readUInt32LE(8 + k * 4);
      if (p >= pages) throw new MigrationError(`a PAGES frame names page ${p} of region ${region} (of ${pages})`);
      bytes.set(payload.subarray(data + k * PAGE_SIZE, data + (k + 1) * PAGE_SIZE), p * PAGE_SIZE);
    }
    this.progress.pages_sent += count;
    this.progress.bytes_sent += payload.length + 8;
  }

  /** The source's configuration with this host's overrides, checked whole. */
  private configFor(blueprint: Blueprint): VmConfig {
    const saved = parseVmConfig(blueprint.config);
    for (const id of this.req.networkOverrides.keys())
      if (!saved.nets.some((n) => n.id === id))
        throw new KilnError(`network_overrides: the VM has no network interface ${id}`);
    if (this.req.vsockUds !== undefined && !saved.vsock)
      throw new KilnError('vsock_override: the VM has no vsock device');
    for (const id of this.req.diskOverrides.keys())
      if (!saved.disks.some((d) => d.id === id)) throw new KilnError(`disk_overrides: the VM has no disk ${id}`);
    const config = parseVmConfig({
      ...saved,
      disks: saved.disks.map((d) =>
        this.req.diskOverrides.has(d.id) ? { ...d, path: this.req.diskOverrides.get(d.id)! } : d,
      ),
      nets: saved.nets.map((n) =>
        this.req.networkOverrides.has(n.id) ? { ...n, tap: this.req.networkOverrides.get(n.id)!, passt: undefined } : n,
      ),
      ...(saved.vsock && this.req.vsockUds !== undefined ? { vsock: { ...saved.vsock, uds: this.req.vsockUds } } : {}),
    });
    if (blueprint.memoryBytes !== config.memoryMiB * 1024 * 1024)
      throw new KilnError(`the source's memory (${blueprint.memoryBytes} bytes) does not match its configuration`);
    return config;
  }

  /** Stops listening (the Vmm is going away). */
  close(): void {
    this.closeServer();
  }
}
