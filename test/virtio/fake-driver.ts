// A virtio device with no VM: its real shared state, common configuration, runtime and
// backend, driven by a driver written here (negotiation, rings in plain host memory) and
// an fd watcher that polls with epoll like the I/O thread. For backend tests with host
// peers that misbehave, and for the fuzzer (test/fuzz), which feeds it hostile rings.
import { SharedLock } from '../../src/bus/shared-lock.js';
import { allocateDeviceState } from '../../src/devices/catalogue.js';
import { LOCK_INDEX } from '../../src/devices/device.js';
import * as libc from '../../src/kvm/libc.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { createBackend, type VirtioDeviceConfig } from '../../src/virtio/catalogue.js';
import { COMMON_CFG, commonConfig, type CommonConfig } from '../../src/virtio/common-config.js';
import {
  VIRTIO_STATUS_ACKNOWLEDGE,
  VIRTIO_STATUS_DRIVER,
  VIRTIO_STATUS_DRIVER_OK,
  VIRTIO_STATUS_FEATURES_OK,
  VirtioInterrupts,
  VirtioRuntime,
  type VirtioBackend,
} from '../../src/virtio/device.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/virtio/queue.js';
import { virtioState, type VirtioPciOptions } from '../../src/virtio/pci.js';

export const RAM_BYTES = 8 << 20;
export const QUEUE_SIZE = 256;
/**
 * Buffers a chain has in the descriptor table at most (a longer one is an indirect
 * table); the table's QUEUE_SIZE descriptors bound what may be outstanding at once.
 */
export const MAX_CHAIN = 4;
const RING_AREA = 0x10000;
const BUFFER_AREA = 0x100000;

/** Register accesses to a common configuration as numbers (little-endian, 1-8 bytes). */
export function registerAccess(cfg: CommonConfig): {
  read(offset: number, width: number): number;
  write(offset: number, value: number | bigint, width: number): void;
} {
  return {
    read(offset, width) {
      const data = new Uint8Array(width);
      cfg.read(offset, data);
      return data.reduce((acc, b, i) => acc + b * 2 ** (8 * i), 0);
    },
    write(offset, value, width) {
      const data = new Uint8Array(width);
      let v = BigInt(value);
      for (let i = 0; i < width; i++, v >>= 8n) data[i] = Number(v & 0xffn);
      cfg.write(offset, data);
    },
  };
}

/**
 * An entropy device's common configuration over fresh state and no VM (RAM is [0, 1 MiB),
 * interrupts go nowhere), for driving the register file directly.
 */
export function entropyCommonConfig() {
  const options: VirtioPciOptions = {
    device: { kind: 'rng', options: {} },
    notifyFds: [-1],
    intxGsi: -1,
    controlFd: -1,
  };
  const s = virtioState(allocateDeviceState('virtio-pci', options), options);
  const irq = new VirtioInterrupts(
    s,
    () => undefined,
    () => undefined,
    -1,
  );
  const memory = {
    findRegion: (at: number, bytes: number) => (at + bytes <= 1 << 20 ? 0 : -1),
  } as unknown as GuestMemory;
  const kicked: number[] = [];
  const logged: string[] = [];
  const cfg = commonConfig(s, irq, { memory, log: (l) => logged.push(l), kick: (q) => kicked.push(q) });
  return { s, cfg, ...registerAccess(cfg), kicked, logged };
}

export interface Buffer_ {
  /** Bytes the device reads. */
  readonly read?: Uint8Array;
  /** Room the device writes into. */
  readonly write?: number;
}

export interface UsedBuffer {
  readonly id: number;
  readonly len: number;
  /** What the device wrote, from the chain's writable buffers (up to len). */
  readonly written: Buffer;
}

export class FakeDevice {
  readonly mem: GuestMemory;
  readonly runtime: VirtioRuntime;
  readonly backend: VirtioBackend;
  readonly logged: string[] = [];
  /** Why the device asked for a reset (a hostile ring), if it did. */
  needsReset: string | null = null;
  interrupts = 0;
  private readonly address: bigint;
  private readonly handlers = new Map<number, () => void>();
  private readonly interest = new Map<number, { read: boolean; write: boolean }>();
  private readonly epfd: number;
  private nextBuffer = BUFFER_AREA;
  private readonly availIdx: number[];
  /** Each queue's next free descriptor (the driver's allocation cursor). */
  private readonly nextDesc: number[];
  private readonly usedSeen: number[];
  private readonly writable = new Map<string, Array<{ addr: number; len: number }>>();
  readonly queues: number;
  /** The device's state buffer and options (for an I/O thread of its own over the same device). */
  readonly shared: SharedArrayBuffer;
  readonly options: VirtioPciOptions;
  /** The device's shared state (for a host-side control object over it). */
  readonly state: ReturnType<typeof virtioState>;
  /** The device's control eventfd (with `{ control: true }`): the host's commands wake the backend through it. */
  readonly controlFd: number;

  constructor(
    device: VirtioDeviceConfig,
    /** `sharedMemoryFd`: guest RAM is that shared guest memory file (RAM_BYTES long), mapped shared. */
    /**
     * `refuse`: feature bits the driver does not accept (it accepts every other one offered).
     * `hugePages`: guest RAM asks for transparent huge pages, as `huge_pages: Transparent` does.
     */
    opts: {
      readonly control?: boolean;
      readonly sharedMemoryFd?: number;
      readonly refuse?: bigint;
      readonly hugePages?: boolean;
    } = {},
  ) {
    this.controlFd = opts.control ? libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC) : -1;
    const sharedRam = opts.sharedMemoryFd !== undefined;
    this.address = libc.mmap(
      null,
      RAM_BYTES,
      libc.PROT_READ | libc.PROT_WRITE,
      sharedRam ? libc.MAP_SHARED : libc.MAP_PRIVATE | libc.MAP_ANONYMOUS,
      opts.sharedMemoryFd ?? -1,
      0,
    );
    if (opts.hugePages) libc.madvise(this.address, RAM_BYTES, libc.MADV_HUGEPAGE);
    this.mem = GuestMemory.attach({
      regions: [{ slot: 0, guestPhysAddr: 0, size: RAM_BYTES, hostAddr: this.address }],
      shared: sharedRam,
    });
    const options: VirtioPciOptions = { device, notifyFds: [], intxGsi: -1, controlFd: -1 };
    const shared = allocateDeviceState('virtio-pci', options);
    this.shared = shared;
    this.options = options;
    const state = virtioState(shared, options);
    this.state = state;
    this.queues = state.numQueues;
    const irq = new VirtioInterrupts(
      state,
      () => void this.interrupts++,
      () => void this.interrupts++,
      -1,
    );
    const cfg = commonConfig(state, irq, { memory: this.mem, log: (l) => this.logged.push(l), kick: () => undefined });
    const { read, write } = registerAccess(cfg);
    write(COMMON_CFG.deviceStatus, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER, 1);
    for (const sel of [0, 1]) {
      write(COMMON_CFG.deviceFeatureSelect, sel, 4);
      const offered = read(COMMON_CFG.deviceFeature, 4);
      const refused = Number(((opts.refuse ?? 0n) >> BigInt(32 * sel)) & 0xffffffffn);
      write(COMMON_CFG.driverFeatureSelect, sel, 4);
      write(COMMON_CFG.driverFeature, (offered & ~refused) >>> 0, 4);
    }
    write(COMMON_CFG.deviceStatus, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK, 1);
    for (let q = 0; q < this.queues; q++) {
      const base = RING_AREA * (q + 1);
      write(COMMON_CFG.queueSelect, q, 2);
      write(COMMON_CFG.queueSize, QUEUE_SIZE, 2);
      write(COMMON_CFG.queueDesc, base, 8);
      write(COMMON_CFG.queueDriver, base + 0x1000, 8);
      write(COMMON_CFG.queueDevice, base + 0x2000, 8);
      write(COMMON_CFG.queueEnable, 1, 2);
    }
    write(
      COMMON_CFG.deviceStatus,
      VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK,
      1,
    );
    this.availIdx = Array.from({ length: this.queues }, () => 0);
    this.nextDesc = Array.from({ length: this.queues }, () => 0);
    this.usedSeen = Array.from({ length: this.queues }, () => 0);
    this.epfd = libc.epollCreate1(libc.EPOLL_CLOEXEC);
    const events = Buffer.alloc(libc.EPOLL_EVENT_BYTES);
    const control = (op: number, fd: number) => {
      const i = this.interest.get(fd) ?? { read: false, write: false };
      events.writeUInt32LE((i.read ? libc.EPOLLIN : 0) | (i.write ? libc.EPOLLOUT : 0), libc.EPOLL_EVENT_EVENTS);
      events.writeUInt32LE(fd, libc.EPOLL_EVENT_DATA);
      libc.epollCtl(this.epfd, op, fd, events);
    };
    this.runtime = new VirtioRuntime(
      this.mem,
      state,
      new SharedLock(new Int32Array(shared, 0, 1), LOCK_INDEX),
      irq,
      (line) => this.logged.push(line),
      {
        setPollable: (fd, on) => {
          const i = this.interest.get(fd);
          if (!i) return;
          i.read = on;
          control(libc.EPOLL_CTL_MOD, fd);
        },
        setWritable: (fd, on) => {
          const i = this.interest.get(fd);
          if (!i) return;
          i.write = on;
          control(libc.EPOLL_CTL_MOD, fd);
        },
        watch: (fd, handler) => {
          this.handlers.set(fd, handler);
          this.interest.set(fd, { read: true, write: false });
          control(libc.EPOLL_CTL_ADD, fd);
        },
        unwatch: (fd) => {
          control(libc.EPOLL_CTL_DEL, fd);
          this.handlers.delete(fd);
          this.interest.delete(fd);
        },
        kick: (q) => this.pendingKicks.add(q),
        kickAfter: (q, ms) => this.timedKicks.push({ q, ms }),
      },
    );
    const needsReset = irq.needsReset.bind(irq);
    irq.needsReset = (why, log) => {
      this.needsReset = why;
      needsReset(why, log);
    };
    this.backend = createBackend(device, this.runtime, { controlFd: this.controlFd });
    this.runtime.backend = this.backend;
    // A transport control fd of -1 (no VM here to send commands) is not watched.
    for (const p of this.backend.pollFds ?? []) if (p.fd >= 0) this.runtime.watchFd(p.fd, () => p.ready());
  }

  /** Queues whose drain stopped at its budget and asked to be run again. */
  readonly pendingKicks = new Set<number>();
  /** Kicks a backend asked for later (a rate limiter's wait): the test decides when they come. */
  readonly timedKicks: Array<{ q: number; ms: number }> = [];

  /** Writes a descriptor chain for `buffers` and makes it available on queue `q`; returns its head. */
  offer(q: number, buffers: readonly Buffer_[]): number {
    const base = RING_AREA * (q + 1);
    // Each chain takes the next free descriptors in the table, as many as its buffers (a
    // chain does not wrap around the table's end); one of more than MAX_CHAIN buffers is
    // an indirect table in the buffer area, named by one descriptor.
    const indirect = buffers.length > MAX_CHAIN;
    const taken = indirect ? 1 : buffers.length;
    let first = this.nextDesc[q]!;
    if (first + taken > QUEUE_SIZE) first = 0;
    this.nextDesc[q] = (first + taken) % QUEUE_SIZE;
    let table = base;
    let start = first;
    if (indirect) {
      if (this.nextBuffer + 16 * buffers.length > RAM_BYTES) this.nextBuffer = BUFFER_AREA;
      table = this.nextBuffer;
      start = 0;
      this.nextBuffer += 16 * buffers.length;
      const d = base + 16 * first;
      this.mem.writeU32(d, table);
      this.mem.writeU32(d + 4, 0);
      this.mem.writeU32(d + 8, 16 * buffers.length);
      this.mem.writeU16(d + 12, VIRTQ_DESC_F_INDIRECT);
      this.mem.writeU16(d + 14, 0);
    }
    const slots: Array<{ addr: number; len: number }> = [];
    buffers.forEach((b, i) => {
      const len = b.read ? b.read.length : (b.write ?? 0);
      if (this.nextBuffer + len > RAM_BYTES) this.nextBuffer = BUFFER_AREA;
      const addr = this.nextBuffer;
      this.nextBuffer += Math.max(len, 1);
      if (b.read) this.mem.write(addr, b.read);
      else slots.push({ addr, len });
      const d = table + 16 * (start + i);
      this.mem.writeU32(d, addr);
      this.mem.writeU32(d + 4, 0);
      this.mem.writeU32(d + 8, len);
      const more = i < buffers.length - 1;
      this.mem.writeU16(d + 12, (more ? VIRTQ_DESC_F_NEXT : 0) | (b.read ? 0 : VIRTQ_DESC_F_WRITE));
      this.mem.writeU16(d + 14, more ? start + i + 1 : 0);
    });
    const avail = base + 0x1000;
    const idx = this.availIdx[q]!;
    this.mem.writeU16(avail + 4 + 2 * (idx % QUEUE_SIZE), first);
    this.availIdx[q] = (idx + 1) & 0xffff;
    this.mem.writeU16(avail + 2, this.availIdx[q]!);
    this.writable.set(`${q}:${first}`, slots);
    return first;
  }

  /** Where the device-writable buffers of the chain at `head` on queue `q` are (guest addresses). */
  writableOf(q: number, head: number): ReadonlyArray<{ addr: number; len: number }> {
    return this.writable.get(`${q}:${head}`) ?? [];
  }

  /** The driver kicks queue `q`: the backend runs under the device lock, as on the I/O thread. */
  notify(q: number): void {
    this.runtime.run(() => this.backend.queueNotified(q));
  }

  /** New used-ring entries of queue `q`, with what the device wrote. */
  used(q: number): UsedBuffer[] {
    const used = RING_AREA * (q + 1) + 0x2000;
    const idx = this.mem.readU16(used + 2);
    const out: UsedBuffer[] = [];
    while (this.usedSeen[q] !== idx) {
      const at = used + 4 + 8 * (this.usedSeen[q]! % QUEUE_SIZE);
      const id = this.mem.readU32(at);
      const len = this.mem.readU32(at + 4);
      const parts: Buffer[] = [];
      let left = len;
      for (const s of this.writableOf(q, id)) {
        const n = Math.min(left, s.len);
        parts.push(Buffer.from(this.mem.read(s.addr, n)));
        left -= n;
      }
      out.push({ id, len, written: Buffer.concat(parts) });
      this.usedSeen[q] = (this.usedSeen[q]! + 1) & 0xffff;
    }
    return out;
  }

  /** One turn of the I/O loop: runs the handler of every watched fd that is ready now; returns how many ran. */
  poll(timeoutMs = 0): number {
    const events = Buffer.alloc(32 * libc.EPOLL_EVENT_BYTES);
    const n = libc.epollWait(this.epfd, events, 32, timeoutMs);
    for (let i = 0; i < n; i++)
      this.handlers.get(events.readUInt32LE(i * libc.EPOLL_EVENT_BYTES + libc.EPOLL_EVENT_DATA))?.();
    for (const q of [...this.pendingKicks]) {
      this.pendingKicks.delete(q);
      this.notify(q);
    }
    return Math.max(n, 0);
  }

  /** What the backend waits for on `fd`. */
  interestIn(fd: number): { read: boolean; write: boolean } | undefined {
    return this.interest.get(fd);
  }

  watchedFds(): number[] {
    return [...this.handlers.keys()];
  }

  close(): void {
    this.backend.close?.();
    libc.close(this.epfd);
    if (this.controlFd >= 0) libc.close(this.controlFd);
    libc.munmap(this.address, RAM_BYTES);
  }
}
