// Worker for bus.test.ts: non-atomic read-modify-write increments under the shared lock.
import { workerData } from 'node:worker_threads';
import { SharedLock } from '../../src/bus/shared-lock.js';

const cells = new Int32Array(workerData as SharedArrayBuffer);
const lock = new SharedLock(cells, 0);
for (let i = 0; i < 20000; i++) {
  lock.lock();
  const value = cells[1]!;
  for (let spin = 0; spin < 5; spin++) Atomics.load(cells, 2);
  cells[1] = value + 1;
  lock.unlock();
}
