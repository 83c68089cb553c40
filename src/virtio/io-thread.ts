// The main thread's handle on the I/O thread (io-worker.ts): start it with the VM's
// virtio devices, stop it through an eventfd it polls.
import { Worker } from 'node:worker_threads';
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
  /** The I/O thread's seccomp program (seccomp/policy.ts), loaded before its loop starts; null: none. */
  readonly seccomp: Uint8Array | null;
}

export class IoThread {
  private readonly worker: Worker;
  private readonly stopFd: number;
  readonly ready: Promise<number>;
  readonly exited: Promise<string | null>;

  constructor(
    init: Omit<IoThreadInit, 'stopFd'>,
    /** Where the I/O thread's log lines go (the VM's LogSink). */
    log: (source: string, line: string) => void,
  ) {
    this.stopFd = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
    if (this.stopFd < 0) throw new KilnError(`eventfd failed: ${libc.errnoName(libc.errno())}`);
    this.worker = new Worker(new URL('./io-worker.js', import.meta.url), {
      workerData: { ...init, stopFd: this.stopFd },
      stdout: false,
      stderr: false,
    });
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

  /** Stops the loop; resolves with the error that ended it early, if any. */
  async stop(): Promise<string | null> {
    libc.signalEventfd(this.stopFd);
    const failure = await this.exited;
    libc.close(this.stopFd);
    return failure;
  }
}
