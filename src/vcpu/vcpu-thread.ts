// The main thread's handle on one vCPU thread: start it, pause, resume and stop it
// (kicking it out of KVM_RUN with a signal), and learn how it ended.
import { constants as osConstants } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { startWorker } from '../warm-workers.js';
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import * as ctl from './control.js';
import type { VcpuExit, VcpuMessage, VcpuWorkerInit } from './messages.js';
import type { SavedVcpu } from '../snapshot/vcpu-state.js';

/** SIGUSR2 kicks vCPU threads; Node reserves SIGUSR1 for its inspector. */
export const KICK_SIGNAL = osConstants.signals.SIGUSR2;

export class VcpuThread {
  private readonly worker: Worker;
  private readonly cells: Int32Array;
  private thread: number | bigint | null = null;
  private alive = true;
  private pauseWaiters: Array<() => void> = [];
  private stateWaiter: ((state: SavedVcpu | Error) => void) | null = null;
  /** Linux thread id of the vCPU thread, once it is running. */
  tid = 0;
  /** Epoch milliseconds at which the thread first entered KVM_RUN. */
  firstRunAt = 0;
  readonly ready: Promise<void>;
  readonly exited: Promise<VcpuExit>;

  constructor(
    readonly init: VcpuWorkerInit,
    /** Where this thread's log lines go (the VM's LogSink). */
    log: (source: string, line: string) => void,
  ) {
    this.cells = new Int32Array(init.control);
    this.worker = startWorker('vcpu', init);
    let resolveReady!: () => void;
    let rejectReady!: (err: Error) => void;
    this.ready = new Promise((resolve, reject) => {
      resolveReady = resolve;
      rejectReady = reject;
    });
    let exit: VcpuExit | null = null;
    this.exited = new Promise((resolve) => {
      this.worker.on('message', (message: VcpuMessage) => {
        if (message.type === 'log') {
          log(message.source, message.line);
        } else if (message.type === 'ready') {
          this.thread = message.thread;
          this.tid = message.tid;
          this.firstRunAt = message.firstRunAt;
          resolveReady();
        } else if (message.type === 'paused') {
          const waiters = this.pauseWaiters;
          this.pauseWaiters = [];
          waiters.forEach((w) => w());
        } else if (message.type === 'state' || message.type === 'state-error') {
          const waiter = this.stateWaiter;
          this.stateWaiter = null;
          waiter?.(message.type === 'state' ? message.state : new KilnError(`vcpu${init.id}: ${message.error}`));
        } else {
          exit = message.exit;
        }
      });
      this.worker.on('error', (err) => {
        exit ??= { vcpu: init.id, reason: 'error', detail: err.message, exits: 0, runMs: 0 };
      });
      this.worker.on('exit', () => {
        this.alive = false;
        exit ??= {
          vcpu: init.id,
          reason: 'error',
          detail: 'the vCPU thread ended without reporting',
          exits: 0,
          runMs: 0,
        };
        rejectReady(new KilnError(`vcpu${init.id} failed to start: ${exit.detail}`));
        const waiters = this.pauseWaiters;
        this.pauseWaiters = [];
        waiters.forEach((w) => w());
        this.stateWaiter?.(new KilnError(`vcpu${init.id} ended: ${exit.detail}`));
        this.stateWaiter = null;
        resolve(exit);
      });
    });
  }

  get id(): number {
    return this.init.id;
  }

  get state(): number {
    return Atomics.load(this.cells, ctl.stateCell(this.id));
  }

  /** Interrupts KVM_RUN on the vCPU thread so it looks at its request cell. */
  private kick(): void {
    if (this.alive && this.thread !== null && this.state !== ctl.STATE_STOPPED)
      libc.pthreadKill(this.thread, KICK_SIGNAL);
  }

  private request(value: number): void {
    Atomics.store(this.cells, ctl.requestCell(this.id), value);
    Atomics.notify(this.cells, ctl.requestCell(this.id));
    this.kick();
  }

  /** Resolves once the vCPU is parked outside KVM_RUN (or has ended). */
  async pause(): Promise<void> {
    await this.ready.catch(() => undefined);
    if (!this.alive || this.state === ctl.STATE_STOPPED) return;
    const parked = new Promise<void>((resolve) => this.pauseWaiters.push(resolve));
    this.request(ctl.REQ_PAUSE);
    if (this.state === ctl.STATE_PAUSED) return;
    await parked;
  }

  /** The vCPU's whole state (snapshot/vcpu-state.ts), saved on its thread; it must be paused. */
  async saveState(): Promise<SavedVcpu> {
    if (!this.alive || this.state !== ctl.STATE_PAUSED) throw new KilnError(`vcpu${this.id} is not paused`);
    if (this.stateWaiter) throw new KilnError(`vcpu${this.id} is already saving its state`);
    const got = new Promise<SavedVcpu | Error>((resolve) => (this.stateWaiter = resolve));
    Atomics.store(this.cells, ctl.requestCell(this.id), ctl.REQ_SAVE);
    Atomics.notify(this.cells, ctl.requestCell(this.id));
    const state = await got;
    if (state instanceof Error) throw state;
    return state;
  }

  resume(): void {
    if (this.alive) this.request(ctl.REQ_RUN);
  }

  /** Asks the vCPU thread to stop and resolves with how it ended. */
  async stop(): Promise<VcpuExit> {
    await this.ready.catch(() => undefined);
    this.request(ctl.REQ_STOP);
    return this.exited;
  }

  /** Kicks the thread without changing its request (used when the VM is ending). */
  nudge(): void {
    this.kick();
  }
}
