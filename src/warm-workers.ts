// Worker threads started ahead of need: a Node isolate that has already loaded Kiln's
// modules (koffi, the KVM bindings, the device models) and waits for its VM's details
// in one message. kiln-vmm starts one vCPU and one I/O worker while it waits for its API,
// so InstanceStart and /snapshot/load do not pay for an isolate's start-up (most of a
// load's time otherwise). A worker that is not warm is started as before.
import { parentPort, Worker, workerData } from 'node:worker_threads';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * The CommonJS stubs the build writes beside each worker's entry (scripts/bundle.mjs): a
 * worker whose entry is an ES module first sets up Node's ES module loader in its isolate,
 * 15-20 ms of its start here (bench/RESULTS.md, startup).
 */
const URLS = {
  vcpu: new URL('./vcpu/worker.cjs', import.meta.url),
  io: new URL('./virtio/io-worker.cjs', import.meta.url),
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

/** What a warm worker gets as its workerData: a cell it sets once its modules are loaded. */
interface WarmData {
  warmLoaded: SharedArrayBuffer;
}
const loadedCells = new Map<Worker, Int32Array>();

/** Starts `count` workers of `kind` now; they wait (cheaply, blocked on their message port) for take(). */
export function prewarm(kind: WorkerKind, count = 1): void {
  for (let i = 0; i < count; i++) {
    const data: WarmData = { warmLoaded: new SharedArrayBuffer(4) };
    const w = new Worker(URLS[kind], { workerData: data, stdout: false, stderr: false, resourceLimits: LIMITS });
    loadedCells.set(w, new Int32Array(data.warmLoaded));
    // An idle warm worker must not keep the process alive.
    w.unref();
    w.once('exit', () => {
      loadedCells.delete(w);
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
    loadedCells.delete(w);
    w.ref();
    w.postMessage(init);
    return w;
  }
  return new Worker(URLS[kind], { workerData: init, stdout: false, stderr: false, resourceLimits: LIMITS });
}

/**
 * Ends the warm workers nobody took (before the process exits). A worker still loading
 * its modules is waited for first (up to 10 s): ending an isolate while koffi's native
 * module initialises aborts the whole process (koffi throws into a terminating
 * environment, which Node treats as fatal), so an early SIGTERM or a refused
 * configuration would otherwise end kiln-vmm with SIGABRT instead of its exit status.
 */
export async function endWarmWorkers(): Promise<void> {
  const all = [...warm.vcpu, ...warm.io];
  warm.vcpu.length = 0;
  warm.io.length = 0;
  const deadline = Date.now() + 10_000;
  for (const w of all) {
    while (loadedCells.has(w) && Atomics.load(loadedCells.get(w)!, 0) === 0 && Date.now() < deadline) await sleep(5);
  }
  await Promise.all(all.map((w) => w.terminate()));
}

/**
 * In a vCPU or I/O worker, once its modules are loaded: its VM's details — its
 * workerData when it was started for a VM, or (a warm worker) the first message, after
 * marking its modules loaded for endWarmWorkers.
 */
export async function workerInit<T>(): Promise<T> {
  const data = workerData as T | WarmData;
  if (!isWarmData(data)) return data;
  Atomics.store(new Int32Array(data.warmLoaded), 0, 1);
  return new Promise<T>((resolve) => parentPort!.once('message', resolve));
}

function isWarmData(data: unknown): data is WarmData {
  return (
    typeof data === 'object' && data !== null && (data as Partial<WarmData>).warmLoaded instanceof SharedArrayBuffer
  );
}
