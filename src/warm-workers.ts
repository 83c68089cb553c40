// Worker threads started ahead of need: a Node isolate that has already loaded Kiln's
// modules (koffi, the KVM bindings, the device models) and waits for its VM's details
// in one message. kiln-vmm starts one vCPU and one I/O worker while it waits for its API,
// so InstanceStart and /snapshot/load do not pay for an isolate's start-up (most of a
// load's time otherwise). A worker that is not warm is started as before.
import { Worker } from 'node:worker_threads';

const URLS = {
  vcpu: new URL('./vcpu/worker.js', import.meta.url),
  io: new URL('./virtio/io-worker.js', import.meta.url),
} as const;
export type WorkerKind = keyof typeof URLS;

/**
 * A vCPU or I/O thread allocates little on the JavaScript heap (its loops reuse their
 * buffers; guest memory and I/O buffers are outside the heap), so a small young generation
 * (V8's default is 16 MiB of semi-spaces per isolate) costs nothing in speed and a few
 * MiB of memory less per thread (bench/RESULTS.md, launch).
 */
const LIMITS = { maxYoungGenerationSizeMb: 2 } as const;

const warm: Record<WorkerKind, Worker[]> = { vcpu: [], io: [] };

/** Starts `count` workers of `kind` now; they wait (cheaply, blocked on their message port) for take(). */
export function prewarm(kind: WorkerKind, count = 1): void {
  for (let i = 0; i < count; i++) {
    const w = new Worker(URLS[kind], { workerData: null, stdout: false, stderr: false, resourceLimits: LIMITS });
    // An idle warm worker must not keep the process alive.
    w.unref();
    w.once('exit', () => {
      const list = warm[kind];
      const at = list.indexOf(w);
      if (at >= 0) list.splice(at, 1);
    });
    warm[kind].push(w);
  }
}

/** Starts workers of `kind` until `count` are warm. */
export function prewarmUpTo(kind: WorkerKind, count: number): void {
  prewarm(kind, count - warm[kind].length);
}

/**
 * A worker of `kind` running with `init`: a warm one (sent `init` as its first message)
 * when there is one, else a new one with `init` as its workerData.
 */
export function startWorker(kind: WorkerKind, init: unknown): Worker {
  const w = warm[kind].shift();
  if (w) {
    w.ref();
    w.postMessage(init);
    return w;
  }
  return new Worker(URLS[kind], { workerData: init, stdout: false, stderr: false, resourceLimits: LIMITS });
}

/** Ends the warm workers nobody took (at exit). */
export async function endWarmWorkers(): Promise<void> {
  const all = [...warm.vcpu, ...warm.io];
  warm.vcpu.length = 0;
  warm.io.length = 0;
  await Promise.all(all.map((w) => w.terminate()));
}
