// The I/O thread parked (a snapshot's or a migration's stop) does no device work until it
// is let go, and stopped while parked it ends where it is: a migration's source keeps it
// parked from the state's save to its end, so no request is served there that the
// destination would not know of (with handed-over memory, one would corrupt its rings).
// A restored VM's vsock transport reset goes out as the thread starts ('now', a snapshot
// load) or at the first kick ('on-kick', a migration's destination at GO), never before.
// Driven with no VM: a virtio-rng device set up by the fake driver, its queue served by a
// real I/O thread over the same state and memory.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { DeviceSpec } from '../../src/devices/catalogue.js';
import * as libc from '../../src/kvm/libc.js';
import { IoThread } from '../../src/virtio/io-thread.js';
import { listenVsock } from '../../src/virtio/vsock.js';
import { tempDir } from '../helpers.js';
import { FakeDevice } from './fake-driver.js';

test('a parked I/O thread serves nothing, and stopped while parked it ends without serving what waits', async () => {
  const dev = new FakeDevice({ kind: 'rng', options: {} });
  const notify = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
  const spec = {
    id: 'rng',
    kind: 'virtio-pci',
    bus: 'pci',
    base: 1,
    size: 0,
    state: dev.shared,
    options: { ...dev.options, notifyFds: [notify] },
  } as DeviceSpec<'virtio-pci'>;
  const lines: string[] = [];
  const io = new IoThread({ memory: dev.mem.descriptor, vmFd: -1, devices: [spec], seccomp: null }, (_s, l) =>
    lines.push(l),
  );
  try {
    await io.ready;
    const served = async (want: number) => {
      let got = 0;
      for (let i = 0; i < 200 && got < want; i++) {
        got += dev.used(0).length;
        if (got < want) await sleep(5);
      }
      return got;
    };
    // Running: a kick is served.
    dev.offer(0, [{ write: 16 }]);
    libc.signalEventfd(notify);
    assert.equal(await served(1), 1, 'the running thread serves the request');
    // Parked: a kick waits.
    await io.parkLoop();
    dev.offer(0, [{ write: 16 }]);
    libc.signalEventfd(notify);
    await sleep(100);
    assert.equal(dev.used(0).length, 0, 'nothing is served while parked');
    // Stopped while parked: it ends, the waiting request never served.
    assert.equal(await io.stop(), null);
    assert.equal(dev.used(0).length, 0, 'the request that waited was not served on the way out');
    assert.deepEqual(lines, []);
  } finally {
    libc.close(notify);
    dev.close();
  }
});

test("a restored VM's vsock transport reset waits for the first kick ('on-kick': a migration's GO), or goes at once", async () => {
  for (const when of ['now', 'on-kick'] as const) {
    const { options } = listenVsock(join(tempDir(), 'v.sock'), 3);
    const dev = new FakeDevice({ kind: 'vsock', options });
    const notify = [0, 1, 2].map(() => libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK));
    const spec = {
      id: 'vsock',
      kind: 'virtio-pci',
      bus: 'pci',
      base: 1,
      size: 0,
      state: dev.shared,
      options: { ...dev.options, notifyFds: notify },
    } as DeviceSpec<'virtio-pci'>;
    // The guest's event queue (2) holds a buffer, as Linux's driver keeps one there.
    dev.offer(2, [{ write: 4 }]);
    const io = new IoThread(
      { memory: dev.mem.descriptor, vmFd: -1, devices: [spec], seccomp: null, restored: when },
      () => undefined,
    );
    try {
      await io.ready;
      await sleep(100);
      const early = dev.used(2);
      if (when === 'now') {
        assert.equal(early.length, 1, "'now': the reset is sent as the thread starts");
        assert.equal(early[0]!.written.readUInt32LE(0), 0, 'VIRTIO_VSOCK_EVENT_TRANSPORT_RESET');
        continue;
      }
      assert.equal(early.length, 0, "'on-kick': nothing is written into guest memory before the first kick");
      libc.signalEventfd(notify[0]!);
      let late = dev.used(2);
      for (let i = 0; i < 200 && late.length === 0; i++) {
        await sleep(5);
        late = dev.used(2);
      }
      assert.equal(late.length, 1, 'the first kick sends it');
      assert.equal(late[0]!.written.readUInt32LE(0), 0);
    } finally {
      await io.stop();
      notify.forEach((fd) => libc.close(fd));
      libc.close(options.listenFd);
      dev.close();
    }
  }
});
