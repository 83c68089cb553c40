// A booted Linux through kiln-vmm's snapshot API. The fixture (test/linux-fixture.ts) is
// the kit's Linux booted to its shell and snapshotted by kiln-vmm; here it is loaded in a
// fresh kiln-vmm: its shell answers a command typed on the serial console, its entropy
// device gives bytes, its clock goes on from the snapshot. That restored VM is then
// snapshotted in turn (refused while running) and loaded in a third process, which
// still knows what was typed into the second. Bad loads are refused and change nothing.
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { VMGENID_ADDR } from '../../src/layout.js';
import { unixHttp } from '../../src/manager/manager.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { linuxSnapshotFixture } from '../linux-fixture.js';
import { ask, pauseAndSnapshot, put, startVmm } from '../vmm-driver.js';

const log = (line: string) => process.stderr.write(`# ${line}\n`);
const fault = (r: { body: unknown }) => (r.body as { fault_message?: string }).fault_message ?? '';

describe('kiln-vmm snapshots of a booted Linux', { skip: kvmSkip }, () => {
  test(
    'a Linux with a shell, loaded in a fresh kiln-vmm, answers on its console with its devices working, and snapshots again',
    { timeout: 15 * 60_000 },
    async () => {
      const fixture = await linuxSnapshotFixture(log);
      const dir = tempDir();
      const load = (state: string, memory: string, resume = true) => ({
        snapshot_path: state,
        mem_backend: { backend_type: 'File', backend_path: memory },
        resume_vm: resume,
      });
      const again = join(dir, 'again.snap');
      const againMem = join(dir, 'again.mem');
      const b = await startVmm(dir, 'restored');
      let uptime: number;
      try {
        // Bad loads first: each a 400 that leaves the process able to load.
        const corrupt = join(dir, 'corrupt.snap');
        const bytes = readFileSync(fixture.state);
        bytes[100] = bytes[100]! ^ 0xff;
        writeFileSync(corrupt, bytes);
        const bad = await unixHttp(b.api, 'PUT', '/snapshot/load', load(corrupt, fixture.memory));
        assert.equal(bad.status, 400);
        assert.match(fault(bad), /corrupted \(its checksum does not match\)/);
        const shortMem = join(dir, 'short.mem');
        writeFileSync(shortMem, Buffer.alloc(4096));
        const wrongSize = await unixHttp(b.api, 'PUT', '/snapshot/load', load(fixture.state, shortMem));
        assert.equal(wrongSize.status, 400);
        assert.match(fault(wrongSize), /is 4096 bytes; the snapshot's guest has 134217728 bytes of RAM/);
        const uffd = await unixHttp(b.api, 'PUT', '/snapshot/load', {
          snapshot_path: fixture.state,
          mem_backend: { backend_type: 'Uffd', backend_path: join(dir, 'uffd.sock') },
        });
        assert.equal(uffd.status, 400);
        assert.equal(((await unixHttp(b.api, 'GET', '/')).body as { state: string }).state, 'Not started');

        const t0 = Date.now();
        await put(b.api, '/snapshot/load', load(fixture.state, fixture.memory));
        log(`snapshot/load answered in ${Date.now() - t0} ms`);
        const twice = await unixHttp(b.api, 'PUT', '/snapshot/load', load(fixture.state, fixture.memory));
        assert.equal(twice.status, 400, 'a second load is refused');
        const late = await unixHttp(b.api, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128 });
        assert.equal(late.status, 400, 'configuring after a load is refused');
        assert.equal(((await unixHttp(b.api, 'GET', '/')).body as { state: string }).state, 'Running');
        await ask(b, 'echo restored-$((6*7))', /restored-42/, 120);
        await ask(b, 'head -c 16 /dev/hwrng | wc -c', /\n\s*16\s*\r?\n/, 60);
        // A new VM generation ID: Linux's vmgenid driver has the device, the GED interrupt
        // reached it (the kernel says it reseeded its RNG for a VM fork), and the ID it
        // reads is not the one in the snapshot.
        await ask(b, 'ls /sys/bus/acpi/drivers/vmgenid/', /VMGENCTR:00/, 60);
        await ask(
          b,
          "dmesg | grep -q 'crng reseeded due to virtual machine fork' && echo reseeded-$((40+2))",
          /reseeded-42/,
          60,
        );
        const saved = readFileSync(fixture.memory).subarray(VMGENID_ADDR, VMGENID_ADDR + 16);
        const fromGuest = await ask(
          b,
          `devmem ${VMGENID_ADDR} 64; devmem ${VMGENID_ADDR + 8} 64`,
          /0x[0-9A-F]{16}\s+0x[0-9A-F]{16}/,
          60,
        );
        const [lo, hi] = fromGuest.split(/\s+/).map((h) => BigInt(h));
        const now = Buffer.alloc(16);
        now.writeBigUInt64LE(lo!, 0);
        now.writeBigUInt64LE(hi!, 8);
        assert.ok(
          !now.equals(saved) && !now.equals(Buffer.alloc(16)),
          `a new generation ID (${now.toString('hex')} after ${saved.toString('hex')})`,
        );
        uptime = Number(/up=(\d+)/.exec(await ask(b, 'echo up=$(cut -d. -f1 /proc/uptime)', /up=\d+/, 60))![1]);
        // The restored VM is snapshotted in turn: refused while running, then taken paused.
        await ask(b, 'X=typed-after-restore; echo set', /set/, 60);
        const running = await unixHttp(b.api, 'PUT', '/snapshot/create', {
          snapshot_path: again,
          mem_file_path: againMem,
        });
        assert.equal(running.status, 400);
        assert.match(fault(running), /pause it first/);
        await pauseAndSnapshot(b, again, againMem);
        const diff = await unixHttp(b.api, 'PUT', '/snapshot/create', {
          snapshot_path: join(dir, 'd.snap'),
          mem_file_path: join(dir, 'd.mem'),
          snapshot_type: 'Diff',
        });
        assert.equal(diff.status, 400);
      } finally {
        b.child.kill('SIGTERM');
        await b.exited;
      }
      assert.equal(statSync(againMem).size, 128 * 1024 * 1024);
      const c = await startVmm(dir, 'third');
      try {
        await put(c.api, '/snapshot/load', load(again, againMem));
        await ask(c, 'echo third-$X', /third-typed-after-restore/, 120);
        const later = Number(/up=(\d+)/.exec(await ask(c, 'echo up=$(cut -d. -f1 /proc/uptime)', /up=\d+/, 60))![1]);
        assert.ok(later >= uptime && later < uptime + 600, `the guest's clock went on (${uptime} s, then ${later} s)`);
      } finally {
        c.child.kill('SIGTERM');
        await c.exited;
      }
    },
  );
});
