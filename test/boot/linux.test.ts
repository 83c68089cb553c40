// Boots the guest kit's minimal Linux (built from Debian's linux-source-6.1 on first
// use, ~5 minutes) to its init, which reports CPU count, memory and uptime, then
// powers off through ACPI. On software KVM this takes about a minute.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLinuxVm } from '../../src/boot/linux.js';
import { parseVmConfig } from '../../src/config/vm-config.js';
import { loadKernel } from '../../src/boot/loader.js';
import { isSoftwareKvm } from '../../src/compat/pvm.js';
import { readProgress } from '../../src/devices/progress.js';
import { buildInitramfs, buildMinimalKernel } from '../../src/guestkit/build.js';
import { MiB } from '../../src/layout.js';
import { ramRanges } from '../../src/memory/guest-memory.js';
import { balloonControl } from '../../src/platform/virtio.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';

const canNetns = process.getuid?.() === 0 && existsSync('/dev/net/tun') && toolAvailable('ip', '-V');
const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });

const log = (line: string) => process.stderr.write(`# guest kit: ${line}\n`);

describe('the minimal Linux guest', { skip: kvmSkip, timeout: 30 * 60_000 }, () => {
  test('boots to init on 2 vCPUs with virtio disks, entropy, network, console and balloon, reports what it sees, and powers off with status 0', async () => {
    const kernel = await buildMinimalKernel(log);
    const initrd = await buildInitramfs(log);
    const dir = tempDir();
    const serialPath = join(dir, 'serial.log');
    const fd = openSync(serialPath, 'w');
    // A writable disk and a read-only one, with known contents.
    const rw = join(dir, 'rw.img');
    const ro = join(dir, 'ro.img');
    writeFileSync(rw, randomBytes(1 << 20));
    writeFileSync(ro, randomBytes(64 << 10));
    const md5 = (path: string) => createHash('md5').update(readFileSync(path)).digest('hex');
    const rwBefore = md5(rw);
    // A NIC on a TAP that moves into a network namespace of the test's own (needs root).
    const ns = `kiln-lt${process.pid}`;
    const tap = `klt${process.pid % 100000}`;
    if (canNetns) {
      ip('netns', 'add', ns);
      after(() => ip('netns', 'del', ns));
    } else process.stderr.write('# the Linux network check is skipped: it needs root, /dev/net/tun and ip\n');
    const consolePath = join(dir, 'hvc.sock');
    const lv = createLinuxVm(
      parseVmConfig({
        kernel: kernel.vmlinux,
        initrd: initrd.path,
        cpus: 2,
        memoryMiB: 128,
        cmdline: `kiln.blkwrite${canNetns ? ' kiln.net=10.98.0.2/24,10.98.0.1' : ''}`,
        disks: [
          { path: rw, serial: 'kiln-rw' },
          { path: ro, readOnly: true, serial: 'kiln-disk-1' },
        ],
        rng: true,
        nets: canNetns ? [{ tap, mac: '06:00:0a:62:00:02' }] : [],
        consoleSocket: consolePath,
        balloon: { targetMiB: 16 },
      }),
      { serialOutFd: fd },
    );
    if (canNetns) {
      ip('link', 'set', tap, 'netns', ns);
      ip('-n', ns, 'addr', 'add', '10.98.0.1/24', 'dev', tap);
      ip('-n', ns, 'link', 'set', tap, 'up');
    }
    // The console's client is connected before the guest starts.
    let hvc = '';
    const client = createConnection(consolePath);
    client.setEncoding('utf8');
    client.on('data', (chunk: string) => (hvc += chunk));
    client.on('error', (err: NodeJS.ErrnoException) => assert.equal(err.code, 'ECONNRESET'));
    after(() => client.destroy());
    const balloonDevice = lv.virtio.balloon!;
    try {
      assert.equal(lv.boot.format, 'pvh');
      assert.match(lv.cmdline, /^console=ttyS0 /);
      const started = Date.now();
      await lv.vm.start();
      // A generous bound so a hang fails the test instead of the CI run.
      const guard = sleep(10 * 60_000, null, { ref: false });
      const result = await Promise.race([lv.vm.wait(), guard]);
      if (result === null) {
        await lv.vm.stop();
        assert.fail(`no poweroff within 10 minutes; console:\n${readFileSync(serialPath, 'utf8').slice(-2000)}`);
      }
      const serial = readFileSync(serialPath, 'utf8');
      process.stderr.write(`# minimal Linux: boot to poweroff in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
      assert.equal(result.reason, 'guest-exit', `${result.detail}\n${serial.slice(-2000)}`);
      assert.equal(result.exitCode, 0);
      assert.match(serial, /the guest powered off|reboot: Power down/);
      const report = /KILN_INIT cpus=(\d+) mem_kb=(\d+) uptime=([\d.]+) kernel=(\S+)/.exec(serial);
      assert.ok(report, `init's report line on the console:\n${serial.slice(-2000)}`);
      assert.equal(Number(report[1]), 2, 'both vCPUs online');
      assert.ok(
        Number(report[2]) > 100 * 1024 && Number(report[2]) < 128 * 1024,
        `MemTotal ${report[2]} kB of 128 MiB`,
      );
      assert.ok(Number(report[3]) > 0);
      assert.match(report[4]!, /^6\.1\./);
      assert.match(serial, /smp: Brought up 1 node, 2 CPUs/);
      assert.match(serial, /ttyS0 at I\/O 0x3f8/);
      assert.match(serial, /ACPI: RSDP 0x00000000000E0000/);
      assert.match(serial, /PCI: MMCONFIG for domain 0000 \[bus 00-00\] at \[mem 0xe0000000-0xe00fffff\]/);
      assert.match(serial, /PCI host bridge to bus 0000:00/);
      assert.match(serial, /pci 0000:00:00\.0: \[1b36:0008\] type 00 class 0x060000/);
      assert.deepEqual(readProgress(lv.progress.state).recent, [0x10, 0x20], 'init reached both progress points');
      // Virtio over PCI with MSI-X: Linux found both disks with the right size, flags,
      // serials and contents, wrote with a flush, and read the entropy device.
      assert.match(serial, /virtio_blk virtio0: \[vda\] 2048 512-byte logical blocks/);
      assert.match(serial, new RegExp(`KILN_BLK dev=vda sectors=2048 ro=0 serial=kiln-rw md5=${rwBefore}`));
      assert.match(serial, new RegExp(`KILN_BLK dev=vdb sectors=128 ro=1 serial=kiln-disk-1 md5=${md5(ro)}`));
      assert.match(serial, /KILN_BLK_WRITE ok/);
      assert.equal(
        readFileSync(rw)
          .subarray(8 * 512, 8 * 512 + 14)
          .toString(),
        'kiln-was-here\n',
        'the flushed write reached the file',
      );
      assert.match(serial, /KILN_RNG current=virtio_rng\.0 bytes=16/);
      if (canNetns) assert.match(serial, /KILN_NET ok/, 'the guest pinged the namespace through the TAP');
      for (let i = 0; i < 100 && !hvc.includes('KILN_HVC'); i++) await sleep(20);
      assert.match(
        hvc,
        /^KILN_HVC hello\r?\n$/,
        'init wrote to hvc0 (a tty: \\n becomes \\r\\n); the console socket carried it',
      );
      // Linux's balloon driver inflated to the 16 MiB target and sent its statistics.
      const balloon = balloonControl(balloonDevice);
      assert.equal(balloon.actualPages, 4096, 'balloon: actual = target');
      assert.ok(balloon.pagesReturned >= 4096, `balloon: ${balloon.pagesReturned} pages returned to the host`);
      assert.ok(balloon.stat(5) > 100n * BigInt(MiB), 'balloon statistics: total memory');
      if (isSoftwareKvm()) {
        const compat = result.vcpus[0]!.compat ?? {};
        assert.equal(compat['syscall-fix'], 1, 'the kvm_pvm syscall fix was installed');
        assert.ok((compat.int3 ?? 0) >= 1, "the kernel's int3 self-test was finished by Kiln");
      }
    } finally {
      closeSync(fd);
      await lv.vm.destroy();
    }
  });

  test("the kit's bzImage is a 64-bit boot protocol 2.12+ image Kiln can load", async () => {
    const kernel = await buildMinimalKernel(log);
    const img = loadKernel({
      kernel: new Uint8Array(readFileSync(kernel.bzImage)),
      cmdline: 'console=ttyS0',
      ram: ramRanges(128 * MiB),
    });
    assert.equal(img.format, 'bzimage');
    assert.ok(img.protocol! >= 0x20c, `protocol 0x${img.protocol!.toString(16)}`);
    assert.equal(img.entry.rip, 0x100200);
  });
});

describe('bad input to a Linux VM', { skip: kvmSkip }, () => {
  const fds = () => readdirSync('/proc/self/fd').length;
  test('a missing kernel, a directory, an empty file and a non-kernel are refused before any VM exists', () => {
    const dir = tempDir();
    const empty = join(dir, 'empty');
    const text = join(dir, 'notes.txt');
    writeFileSync(empty, '');
    writeFileSync(text, 'this is not a kernel\n'.repeat(100));
    const before = fds();
    const boot = (input: Record<string, unknown>) =>
      createLinuxVm(parseVmConfig({ cpus: 1, memoryMiB: 64, ...input }), { serialOutFd: -1 });
    assert.throws(() => boot({ kernel: join(dir, 'missing') }), /cannot read the kernel '.*missing': ENOENT/);
    assert.throws(() => boot({ kernel: dir }), /is not a regular file/);
    // A FIFO with no writer: refused at once, never waited on.
    const fifo = join(dir, 'kernel.fifo');
    execFileSync('mkfifo', [fifo]);
    assert.throws(() => boot({ kernel: fifo }), /the kernel '.*kernel\.fifo' is not a regular file/);
    assert.throws(() => boot({ kernel: empty }), /the kernel '.*empty' is empty/);
    assert.throws(() => boot({ kernel: text }), /not a Linux kernel/);
    assert.throws(() => boot({ kernel: text, cpus: 0 }), /cpus: must be a whole number from 1 to 254 \(got 0\)/);
    assert.throws(() => boot({ kernel: text, cpus: 300 }), /cpus: must be a whole number from 1 to 254 \(got 300\)/);
    assert.throws(
      () => boot({ kernel: text, memoryMiB: 1 << 30 }),
      /memoryMiB: must be a whole number from 1 to 4194304/,
    );
    assert.equal(fds(), before, 'no KVM descriptor was opened');
  });
});
