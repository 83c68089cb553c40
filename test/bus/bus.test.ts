import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { accessValue, Bus, setAccessValue, type BusDevice } from '../../src/bus/bus.js';

function recorder(log: string[], readValue = 0): BusDevice {
  return {
    read(offset, data) {
      log.push(`r${offset}/${data.length}`);
      setAccessValue(data, readValue);
    },
    write(offset, data) {
      log.push(`w${offset}/${data.length}=${accessValue(data).toString(16)}`);
    },
  };
}

test('the bus routes accesses to the device with offsets relative to its base', () => {
  const bus = new Bus('test');
  const a: string[] = [];
  const b: string[] = [];
  bus.insert(0x3f8, 8, recorder(a, 0x60));
  bus.insert(0x80, 1, recorder(b));
  const data = new Uint8Array(1);
  assert.equal(bus.read(0x3fd, data), true);
  assert.equal(data[0], 0x60);
  assert.equal(bus.write(0x80, Uint8Array.of(0x42)), true);
  assert.equal(bus.write(0x3f8, Uint8Array.of(0x34, 0x12)), true);
  assert.deepEqual(a, ['r5/1', 'w0/2=1234']);
  assert.deepEqual(b, ['w0/1=42']);
});

test('a device whose handler throws goes out of service alone: reported once, then all-ones and ignored writes; its neighbours work on', () => {
  const bus = new Bus('test');
  const faults: string[] = [];
  bus.onFault = (base, err) => faults.push(`0x${base.toString(16)}: ${(err as Error).message}`);
  let calls = 0;
  bus.insert(0x10, 4, {
    read() {
      calls++;
      throw new Error('model bug');
    },
    write() {
      calls++;
    },
  });
  const ok: string[] = [];
  bus.insert(0x20, 4, recorder(ok, 0x7));
  const data = new Uint8Array(2);
  assert.equal(bus.read(0x10, data), true, 'the access is handled (the vCPU goes on)');
  assert.deepEqual([...data], [0xff, 0xff]);
  assert.equal(bus.write(0x12, Uint8Array.of(1)), true);
  assert.equal(bus.read(0x11, data), true);
  assert.deepEqual([...data], [0xff, 0xff]);
  assert.equal(calls, 1, 'the failed device is not called again');
  assert.deepEqual(faults, ['0x10: model bug']);
  assert.equal(bus.read(0x20, data), true);
  assert.deepEqual([...data], [7, 0]);
});

test('unmapped addresses report false and overlapping ranges are refused', () => {
  const bus = new Bus('test');
  bus.insert(0x100, 0x10, recorder([]));
  assert.equal(bus.read(0xff, new Uint8Array(1)), false);
  assert.equal(bus.write(0x110, new Uint8Array(1)), false);
  assert.throws(() => bus.insert(0x10f, 2, recorder([])), /overlaps 0x100-0x10f/);
  assert.throws(() => bus.insert(0x200, 0, recorder([])), /empty range/);
});

test('access values are little-endian up to 8 bytes', () => {
  const data = new Uint8Array(8);
  setAccessValue(data, 0x0102030405060);
  assert.deepEqual([...data], [0x60, 0x50, 0x40, 0x30, 0x20, 0x10, 0, 0]);
  assert.equal(accessValue(data), 0x0102030405060);
});

test('the shared lock gives mutual exclusion across threads', async () => {
  const shared = new SharedArrayBuffer(12);
  const cells = new Int32Array(shared);
  // Two threads each do 20000 unguarded read-modify-write increments under the lock.
  const run = () =>
    new Promise<void>((resolve, reject) =>
      new Worker(new URL('./lock-worker.js', import.meta.url), { workerData: shared })
        .on('exit', () => resolve())
        .on('error', reject),
    );
  await Promise.all([run(), run()]);
  assert.equal(cells[1], 40000);
  assert.equal(cells[0], 0, 'lock released');
});
