// The main thread's handle on the I/O thread (io-worker.ts): start it with the VM's
// virtio devices, stop it through an eventfd it polls.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Worker } from 'node:worker_threads';
import { startWorker } from '../warm-workers.js';
import type { DeviceSpec } from '../devices/catalogue.js';
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import { isLogMessage, type LogMessage } from '../log.js';
import type { GuestMemoryDescriptor } from '../memory/guest-memory.js';

export interface IoThreadInit {
  readonly memory: GuestMemoryDescriptor;
  readonly vmFd: number;
  readonly devices: readonly DeviceSpec<'virtio-pci'>[];
  readonly stopFd: number;
  /** Signalled to park the loop (snapshots): cell PARK_REQUEST says whether to, PARK_STATE whether it has. */
  readonly parkFd: number;
  readonly park: SharedArrayBuffer;
  /**
   * The VM was restored from a snapshot: each backend is told ('now': before the loop
   * starts; 'on-kick': at the first queue notification, which a migration's destination
   * sends once its source has let go, so that nothing is written into guest memory before
   * then: with shared memory (kiln upgrade), it is still the source's).
   */
  readonly restored?: 'now' | 'on-kick';
  /** The I/O thread's seccomp program (seccomp/policy.ts), loaded before its loop starts; null: none. */
  readonly seccomp: Uint8Array | null;
}

export const PARK_REQUEST = 0;
export const PARK_STATE = 1;
/** PARK_REQUEST's value for "stop": a parked loop ends without handling another event. */
export const PARK_STOP = 2;
/** Cell of the park buffer: 1 while the backends are still to be told of the restore ('on-kick'). */
export const RESTORE_PENDING = 2;

export class IoThread {
  private readonly worker: Worker;
  private readonly stopFd: number;
  private readonly parkFd: number;
  private readonly park = new SharedArrayBuffer(12);
  private readonly parkCells = new Int32Array(this.park);
  readonly ready: Promise<number>;
  readonly exited: Promise<string | null>;

  constructor(
    init: Omit<IoThreadInit, 'stopFd' | 'parkFd' | 'park'>,
    /** Where the I/O thread's log lines go (the VM's LogSink). */
    log: (source: string, line: string) => void,
  ) {
    this.stopFd = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
    this.parkFd = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
    if (this.stopFd < 0 || this.parkFd < 0) throw new KilnError(`eventfd failed: ${libc.errnoName(libc.errno())}`);
    if (init.restored === 'on-kick') Atomics.store(this.parkCells, RESTORE_PENDING, 1);
    this.worker = startWorker('io', { ...init, stopFd: this.stopFd, parkFd: this.parkFd, park: this.park });
    let failure: string | null = null;
    this.ready = new Promise((resolve, reject) => {
      this.worker.on('message', (m: { type: 'ready'; tid: number } | LogMessage) => {
        if (isLogMessage(m)) log(m.source, m.line);
        else resolve(m.tid);
      });
      this.worker.once('error', (err) => {
        failure = err.message;
        reject(new KilnError(`the I/O thread failed: ${err.message}`));
      });
    });
    this.exited = new Promise((resolve) => this.worker.once('exit', () => resolve(failure)));
  }

  /**
   * Ends the thread's loop behind the VM's back, as a crash would look to it (for tests;
   * a worker blocked in epoll_wait cannot be terminated from outside).
   */
  async endUnexpectedly(): Promise<void> {
    libc.signalEventfd(this.stopFd);
    await this.exited;
  }

  /**
   * Parks the loop between events (no device touches guest memory or its state until
   * unpark): what a snapshot needs for a consistent picture. Resolves once parked.
   */
  async parkLoop(): Promise<void> {
    Atomics.store(this.parkCells, PARK_REQUEST, 1);
    libc.signalEventfd(this.parkFd);
    let ended = false;
    void this.exited.then(() => (ended = true));
    // The loop parks within one event's work: poll for it (microseconds to a few ms).
    while (Atomics.load(this.parkCells, PARK_STATE) !== 1) {
      if (ended) throw new KilnError('the I/O thread ended');
      await sleep(1);
    }
  }

  unparkLoop(): void {
    Atomics.store(this.parkCells, PARK_REQUEST, 0);
    Atomics.notify(this.parkCells, PARK_REQUEST);
  }

  /**
   * Stops the loop; resolves with the error that ended it early, if any. A parked loop
   * ends where it is, without handling another event (a migrated VM's source: its guest
   * memory may be the destination's now).
   */
  async stop(): Promise<string | null> {
    Atomics.store(this.parkCells, PARK_REQUEST, PARK_STOP);
    Atomics.notify(this.parkCells, PARK_REQUEST);
    libc.signalEventfd(this.stopFd);
    const failure = await this.exited;
    libc.close(this.stopFd);
    libc.close(this.parkFd);
    return failure;
  }
}
