// Free page hinting, driven through the balloon device with no VM (fake-driver.ts): the
// host starts a run with a new command ID, the driver answers with it and sends the free
// pages it holds, which are freed (read back as zeroes); hints outside the current run
// are left alone; the driver's STOP is answered with DONE when the run asked for it.
import assert from 'node:assert/strict';
import { closeSync, fstatSync } from 'node:fs';
import { after, test } from 'node:test';
import { createGuestMemoryFile } from '../../src/memory/shared-memory.js';
import {
  BALLOON_CONFIG,
  BalloonBackend,
  BalloonControl,
  HINT_CMD_DONE,
  HINT_CMD_STOP,
} from '../../src/virtio/balloon.js';
import { BALLOON_COUNTERS, DeviceCounters } from '../../src/virtio/counters.js';
import { FakeDevice, RAM_BYTES } from './fake-driver.js';

// Inflate 0, deflate 1, statistics 2, hinting 3, reporting 4 (Linux's numbering).
const HINTING = 3;
const PAGE = 4096;

const cmd = (id: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(id);
  return b;
};

test('a hinting run frees the pages the driver hints while it holds them, and only those', () => {
  const counters = new DeviceCounters(BALLOON_COUNTERS);
  const dev = new FakeDevice(
    {
      kind: 'balloon',
      options: { targetPages: 0, deflateOnOom: false, freePageHinting: true, counters: counters.shared },
    },
    { control: true },
  );
  after(() => dev.close());
  assert.equal(dev.queues, 5, 'the hinting queue is offered');
  const control = new BalloonControl(dev.state, dev.controlFd);
  const cmdId = () => dev.state.config().getUint32(BALLOON_CONFIG.freePageHintCmdId, true);
  // Guest memory with data everywhere, so a freed page shows as zeroes.
  dev.mem.fill(1 << 20, RAM_BYTES - (1 << 20), 0xa5);
  /** The driver hints a 3-page buffer; returns the whole page inside it that the device may free. */
  const hint = (lead?: number) => {
    const head = dev.offer(HINTING, [...(lead !== undefined ? [{ read: cmd(lead) }] : []), { write: 3 * PAGE }]);
    const { addr } = dev.writableOf(HINTING, head)[0]!;
    dev.mem.fill(addr, 3 * PAGE, 0xa5);
    return Math.ceil(addr / PAGE) * PAGE;
  };
  const freed = (page: number) => dev.mem.read(page, PAGE).every((b) => b === 0);
  const kept = (page: number) => dev.mem.read(page, PAGE).every((b) => b === 0xa5);

  assert.deepEqual(control.hintingStatus(), { hostCmd: HINT_CMD_STOP, guestCmd: null });
  // A hint with no run going: left alone.
  const early = hint();
  dev.notify(HINTING);
  assert.ok(kept(early), 'no run: nothing freed');

  // A run: the host's new ID reaches the configuration as a configuration change.
  const generation = dev.state.configGeneration;
  const run = control.startHinting(true);
  assert.ok(run >= 2, 'run IDs skip STOP and DONE');
  assert.equal(control.hintingStatus().hostCmd, run, 'shown at once');
  dev.poll();
  assert.equal(cmdId(), run);
  assert.equal(dev.state.configGeneration, generation + 1, 'the driver is told of a configuration change');

  // The driver answers with the run's ID and hints pages: they are freed.
  const a = hint(run);
  const b = hint();
  dev.notify(HINTING);
  assert.ok(freed(a) && freed(b), 'hinted pages read back as zeroes');
  assert.deepEqual(control.hintingStatus(), { hostCmd: run, guestCmd: run });
  assert.equal(dev.used(HINTING).length, 3, 'every buffer is returned, with length 0');
  assert.deepEqual(
    { count: counters.read().free_page_hint_count, freed: counters.read().free_page_hint_freed },
    { count: 2, freed: 2 * 3 * PAGE },
  );

  // The driver's STOP: acknowledged with DONE, after which hints are left alone.
  dev.offer(HINTING, [{ read: cmd(HINT_CMD_STOP) }]);
  dev.notify(HINTING);
  assert.equal(cmdId(), HINT_CMD_DONE);
  assert.deepEqual(control.hintingStatus(), { hostCmd: HINT_CMD_DONE, guestCmd: HINT_CMD_STOP });
  const late = hint();
  dev.notify(HINTING);
  assert.ok(kept(late), 'after DONE the guest may use its pages again: nothing freed');

  // A restored process: a new backend over the same (restored) state, woken by another
  // request (a new target), does not apply the run's old command again.
  const restored = new BalloonBackend(dev.runtime, dev.controlFd, { targetPages: 0, deflateOnOom: false });
  control.setTargetPages(16);
  dev.runtime.run(() => restored.pollFds[0]!.ready());
  assert.equal(dev.state.config().getUint32(BALLOON_CONFIG.numPages, true), 16, 'the new target applied');
  assert.equal(cmdId(), HINT_CMD_DONE, 'the old run is not started again');

  // A run without acknowledge_on_stop: hints from an older run are left alone, STOP is not
  // answered, and the host ends the run itself.
  const second = control.startHinting(false);
  assert.equal(second, run + 1);
  dev.poll();
  const stale = hint(run);
  // A command buffer of the wrong size is not a command.
  dev.offer(HINTING, [{ read: Buffer.alloc(8, 0xff) }]);
  dev.notify(HINTING);
  assert.ok(kept(stale), "a hint tagged with the previous run's ID is not freed");
  dev.offer(HINTING, [{ read: cmd(HINT_CMD_STOP) }]);
  dev.notify(HINTING);
  assert.equal(cmdId(), second, 'STOP not acknowledged');
  control.stopHinting();
  dev.poll();
  assert.equal(cmdId(), HINT_CMD_DONE);
  assert.equal(dev.needsReset, null);
});

test('without free_page_hinting the balloon offers no hinting queue', () => {
  const dev = new FakeDevice({ kind: 'balloon', options: { targetPages: 0, deflateOnOom: false } });
  after(() => dev.close());
  assert.equal(dev.queues, 4);
});

test('with shared guest memory (a memfd, kiln upgrade) hinted pages are punched out of the memory file', () => {
  const fd = createGuestMemoryFile(RAM_BYTES, false);
  const dev = new FakeDevice(
    { kind: 'balloon', options: { targetPages: 0, deflateOnOom: false, freePageHinting: true } },
    { control: true, sharedMemoryFd: fd },
  );
  after(() => {
    dev.close();
    closeSync(fd);
  });
  const control = new BalloonControl(dev.state, dev.controlFd);
  dev.mem.fill(1 << 20, RAM_BYTES - (1 << 20), 0xa5);
  const allocated = () => Number(fstatSync(fd).blocks) * 512;
  const run = control.startHinting(true);
  dev.poll();
  const head = dev.offer(HINTING, [{ read: cmd(run) }, { write: 64 * PAGE }]);
  const { addr } = dev.writableOf(HINTING, head)[0]!;
  dev.mem.fill(addr, 64 * PAGE, 0xa5);
  const whole = Math.ceil(addr / PAGE) * PAGE;
  const before = allocated();
  dev.notify(HINTING);
  // Measured before reading them: a read of a hole in a memfd allocates a page again.
  const left = allocated();
  // MADV_DONTNEED would leave a shared file's pages in the file: they would read back as 0xa5.
  assert.ok(
    dev.mem.read(whole, 63 * PAGE).every((b) => b === 0),
    'the hinted pages read back as zeroes through the mapping',
  );
  assert.ok(
    before - left >= 56 * PAGE,
    `the memory file gave back ${(before - left) / PAGE} pages of the 63 whole ones hinted (the used ring may take one)`,
  );
  assert.ok(
    dev.mem.read(RAM_BYTES - PAGE, PAGE).every((b) => b === 0xa5),
    'pages not hinted keep their data',
  );
});
