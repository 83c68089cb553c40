// A booted Linux through kiln-vmm's snapshot API. The fixture (test/linux-fixture.ts) is
// the kit's Linux booted to its shell and snapshotted by kiln-vmm; here it is loaded in a
// fresh kiln-vmm: its shell answers a command typed on the serial console, its entropy
// device gives bytes, its disk reads, its NIC pings through the TAP the load gave it,
// its clock goes on from the snapshot. That restored VM (loaded with
// track_dirty_pages) is then snapshotted in turn (refused while running): a Full, then,
// after it ran on, a Diff and another Full; the Diff laid over the first Full by
// kiln-snapshot-editor is the second Full byte for byte, and loads in a third process
// (clock_realtime) that still knows what was typed into the second. Bad loads are
// refused and change nothing.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { VMGENID_ADDR } from '../../src/layout.js';
import { unixHttp } from '../../src/manager/manager.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { FIXTURE_DISK_MARK, linuxSnapshotFixture, type LinuxFixture } from '../linux-fixture.js';
import { ask, pauseAndSnapshot, put, startVmm } from '../vmm-driver.js';

const HANDLER = fileURLToPath(new URL('./uffd-handler.js', import.meta.url));
const EDITOR = fileURLToPath(new URL('../../src/snapshot/editor-cli.js', import.meta.url));
const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
/** The fixture's NIC (if it has one) on a TAP of this load's own. */
const nicOverride = (fixture: LinuxFixture, tap: string) =>
  fixture.nic ? { network_overrides: [{ iface_id: 'net0', host_dev_name: tap }] } : {};
const log = (line: string) => process.stderr.write(`# ${line}\n`);
const fault = (r: { body: unknown }) => (r.body as { fault_message?: string }).fault_message ?? '';

describe('kiln-vmm snapshots of a booted Linux', { skip: kvmSkip }, () => {
  test(
    'a Linux with a shell, loaded in a fresh kiln-vmm, answers on its console with its devices working, and snapshots again',
    { timeout: 15 * 60_000 },
    async () => {
      const fixture = await linuxSnapshotFixture(log);
      const dir = tempDir();
      const tapB = `ksn${process.pid % 10000}b`;
      const tapC = `ksn${process.pid % 10000}c`;
      const load = (state: string, memory: string, tap = tapB) => ({
        snapshot_path: state,
        mem_backend: { backend_type: 'File', backend_path: memory },
        resume_vm: true,
        ...nicOverride(fixture, tap),
      });
      const again = join(dir, 'again.snap');
      const againMem = join(dir, 'again.mem');
      const diffState = join(dir, 'diff.snap');
      const diffMem = join(dir, 'diff.mem');
      const fullMem = join(dir, 'full2.mem');
      let randomSum: string;
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
          mem_backend: { backend_type: 'Uffd', backend_path: join(dir, 'nobody.sock') },
          ...nicOverride(fixture, tapB),
        });
        assert.equal(uffd.status, 400);
        assert.match(fault(uffd), /cannot connect to the page-fault handler at .*nobody\.sock: ENOENT/);
        assert.equal(((await unixHttp(b.api, 'GET', '/')).body as { state: string }).state, 'Not started');

        const t0 = Date.now();
        await put(b.api, '/snapshot/load', { ...load(fixture.state, fixture.memory), track_dirty_pages: true });
        log(`snapshot/load answered in ${Date.now() - t0} ms`);
        const twice = await unixHttp(b.api, 'PUT', '/snapshot/load', load(fixture.state, fixture.memory));
        assert.equal(twice.status, 400, 'a second load is refused');
        const late = await unixHttp(b.api, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128 });
        assert.equal(late.status, 400, 'configuring after a load is refused');
        assert.equal(((await unixHttp(b.api, 'GET', '/')).body as { state: string }).state, 'Running');
        await ask(b, 'echo restored-$((6*7))', /restored-42/, 120);
        await ask(b, 'head -c 16 /dev/hwrng | wc -c', /\n\s*16\s*\r?\n/, 60);
        // Its disk reads (the fixture's read-only data disk), and its NIC works on the TAP
        // the load gave it, moved into a network namespace of this test.
        await ask(b, 'head -c 17 /dev/vda; echo', new RegExp(FIXTURE_DISK_MARK.trim()), 60);
        if (fixture.nic) {
          const ns = `ksn${process.pid}`;
          ip('netns', 'add', ns);
          try {
            ip('link', 'set', tapB, 'netns', ns);
            ip('-n', ns, 'addr', 'add', '10.98.1.1/24', 'dev', tapB);
            ip('-n', ns, 'link', 'set', tapB, 'up');
            await ask(
              b,
              'ip addr add 10.98.1.2/24 dev eth0 2>/dev/null; ip link set eth0 up; ping -c 1 -W 5 10.98.1.1 >/dev/null && echo pinged-$((6*7))',
              /pinged-42/,
              90,
            );
          } finally {
            ip('netns', 'del', ns);
          }
        }
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
        // Loaded with track_dirty_pages: after that Full, the guest runs on, takes bytes from
        // the entropy device (Kiln writes them into its memory), and a Diff holds what changed.
        await put(b.api, '/vm', { state: 'Resumed' }, 'PATCH');
        await ask(
          b,
          'Y=typed-after-full; [ -e /tmp/r ] || head -c 8192 /dev/hwrng > /tmp/r; md5sum /tmp/r',
          /[0-9a-f]{32} {2}\/tmp\/r/,
          60,
        );
        // Written once (a command typed again while the first is slow leaves it).
        randomSum = [...b.output().matchAll(/([0-9a-f]{32}) {2}\/tmp\/r/g)].at(-1)![1]!;
        await put(b.api, '/vm', { state: 'Paused' }, 'PATCH');
        await put(b.api, '/snapshot/create', {
          snapshot_path: diffState,
          mem_file_path: diffMem,
          snapshot_type: 'Diff',
        });
        await put(b.api, '/snapshot/create', { snapshot_path: join(dir, 'full2.snap'), mem_file_path: fullMem });
      } finally {
        b.child.kill('SIGTERM');
        await b.exited;
      }
      const onDisk = statSync(diffMem).blocks * 512;
      log(
        `Diff memory file: ${(onDisk / 2 ** 20).toFixed(2)} MiB on disk, Full: ${(statSync(fullMem).blocks / 2048).toFixed(1)} MiB`,
      );
      assert.ok(onDisk > 0 && onDisk < statSync(againMem).blocks * 512, 'a Diff is smaller than a Full');
      // kiln-snapshot-editor lays the Diff over the Full before it: the Full after it, byte for byte.
      const merged = join(dir, 'merged.mem');
      copyFileSync(againMem, merged);
      const editor = spawnSync(
        process.execPath,
        [EDITOR, 'edit-memory', 'rebase', '--memory-path', merged, '--diff-path', diffMem],
        { encoding: 'utf8' },
      );
      assert.equal(editor.status, 0, editor.stderr);
      assert.ok(readFileSync(merged).equals(readFileSync(fullMem)), 'Full + Diff = the Full taken after the Diff');
      assert.equal(statSync(againMem).size, 128 * 1024 * 1024);
      const c = await startVmm(dir, 'third');
      try {
        // The Diff's state with the rebased memory, its clock brought to the host's wall clock.
        await put(c.api, '/snapshot/load', { ...load(diffState, merged, tapC), clock_realtime: true });
        await ask(c, 'echo third-$X-$Y', /third-typed-after-restore-typed-after-full/, 120);
        await ask(c, 'md5sum /tmp/r', new RegExp(`${randomSum}  /tmp/r`), 60);
        const guestNow = Number(/now=(\d+)/.exec(await ask(c, 'echo now=$(date +%s)', /now=\d+/, 60))![1]);
        assert.ok(
          Math.abs(guestNow - Date.now() / 1000) < 60,
          `clock_realtime: the guest's clock is the host's (${guestNow})`,
        );
        const later = Number(/up=(\d+)/.exec(await ask(c, 'echo up=$(cut -d. -f1 /proc/uptime)', /up=\d+/, 60))![1]);
        assert.ok(later >= uptime, `the guest's clock went on (${uptime} s, then ${later} s)`);
        // Loaded without track_dirty_pages: a Diff is refused, a Full is not.
        await put(c.api, '/vm', { state: 'Paused' }, 'PATCH');
        const diff = await unixHttp(c.api, 'PUT', '/snapshot/create', {
          snapshot_path: join(dir, 'd3.snap'),
          mem_file_path: join(dir, 'd3.mem'),
          snapshot_type: 'Diff',
        });
        assert.equal(diff.status, 400);
        assert.match(fault(diff), /dirty page tracking disabled/);
        // Kiln tracks from a Full snapshot on: a Diff may follow it.
        await put(c.api, '/snapshot/create', {
          snapshot_path: join(dir, 'f3.snap'),
          mem_file_path: join(dir, 'f3.mem'),
        });
        await put(c.api, '/snapshot/create', {
          snapshot_path: join(dir, 'd3.snap'),
          mem_file_path: join(dir, 'd3.mem'),
          snapshot_type: 'Diff',
        });
        assert.ok(statSync(join(dir, 'd3.mem')).blocks < statSync(join(dir, 'f3.mem')).blocks);
      } finally {
        c.child.kill('SIGTERM');
        await c.exited;
      }
    },
  );

  test(
    "the Uffd backend: a Firecracker-style page-fault handler gets the userfaultfd and the layout, and fills the restored Linux's memory",
    { timeout: 10 * 60_000 },
    async () => {
      const fixture = await linuxSnapshotFixture(log);
      const dir = tempDir();
      const socket = join(dir, 'uffd.sock');
      const count = join(dir, 'served');
      const handler = spawn(process.execPath, [HANDLER, socket, fixture.memory, count], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      try {
        await new Promise<void>((resolve, reject) => {
          handler.stdout!.once('data', () => resolve());
          handler.once('exit', (code) => reject(new Error(`the handler exited (${code})`)));
        });
        const vmm = await startVmm(dir, 'uffd');
        try {
          await put(vmm.api, '/snapshot/load', {
            snapshot_path: fixture.state,
            mem_backend: { backend_type: 'Uffd', backend_path: socket },
            resume_vm: true,
            ...nicOverride(fixture, `ksn${process.pid % 10000}u`),
          });
          await ask(vmm, 'echo uffd-$((6*7))', /uffd-42/, 120);
          const served = Number(readFileSync(count, 'utf8'));
          log(`the page-fault handler served ${served} pages`);
          assert.ok(served > 100, `the guest's pages came from the handler (${served})`);
        } finally {
          vmm.child.kill('SIGTERM');
          await vmm.exited;
        }
      } finally {
        handler.kill('SIGKILL');
      }
    },
  );
});
