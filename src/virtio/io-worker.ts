// The I/O thread ("kiln_io"): one epoll loop over every virtio queue's eventfd (the
// ioeventfds KVM signals when the guest kicks a queue) and every backend's host fds
// (TAP, sockets, terminal). Device work happens here, never on a vCPU thread; a vCPU's
// kick costs it no exit to user space. Interrupts go back with KVM_SIGNAL_MSI (or the
// INTx line). The loop allocates nothing per event.
import { parentPort } from 'node:worker_threads';
import { workerInit } from '../warm-workers.js';
import { SharedLock } from '../bus/shared-lock.js';
import { LOCK_INDEX } from '../devices/device.js';
import { irqLineSetter, msiSender } from '../devices/irq.js';
import * as libc from '../kvm/libc.js';
import { GuestMemory } from '../memory/guest-memory.js';
import { createBackend } from './catalogue.js';
import { VirtioInterrupts, VirtioRuntime, type VirtioBackend } from './device.js';
import { PARK_REQUEST, PARK_STATE, PARK_STOP, RESTORE_PENDING, type IoThreadInit } from './io-thread.js';
import { virtioState } from './pci.js';
import { installProgram } from '../seccomp/install.js';
import { programAllows } from '../seccomp/bpf.js';
import { allowRings } from './uring.js';

// Started with its VM's details, or warm (warm-workers.ts): its modules loaded, waiting for them.
const init = await workerInit<IoThreadInit>();
const memory = GuestMemory.attach(init.memory);
const sendMsi = msiSender(init.vmFd);
const setIrq = irqLineSetter(init.vmFd);
/** A device's lines go to the VM's one log sink, named by the device (log.ts). */
const logFor = (source: string) => (line: string) => parentPort!.postMessage({ type: 'log', source, line });

const epfd = libc.epollCreate1(libc.EPOLL_CLOEXEC);
if (epfd < 0) throw new Error(`epoll_create1 failed: ${libc.errnoName(libc.errno())}`);
const handlers: Array<(() => void) | null> = [];
const slotOf = new Map<number, number>();
/** What each watched fd waits for: input (EPOLLIN) and/or room to write (EPOLLOUT). */
const interest = new Map<number, { read: boolean; write: boolean }>();
const eventBuf = Buffer.alloc(libc.EPOLL_EVENT_BYTES);
function control(op: number, fd: number, events: number, slot: number): number {
  eventBuf.writeUInt32LE(events, libc.EPOLL_EVENT_EVENTS);
  eventBuf.writeUInt32LE(slot, libc.EPOLL_EVENT_DATA);
  eventBuf.writeUInt32LE(0, libc.EPOLL_EVENT_DATA + 4);
  return libc.epollCtl(epfd, op, fd, eventBuf);
}
function watch(fd: number, handler: () => void): void {
  let slot = handlers.indexOf(null);
  if (slot < 0) slot = handlers.push(null) - 1;
  if (control(libc.EPOLL_CTL_ADD, fd, libc.EPOLLIN, slot) < 0)
    throw new Error(`epoll_ctl(${fd}) failed: ${libc.errnoName(libc.errno())}`);
  slotOf.set(fd, slot);
  interest.set(fd, { read: true, write: false });
  handlers[slot] = handler;
}
function unwatch(fd: number): void {
  const slot = slotOf.get(fd);
  if (slot === undefined) return;
  control(libc.EPOLL_CTL_DEL, fd, 0, slot);
  slotOf.delete(fd);
  interest.delete(fd);
  handlers[slot] = null;
}
/** Level-triggered: a backend with nowhere to put input stops watching until the guest gives it room. */
function setInterest(fd: number, change: { read?: boolean; write?: boolean }): void {
  const slot = slotOf.get(fd);
  const now = interest.get(fd);
  if (slot === undefined || now === undefined) return;
  Object.assign(now, change);
  control(libc.EPOLL_CTL_MOD, fd, (now.read ? libc.EPOLLIN : 0) | (now.write ? libc.EPOLLOUT : 0), slot);
}
const setPollable = (fd: number, on: boolean) => setInterest(fd, { read: on });
/** Level-triggered too: only while data waits for a peer that stopped reading. */
const setWritable = (fd: number, on: boolean) => setInterest(fd, { write: on });

/**
 * One timerfd per device: queues to come back to later (a rate limiter's wait), woken
 * together at the earliest deadline asked for.
 */
class DeviceTimer {
  readonly fd = libc.timerfdCreate(libc.CLOCK_MONOTONIC, libc.TFD_NONBLOCK | libc.TFD_CLOEXEC);
  private readonly queues = new Set<number>();
  private deadline = Infinity;
  private readonly sink = Buffer.alloc(8);

  constructor(private readonly kick: (q: number) => void) {
    if (this.fd < 0) throw new Error(`timerfd_create failed: ${libc.errnoName(libc.errno())}`);
  }

  kickAfter(q: number, ms: number): void {
    this.queues.add(q);
    const at = performance.now() + ms;
    if (at >= this.deadline) return;
    this.deadline = at;
    libc.armTimerfd(this.fd, Math.max(ms, 0.05));
  }

  fired(): void {
    libc.read(this.fd, this.sink, 8);
    this.deadline = Infinity;
    const queues = [...this.queues];
    this.queues.clear();
    for (const q of queues) this.kick(q);
  }
}

const backends: VirtioBackend[] = [];
const parkCells = new Int32Array(init.park);
/** A restore told 'on-kick': every backend learns of it at the first queue notification. */
const tellRestored = () => {
  if (Atomics.load(parkCells, RESTORE_PENDING) === 1 && Atomics.exchange(parkCells, RESTORE_PENDING, 0) === 1)
    for (const r of runtimes) r.restored();
};
const runtimes: VirtioRuntime[] = [];
// Devices batch through io_uring only where the filter this thread will load lets it enter a ring.
if (init.seccomp) allowRings(programAllows(init.seccomp, 'io_uring_enter'));
for (const spec of init.devices) {
  const state = virtioState(spec.state, spec.options);
  const interrupts = new VirtioInterrupts(state, sendMsi, setIrq, spec.options.intxGsi);
  const runtime = new VirtioRuntime(
    memory,
    state,
    new SharedLock(new Int32Array(spec.state, 0, 1), LOCK_INDEX),
    interrupts,
    logFor(spec.id),
    {
      setPollable,
      setWritable,
      watch,
      unwatch,
      kick: (q) => libc.signalEventfd(spec.options.notifyFds[q]!),
      kickAfter: (q, ms) => timer.kickAfter(q, ms),
    },
  );
  const timer = new DeviceTimer((q) => libc.signalEventfd(spec.options.notifyFds[q]!));
  watch(timer.fd, () => timer.fired());
  const backend = createBackend(spec.options.device, runtime, { controlFd: spec.options.controlFd });
  runtime.backend = backend;
  backends.push(backend);
  runtimes.push(runtime);
  spec.options.notifyFds.forEach((fd, q) =>
    watch(fd, () => {
      libc.drainEventfd(fd);
      tellRestored();
      runtime.notified(q);
    }),
  );
  // Input for a device the driver is not running (or that needs a reset) waits: stop
  // watching until the driver notifies a queue again, or a level-triggered fd would spin.
  for (const p of backend.pollFds ?? []) runtime.watchFd(p.fd, () => p.ready());
}
let running = true;
watch(init.stopFd, () => {
  running = false;
});
// A snapshot parks the loop: nothing here touches guest memory or device state until it is let go.
const park = new Int32Array(init.park);
watch(init.parkFd, () => {
  libc.drainEventfd(init.parkFd);
  if (Atomics.load(park, PARK_REQUEST) === 1) {
    Atomics.store(park, PARK_STATE, 1);
    Atomics.notify(park, PARK_STATE);
    while (Atomics.load(park, PARK_REQUEST) === 1) Atomics.wait(park, PARK_REQUEST, 1);
    Atomics.store(park, PARK_STATE, 0);
  }
  // Stopped while parked: no other event of this turn is handled.
  if (Atomics.load(park, PARK_REQUEST) === PARK_STOP) running = false;
});

if (init.restored === 'now') for (const r of runtimes) r.restored();

libc.pthreadSetnameNp(libc.pthreadSelf(), 'kiln_io');
if (init.seccomp) installProgram(init.seccomp, { allThreads: false });
parentPort!.postMessage({ type: 'ready', tid: libc.gettid() });

const MAX_EVENTS = 32;
const events = Buffer.alloc(MAX_EVENTS * libc.EPOLL_EVENT_BYTES);
while (running) {
  const n = libc.epollWait(epfd, events, MAX_EVENTS, -1);
  if (n < 0) {
    if (libc.errno() === libc.EINTR) continue;
    throw new Error(`epoll_wait failed: ${libc.errnoName(libc.errno())}`);
  }
  // A handler may unwatch an fd whose event is later in this batch: skip emptied slots.
  for (let i = 0; i < n && running; i++)
    handlers[events.readUInt32LE(i * libc.EPOLL_EVENT_BYTES + libc.EPOLL_EVENT_DATA)]?.();
}
for (const b of backends) b.close?.();
libc.close(epfd);
