// A serial console nobody reads never stops the guest: the UART's output fd does not
// block a vCPU thread; bytes with no room are dropped (as on a real line) and said once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadProgram } from '../../src/guest/kit.js';
import * as libc from '../../src/kvm/libc.js';
import { MiB } from '../../src/layout.js';
import { addStandardDevices } from '../../src/platform/standard.js';
import { Vm } from '../../src/vm.js';
import { kvmSkip } from '../helpers.js';

test(
  'a guest writes 256 KiB to COM1 whose pipe nobody reads, and still runs to its end',
  { skip: kvmSkip },
  async () => {
    const fds = new Int32Array(2);
    // A blocking pipe (64 KiB), as a caller's stdout may be; its read end is never read.
    assert.equal(libc.pipe2(fds, libc.O_CLOEXEC), 0);
    const lines: string[] = [];
    const vm = Vm.create({ memoryBytes: 4 * MiB, vcpus: 1, log: (l) => lines.push(l) });
    try {
      addStandardDevices(vm, fds[1]!);
      loadProgram(vm, {
        mode: 'protected32',
        cpl: 3,
        source: `mov $PORT_COM1, %dx\n mov $0x40000, %ecx\n1: mov $0x41, %al\n out %al, %dx\n dec %ecx\n jnz 1b\n mov $PORT_DEBUG_EXIT, %dx\n mov $0, %al\n out %al, %dx`,
      });
      await vm.start();
      const result = await Promise.race([vm.wait(), sleep(300_000, null, { ref: false })]);
      if (result === null) {
        await vm.stop();
        assert.fail('the guest was stalled by a serial line nobody reads');
      }
      assert.equal(result.reason, 'guest-exit', result.detail);
      assert.ok(
        lines.some((l) => /serial output is not being read .*; output bytes are dropped/.test(l)),
        lines.join('\n'),
      );
    } finally {
      await vm.destroy();
      libc.close(fds[0]!);
      libc.close(fds[1]!);
    }
  },
);
