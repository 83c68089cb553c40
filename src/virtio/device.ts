// What every virtio device shares, whatever its transport: feature bits, device status,
// the shared state both the vCPU threads (transport registers) and the I/O thread
// (queue service) work on, and the I/O thread's runtime that hands queues to a device
// backend and raises its interrupts.
import type { SharedLock } from '../bus/shared-lock.js';
import { STATE_HEADER_BYTES } from '../devices/device.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { MSIX_CONTROL_ENABLE, MsixTable, msixStateBytes } from '../pci/msix.js';
import { array, layout } from '../kvm/struct.js';
import { DescriptorChain, QUEUE_RECORD, SplitQueue, VirtqueueError } from './queue.js';

// Device status bits (virtio 1.2, 2.1).
export const VIRTIO_STATUS_ACKNOWLEDGE = 1;
export const VIRTIO_STATUS_DRIVER = 2;
export const VIRTIO_STATUS_DRIVER_OK = 4;
export const VIRTIO_STATUS_FEATURES_OK = 8;
export const VIRTIO_STATUS_DEVICE_NEEDS_RESET = 0x40;
export const VIRTIO_STATUS_FAILED = 0x80;

// Reserved feature bits (6).
export const VIRTIO_F_RING_INDIRECT_DESC = 28n;
export const VIRTIO_F_RING_EVENT_IDX = 29n;
export const VIRTIO_F_VERSION_1 = 32n;

/** "No vector" for MSI-X vector registers (4.1.4.3). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

export const bit = (n: bigint) => 1n << n;

/** Transport-independent features every Kiln virtio device offers. */
export const TRANSPORT_FEATURES =
  bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_RING_EVENT_IDX);

/**
 * A device type: its identity, queues, features and configuration space (pure; any
 * thread), as functions of its own typed options `O` (a disk's size, a NIC's MAC).
 */
export interface VirtioDeviceType<O> {
  /** Virtio device ID (5): net 1, block 2, console 3, entropy 4, balloon 5, vsock 19. */
  readonly deviceId: number;
  readonly name: string;
  queues(options: O): number;
  readonly maxQueueSize: number;
  /** Device-specific feature bits offered. */
  features(options: O): bigint;
  /** Bytes of device configuration space. */
  configBytes(options: O): number;
  /** Fills the configuration space when the device is created (host side, once). */
  initConfig(config: DataView, options: O): void;
  /**
   * After a restore: writes what this VM's configuration decides over the snapshot's
   * configuration space (a clone's own vsock CID, which the guest reads again at the
   * transport reset sent after every restore). Absent: the snapshot's stands.
   */
  restoredConfig?(config: DataView, options: O): void;
  /** A guest write to device configuration; the default ignores it (read-only config). */
  configWrite?(config: DataView, offset: number, data: Uint8Array): void;
  /**
   * The host sends this device's backend requests while the VM runs (a balloon target,
   * a disk's new backing file): it gets an eventfd of its own, and a mailbox (mailbox.ts).
   */
  readonly controlChannel?: boolean;
  /** Extra shared bytes for device state both sides need (e.g. balloon statistics, the mailbox). */
  extraBytes?(options: O): number;
}

/** A device type bound to one device's options: plain numbers, what the transport and the state layout need. */
export interface VirtioDeviceInfo {
  readonly deviceId: number;
  readonly name: string;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly features: bigint;
  readonly configBytes: number;
  readonly extraBytes: number;
  readonly controlChannel: boolean;
  initConfig(config: DataView): void;
  restoredConfig(config: DataView): void;
  configWrite(config: DataView, offset: number, data: Uint8Array): void;
}

/** Binds a device type to its options. */
export function bindType<O>(type: VirtioDeviceType<O>, options: O): VirtioDeviceInfo {
  return {
    deviceId: type.deviceId,
    name: type.name,
    numQueues: type.queues(options),
    maxQueueSize: type.maxQueueSize,
    features: type.features(options),
    configBytes: type.configBytes(options),
    extraBytes: type.extraBytes?.(options) ?? 0,
    controlChannel: type.controlChannel === true,
    initConfig: (config) => type.initConfig(config, options),
    restoredConfig: (config) => type.restoredConfig?.(config, options),
    configWrite: (config, offset, data) => type.configWrite?.(config, offset, data),
  };
}

/** The transport-neutral fields at the start of a virtio device's shared state (64 bytes). */
const DEVICE_STATE = layout('virtio_device_state', [
  ['deviceFeatureSelect', 'u32'],
  ['driverFeatureSelect', 'u32'],
  ['driverFeaturesLo', 'u32'],
  ['driverFeaturesHi', 'u32'],
  ['configMsixVector', 'u16'],
  ['status', 'u8'],
  ['configGeneration', 'u8'],
  ['queueSelect', 'u16'],
  ['isr', 'u8'],
  ['intxAsserted', 'u8'],
  ['resets', 'u32'], // bumped at every device reset, so the I/O thread notices
  ['msixControl', 'u16'], // mirror of the MSI-X capability's Message Control
  ['errorLogged', 'u8'],
  ['_reserved', array('u8', 33)],
] as const);
const F = { ...DEVICE_STATE, fixedBytes: DEVICE_STATE.bytes } as const;

const align8 = (n: number) => Math.ceil(n / 8) * 8;

/** A queue's transport fields, kept apart from its ring's record (QUEUE_RECORD). */
export const QUEUE_TRANSPORT = layout('virtio_queue_transport', [
  /** The MSI-X vector the driver chose for this queue (VIRTIO_MSI_NO_VECTOR: none). */
  ['msixVector', 'u16'],
  ['_reserved', 'u16'],
  /** Guest-physical address an ioeventfd is registered at for this queue (0: none); survives a device reset. */
  ['eventfdAddr', 'u32'],
] as const);

/** The layout of one virtio device's shared state, and typed access to it. */
export class VirtioState {
  readonly view: DataView;
  readonly numQueues: number;
  readonly vectors: number;
  readonly queuesAt: number;
  readonly transportAt: number;
  readonly msixAt: number;
  readonly configAt: number;
  readonly configBytes: number;
  readonly extraAt: number;
  readonly deviceFeatures: bigint;

  static bytes(device: VirtioDeviceInfo): number {
    const queues = device.numQueues;
    return (
      F.fixedBytes +
      queues * QUEUE_RECORD.bytes +
      queues * QUEUE_TRANSPORT.bytes +
      align8(msixStateBytes(queues + 1)) +
      align8(device.configBytes) +
      device.extraBytes
    );
  }

  constructor(
    readonly state: SharedArrayBuffer,
    readonly type: VirtioDeviceInfo,
  ) {
    this.numQueues = type.numQueues;
    // One vector per queue plus one for configuration changes.
    this.vectors = this.numQueues + 1;
    this.view = new DataView(state, STATE_HEADER_BYTES);
    this.queuesAt = STATE_HEADER_BYTES + F.fixedBytes;
    this.transportAt = this.queuesAt + this.numQueues * QUEUE_RECORD.bytes;
    this.msixAt = this.transportAt + this.numQueues * QUEUE_TRANSPORT.bytes;
    this.configAt = this.msixAt + align8(msixStateBytes(this.vectors));
    this.configBytes = type.configBytes;
    this.extraAt = this.configAt + align8(this.configBytes);
    this.deviceFeatures = TRANSPORT_FEATURES | type.features;
  }

  queueRecord(q: number): DataView {
    return new DataView(this.state, this.queuesAt + q * QUEUE_RECORD.bytes, QUEUE_RECORD.bytes);
  }

  /** Queue `q`'s transport fields (QUEUE_TRANSPORT). */
  transportRecord(q: number): DataView {
    return new DataView(this.state, this.transportAt + q * QUEUE_TRANSPORT.bytes, QUEUE_TRANSPORT.bytes);
  }

  config(): DataView {
    return new DataView(this.state, this.configAt, this.configBytes);
  }

  extra(bytes: number): DataView {
    return new DataView(this.state, this.extraAt, bytes);
  }

  get status(): number {
    return this.view.getUint8(F.status);
  }
  set status(v: number) {
    this.view.setUint8(F.status, v);
  }
  /** Bumped at every change of the device configuration the driver is told of. */
  get configGeneration(): number {
    return this.view.getUint8(F.configGeneration);
  }
  get driverFeatures(): bigint {
    return (
      BigInt(this.view.getUint32(F.driverFeaturesLo, true)) |
      (BigInt(this.view.getUint32(F.driverFeaturesHi, true)) << 32n)
    );
  }
  /** The driver accepted `feature` (checked against the negotiated set; allocation-free for bits < 32). */
  negotiated(feature: bigint): boolean {
    const n = Number(feature);
    return n < 32
      ? (this.view.getUint32(F.driverFeaturesLo, true) & (1 << n)) !== 0
      : (this.view.getUint32(F.driverFeaturesHi, true) & (1 << (n - 32))) !== 0;
  }
  get resets(): number {
    return this.view.getUint32(F.resets, true);
  }
  get msixControl(): number {
    return this.view.getUint16(F.msixControl, true);
  }
  set msixControl(v: number) {
    this.view.setUint16(F.msixControl, v, true);
  }
  get configMsixVector(): number {
    return this.view.getUint16(F.configMsixVector, true);
  }
  get active(): boolean {
    const s = this.status;
    return (s & VIRTIO_STATUS_DRIVER_OK) !== 0 && (s & (VIRTIO_STATUS_DEVICE_NEEDS_RESET | VIRTIO_STATUS_FAILED)) === 0;
  }

  /** Field offsets for the transport. */
  static readonly fields = F;
}

/** How a device raises interrupts, whichever thread it is on. */
export class VirtioInterrupts {
  readonly msix: MsixTable;

  constructor(
    private readonly s: VirtioState,
    sendMsi: (lo: number, hi: number, data: number) => void,
    private readonly setIrq: (irq: number, level: 0 | 1) => void,
    private readonly intxGsi: number,
  ) {
    this.msix = new MsixTable(s.state, s.msixAt, s.vectors, () => s.msixControl, sendMsi);
  }

  private raise(vector: number, isrBit: number): void {
    if (this.s.msixControl & MSIX_CONTROL_ENABLE) {
      if (vector !== VIRTIO_MSI_NO_VECTOR) this.msix.notify(vector);
      return;
    }
    // INTx (4.1.4.5): the ISR says why; the line stays up until the driver reads the ISR.
    const v = this.s.view;
    v.setUint8(F.isr, v.getUint8(F.isr) | isrBit);
    if (this.intxGsi >= 0 && v.getUint8(F.intxAsserted) === 0) {
      v.setUint8(F.intxAsserted, 1);
      this.setIrq(this.intxGsi, 1);
    }
  }

  queue(q: number): void {
    this.raise(
      this.s.view.getUint16(
        this.s.transportAt - STATE_HEADER_BYTES + q * QUEUE_TRANSPORT.bytes + QUEUE_TRANSPORT.msixVector,
        true,
      ),
      1,
    );
  }

  config(): void {
    this.raise(this.s.configMsixVector, 2);
  }

  /** The driver read the ISR: returns it, clears it and lowers the line. */
  readIsr(): number {
    const v = this.s.view;
    const isr = v.getUint8(F.isr);
    v.setUint8(F.isr, 0);
    if (v.getUint8(F.intxAsserted) === 1) {
      v.setUint8(F.intxAsserted, 0);
      if (this.intxGsi >= 0) this.setIrq(this.intxGsi, 0);
    }
    return isr;
  }

  /** 2.1.2: the device hit an error it cannot recover from without a reset. */
  needsReset(why: string, log: (line: string) => void): void {
    const s = this.s;
    if (s.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET) return;
    s.status = s.status | VIRTIO_STATUS_DEVICE_NEEDS_RESET;
    if (s.view.getUint8(F.errorLogged) === 0) {
      s.view.setUint8(F.errorLogged, 1);
      log(`virtio-${s.type.name}: ${why}; the device needs a reset (further errors not logged)`);
    }
    if (s.status & VIRTIO_STATUS_DRIVER_OK) this.config();
  }
}

/** What a backend gets from the I/O thread: its queues, memory, interrupts. */
export interface VirtioQueues {
  readonly mem: GuestMemory;
  readonly state: VirtioState;
  /** One reusable chain for popping requests. */
  readonly chain: DescriptorChain;
  queue(q: number): SplitQueue;
  /** Interrupts the driver for queue `q` if it wants one (EVENT_IDX / NO_INTERRUPT). */
  notifyUsed(q: number): void;
  log(line: string): void;
  /** Starts or stops watching one of the backend's poll fds (e.g. no receive buffers left). */
  setPollable(fd: number, on: boolean): void;
  /**
   * Starts or stops waking the fd's handler when it becomes writable (a host peer that
   * stopped reading: the data waits, the handler runs again once there is room).
   */
  setWritable(fd: number, on: boolean): void;
  /** The device changed its configuration (e.g. link status): new generation, config interrupt. */
  configChanged(): void;
  /** Comes back to queue `q` after the other ready work (a drain that stopped at its budget). */
  kickLater(q: number): void;
  /** Comes back to queue `q` in `ms` milliseconds (a rate limiter holding a request back). */
  kickAfter(q: number, ms: number): void;
  /** Watches an fd the backend opened later (an accepted socket); `ready` runs under the device lock. */
  watchFd(fd: number, ready: () => void): void;
  unwatchFd(fd: number): void;
}

/** The I/O thread's fd watching, as the runtime hands it to backends. */
export interface FdWatcher {
  setPollable(fd: number, on: boolean): void;
  setWritable(fd: number, on: boolean): void;
  watch(fd: number, handler: () => void): void;
  unwatch(fd: number): void;
  /** Makes queue `q`'s notification fire again (its eventfd), behind what is already ready. */
  kick(q: number): void;
  /** kick(q), `ms` milliseconds from now (the device's timerfd; the earliest pending deadline wins). */
  kickAfter(q: number, ms: number): void;
}

/** A device's data path, on the I/O thread. Called with the device lock held. */
export interface VirtioBackend {
  /** The driver made buffers available on queue `q`. */
  queueNotified(q: number): void;
  /** Host fds to watch (TAP, sockets, terminal input), each with its handler. */
  readonly pollFds?: ReadonlyArray<{ readonly fd: number; ready(): void }>;
  /** The driver reset the device: drop per-session state. */
  reset?(): void;
  /** The VM was just restored from a snapshot: tell the driver what it must redo (vsock's transport reset). */
  restored?(): void;
  /** The VM is stopping. */
  close?(): void;
}

/**
 * The I/O thread's side of one device: takes the lock, checks the device is live,
 * (re)loads the ring addresses, runs the backend, and turns a hostile ring into
 * NEEDS_RESET instead of an exception that would stop every other device.
 */
export class VirtioRuntime implements VirtioQueues {
  readonly chain = new DescriptorChain();
  private readonly queues: SplitQueue[];
  private seenResets: number;
  backend: VirtioBackend | null = null;

  constructor(
    readonly mem: GuestMemory,
    readonly state: VirtioState,
    private readonly lock: SharedLock,
    readonly interrupts: VirtioInterrupts,
    readonly log: (line: string) => void,
    private readonly fds: FdWatcher,
  ) {
    const eventIdx = () => state.negotiated(VIRTIO_F_RING_EVENT_IDX);
    this.queues = Array.from(
      { length: state.numQueues },
      (_, q) => new SplitQueue(mem, state.queueRecord(q), eventIdx),
    );
    this.seenResets = state.resets;
  }

  queue(q: number): SplitQueue {
    return this.queues[q]!;
  }

  setPollable(fd: number, on: boolean): void {
    this.fds.setPollable(fd, on);
  }

  setWritable(fd: number, on: boolean): void {
    this.fds.setWritable(fd, on);
  }

  kickLater(q: number): void {
    this.fds.kick(q);
  }

  kickAfter(q: number, ms: number): void {
    this.fds.kickAfter(q, ms);
  }

  /** Host fds not watched because input came while the driver had the device stopped. */
  private readonly parked = new Set<number>();

  watchFd(fd: number, ready: () => void): void {
    this.fds.watch(fd, () => {
      if (this.run(ready)) return;
      this.parked.add(fd);
      this.fds.setPollable(fd, false);
    });
  }

  unwatchFd(fd: number): void {
    this.parked.delete(fd);
    this.fds.unwatch(fd);
  }

  configChanged(): void {
    const v = this.state.view;
    v.setUint8(F.configGeneration, (v.getUint8(F.configGeneration) + 1) & 0xff);
    if (this.state.status & VIRTIO_STATUS_DRIVER_OK) this.interrupts.config();
  }

  notifyUsed(q: number): void {
    const queue = this.queues[q]!;
    if (queue.shouldInterrupt()) this.interrupts.queue(q);
  }

  /** Runs `work` under the device lock if the driver has the device running; false if it does not. */
  run(work: () => void): boolean {
    this.lock.lock();
    try {
      if (this.state.resets !== this.seenResets) {
        this.seenResets = this.state.resets;
        this.backend?.reset?.();
      }
      if (!this.state.active) return false;
      if (this.parked.size > 0) {
        for (const fd of this.parked) this.fds.setPollable(fd, true);
        this.parked.clear();
      }
      for (const q of this.queues) if (q.enabled) q.load();
      work();
      return true;
    } catch (err) {
      // A hostile ring is the guest's fault; anything else is Kiln's, but it still only
      // takes this one device down, never the I/O thread and the other devices.
      const why =
        err instanceof VirtqueueError
          ? err.message
          : `internal error: ${err instanceof Error ? err.message : String(err)}`;
      this.interrupts.needsReset(why, this.log);
      return false;
    } finally {
      this.lock.unlock();
    }
  }

  /** The VM was restored from a snapshot (before any queue is looked at). */
  restored(): void {
    this.run(() => this.backend?.restored?.());
  }

  /** A queue notification (ioeventfd) arrived for `q`. */
  notified(q: number): void {
    this.run(() => {
      if (this.queues[q]!.enabled) this.backend?.queueNotified(q);
    });
  }
}
