// `kiln-vmm` as orchestrators run it: its version line, its flags' errors, SIGTERM, and
// Firecracker's getting-started sequence of curl calls, verbatim, booting the kit's
// Linux from an ext4 root drive to its init and power-off.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { buildMinimalKernel, buildRootfs } from '../../src/guestkit/build.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';
import { pvhKernel, SAY_K, THEN_EXIT, THEN_IDLE } from '../../src/guest/pvh-kernel.js';
import { put, startVmm } from '../vmm-driver.js';

// mov dx,0x3f0; mov al,123; out dx,al: the boot timer's "booted".
const REPORT_BOOT = [0x66, 0xba, 0xf0, 0x03, 0xb0, 123, 0xee];
// Polls COM1's line status for a byte, reads it, and writes it back, until it reads 'q'.
// prettier-ignore
const ECHO_UNTIL_Q = [
  0x66, 0xba, 0xfd, 0x03, // wait: mov dx,0x3fd
  0xec, 0xa8, 0x01, 0x74, 0xf7, // in al,dx; test al,1; jz wait
  0x66, 0xba, 0xf8, 0x03, 0xec, // mov dx,0x3f8; in al,dx
  0x3c, 0x71, 0x74, 0x03, // cmp al,'q'; je done
  0xee, 0xeb, 0xeb, // out dx,al; jmp wait
];

const canNetns = process.getuid?.() === 0 && existsSync('/dev/net/tun') && toolAvailable('ip', '-V');
const VMM = fileURLToPath(new URL('../../src/vmm-cli.cjs', import.meta.url));
const vmm = (args: string[]) => spawnSync(process.execPath, [VMM, ...args], { encoding: 'utf8', timeout: 30_000 });
const log = (line: string) => process.stderr.write(`# guest kit: ${line}\n`);

describe('kiln-vmm', () => {
  test('--version prints the line orchestrators parse', () => {
    const r = vmm(['--version']);
    assert.equal(r.status, 0);
    assert.match(r.stdout, /^Firecracker v\d+\.\d+\.\d+ \(Kiln \d+\.\d+\.\d+\)\n$/);
  });

  test('flag errors: --no-api without --config-file, an unknown flag, a bad config file, an existing socket', () => {
    const dir = tempDir();
    const noApi = vmm(['--no-api']);
    assert.equal(noApi.status, 2);
    assert.match(noApi.stderr, /--no-api needs --config-file/);
    assert.equal(vmm(['--frobnicate']).status, 2);
    const badJson = join(dir, 'bad.json');
    writeFileSync(badJson, '{"boot-source": ');
    const bad = vmm(['--no-api', '--config-file', badJson]);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /^kiln-vmm: cannot read the config file .*bad\.json/);
    const unknown = join(dir, 'unknown.json');
    writeFileSync(unknown, JSON.stringify({ 'machine-config': { vcpu_count: 1, mem_size_mib: 64, colour: 'red' } }));
    const u = vmm(['--no-api', '--config-file', unknown]);
    assert.equal(u.status, 1);
    assert.match(u.stderr, /unknown field `colour`/);
    const sock = join(dir, 'taken.sock');
    writeFileSync(sock, '');
    const taken = vmm(['--api-sock', sock]);
    assert.equal(taken.status, 1);
    assert.match(taken.stderr, /already exists/);
  });

  test('SIGTERM stops it cleanly and removes its socket, at any moment of its start-up', async () => {
    assert.equal(vmm(['--id', 'bad/id']).status, 2, 'an instance ID with a slash is refused');
    // An orchestrator may SIGTERM as soon as the socket appears, while the threads started
    // ahead are still loading their modules and the build path is being rehearsed.
    for (const delayMs of [0, 0, 0, 5, 10, 20, 40, 80, 300]) {
      const sock = join(tempDir(), 'api.sock');
      const child = spawn(process.execPath, [VMM, '--api-sock', sock, '--id', 'sigterm-test'], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const ended = new Promise<[number | null, string | null]>((resolve) =>
        child.on('exit', (c, s) => resolve([c, s])),
      );
      for (let i = 0; i < 2000 && !existsSync(sock); i++) await sleep(5);
      assert.ok(existsSync(sock), 'the API socket appeared');
      await sleep(delayMs);
      child.kill('SIGTERM');
      assert.deepEqual(
        await ended,
        [0, null],
        `SIGTERM ${delayMs} ms after the socket appeared: ${stderr.slice(0, 400)}`,
      );
      assert.ok(!existsSync(sock), 'socket removed');
    }
  });

  test("signals as Firecracker's: SIGPIPE counted and survived; SIGHUP, SIGXFSZ, SIGXCPU end it with their statuses after one last metrics line", async () => {
    const launch = async () => {
      const dir = tempDir();
      const sock = join(dir, 'api.sock');
      const metrics = join(dir, 'metrics.json');
      const child = spawn(process.execPath, [VMM, '--api-sock', sock, '--metrics-path', metrics], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const ended = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      after(() => child.exitCode === null && child.kill('SIGKILL'));
      for (let i = 0; i < 2000 && !existsSync(sock); i++) await sleep(5);
      assert.ok(existsSync(sock), 'the API socket appeared');
      const lastMetrics = () => {
        const lines = readFileSync(metrics, 'utf8').trim().split('\n');
        return JSON.parse(lines[lines.length - 1]!) as {
          signals: Record<string, number>;
          seccomp: { num_faults: number };
        };
      };
      return { child, sock, ended, lastMetrics, stderr: () => stderr };
    };
    const piped = await launch();
    piped.child.kill('SIGPIPE');
    for (let i = 0; i < 200 && !piped.stderr().includes('Received signal 13'); i++) await sleep(10);
    await put(piped.sock, '/actions', { action_type: 'FlushMetrics' });
    assert.equal(piped.lastMetrics().signals.sigpipe, 1);
    assert.equal(piped.lastMetrics().seccomp.num_faults, 0);
    await put(piped.sock, '/actions', { action_type: 'FlushMetrics' });
    assert.equal(piped.lastMetrics().signals.sigpipe, 0, 'counted since the previous flush');
    // Later ones are counted, not logged (the log's stderr may be the broken pipe).
    piped.child.kill('SIGPIPE');
    piped.child.kill('SIGPIPE');
    let counted = 0;
    for (let i = 0; i < 200 && counted < 2; i++) {
      await sleep(10);
      await put(piped.sock, '/actions', { action_type: 'FlushMetrics' });
      counted += piped.lastMetrics().signals.sigpipe!;
    }
    assert.ok(counted >= 1, 'counted');
    assert.equal(piped.stderr().match(/Received signal 13/g)?.length, 1, 'logged once');
    piped.child.kill('SIGTERM');
    assert.equal(await piped.ended, 0, 'SIGPIPE did not end it');
    for (const [signal, name, signo, status] of [
      ['SIGHUP', 'sighup', 1, 156],
      ['SIGXFSZ', 'sigxfsz', 25, 151],
      ['SIGXCPU', 'sigxcpu', 24, 154],
    ] as const) {
      const v = await launch();
      v.child.kill(signal);
      assert.equal(await v.ended, status, `${signal}: ${v.stderr().slice(0, 400)}`);
      assert.match(v.stderr(), new RegExp(`Shutting down VM after intercepting signal ${signo}, code 0`));
      assert.equal(v.lastMetrics().signals[name], 1, signal);
      assert.ok(!existsSync(v.sock), 'socket removed');
    }
  });

  test('--snapshot-version, --describe-snapshot, and the numeric flags checked', () => {
    const dir = tempDir();
    const version = vmm(['--snapshot-version']);
    assert.equal(version.status, 0);
    assert.match(version.stdout, /^v\d+\.0\.0\n$/);
    const notSnapshot = join(dir, 'not-a-snapshot');
    writeFileSync(notSnapshot, 'hello');
    const described = vmm(['--describe-snapshot', notSnapshot]);
    assert.equal(described.status, 1);
    assert.match(described.stderr, /is not a Kiln snapshot/);
    const metadata = join(dir, 'metadata.json');
    writeFileSync(metadata, '{"latest": ');
    const badMetadata = vmm(['--metadata', metadata]);
    assert.equal(badMetadata.status, 1);
    assert.match(badMetadata.stderr, /cannot use the metadata file .*metadata\.json/);
    const notFile = vmm(['--metadata', '/dev/zero']);
    assert.equal(notFile.status, 1);
    assert.match(notFile.stderr, /not a regular file/);
    for (const flag of ['--http-api-max-payload-size', '--start-time-us', '--mmds-size-limit']) {
      const r = vmm([flag, '12x']);
      assert.equal(r.status, 2, flag);
      assert.match(r.stderr, new RegExp(`${flag} must be a whole number`));
    }
  });

  test(
    "Firecracker's process flags: --boot-timer logs the guest's boot time, stdin reaches the guest's serial port, --log-path/--level/--show-level, --metrics-path, the jailer's timing flags",
    { skip: kvmSkip },
    async () => {
      const dir = tempDir();
      // A guest that reports its boot to the boot timer, says K, then echoes what its
      // serial port receives until it reads 'q', and resets the machine.
      const kernel = join(dir, 'vmlinux');
      writeFileSync(kernel, pvhKernel([...REPORT_BOOT, ...SAY_K, ...ECHO_UNTIL_Q, ...THEN_EXIT]));
      const config = join(dir, 'vm.json');
      writeFileSync(
        config,
        JSON.stringify({
          'boot-source': { kernel_image_path: kernel },
          'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
        }),
      );
      const logPath = join(dir, 'vmm.log');
      const metricsPath = join(dir, 'metrics.json');
      const child = spawn(
        process.execPath,
        [
          VMM,
          '--no-api',
          '--config-file',
          config,
          '--boot-timer',
          '--id',
          'flags-test',
          '--log-path',
          logPath,
          '--level',
          'Info',
          '--show-level',
          '--metrics-path',
          metricsPath,
          '--start-time-us',
          String(Date.now() * 1000),
          '--start-time-cpu-us',
          '0',
          '--parent-cpu-time-us',
          '0',
          '--show-log-origin',
        ],
        { stdio: ['pipe', 'pipe', 'pipe'] },
      );
      let out = '';
      let err = '';
      child.stdout.setEncoding('utf8').on('data', (c: string) => {
        out += c;
        if (out === 'K') child.stdin.write('hello, guest q');
      });
      child.stderr.setEncoding('utf8').on('data', (c: string) => (err += c));
      const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
      assert.equal(code, 0, err);
      assert.equal(out, 'Khello, guest ', 'what was typed on stdin came back through the serial port');
      assert.match(err, /boot-timer: Guest-boot-time = \d+ us \d+ ms, \d+ CPU us \d+ CPU ms/);
      const vmmLog = readFileSync(logPath, 'utf8');
      assert.match(vmmLog, /\[Info\] \[flags-test\] InstanceStart: /);
      assert.match(vmmLog, /\[Warning\] \[flags-test\] boot-timer: Guest-boot-time = /);
      assert.ok(existsSync(metricsPath), 'the metrics file was opened');
    },
  );

  test(
    "PUT /serial sends the guest's serial output to a file; the metrics count the vCPU's exits",
    { skip: kvmSkip },
    async () => {
      const dir = tempDir();
      const kernel = join(dir, 'vmlinux');
      writeFileSync(kernel, pvhKernel([...SAY_K, ...THEN_IDLE]));
      const vm = await startVmm(dir, 'serial-file');
      const serialFile = join(dir, 'serial.out');
      const metrics = join(dir, 'metrics.json');
      await put(vm.api, '/boot-source', { kernel_image_path: kernel });
      await put(vm.api, '/machine-config', { vcpu_count: 1, mem_size_mib: 64 });
      await put(vm.api, '/serial', { serial_out_path: serialFile });
      await put(vm.api, '/metrics', { metrics_path: metrics });
      await put(vm.api, '/actions', { action_type: 'InstanceStart' });
      for (let i = 0; i < 400 && !(existsSync(serialFile) && readFileSync(serialFile, 'utf8') === 'K'); i++)
        await sleep(25);
      assert.equal(readFileSync(serialFile, 'utf8'), 'K', 'the guest wrote K to the serial port');
      await put(vm.api, '/actions', { action_type: 'FlushMetrics' });
      const line = JSON.parse(readFileSync(metrics, 'utf8').trim().split('\n').at(-1)!) as {
        vcpu: Record<string, number>;
        put_api_requests: Record<string, number>;
      };
      assert.ok(line.vcpu.exit_io_out! >= 1, `the port write was counted: ${JSON.stringify(line.vcpu)}`);
      assert.equal(line.put_api_requests.serial_count, 1);
      vm.child.kill('SIGTERM');
      assert.equal(await vm.exited, 0);
      vm.console.destroy();
      // output() is the console's bytes, then kiln-vmm's stderr (whose temporary paths may hold a 'K').
      assert.ok(!vm.output().startsWith('K'), 'nothing on the console');
    },
  );

  test(
    "Firecracker's getting-started curl sequence (plus entropy, vsock and balloon) boots Linux from a root drive under kiln-vmm's seccomp filters",
    { skip: kvmSkip || (toolAvailable('curl', '--version') ? false : 'needs curl'), timeout: 20 * 60_000 },
    async () => {
      const kernel = await buildMinimalKernel(log);
      const rootfs = await buildRootfs(log);
      const dir = tempDir();
      const disk = join(dir, 'rootfs.ext4');
      execFileSync('cp', [rootfs.path, disk]);
      const sock = join(dir, 'firecracker.socket');
      const logPath = join(dir, 'fc.log');
      // With root, the VMM runs in a network namespace of the test's own, so the guide's
      // tap0 is created there and nothing touches the host's network.
      const ns = `kiln-gs${process.pid}`;
      if (canNetns) {
        execFileSync('ip', ['netns', 'add', ns]);
        after(() => execFileSync('ip', ['netns', 'del', ns]));
      }
      const argv = [VMM, '--api-sock', sock];
      const child = canNetns
        ? spawn('ip', ['netns', 'exec', ns, process.execPath, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] })
        : spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
      let console = '';
      child.stdout.setEncoding('utf8').on('data', (c: string) => (console += c));
      child.stderr.setEncoding('utf8').on('data', (c: string) => (console += c));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
      for (let i = 0; i < 200 && !existsSync(sock); i++) await sleep(25);
      // The guide's calls, with its variables; its boot_args (firecracker-go-sdk's defaults)
      // include pci=off and noapic, which Kiln drops.
      const script = `
      set -e
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/logger' \\
        -H 'Accept: application/json' -H 'Content-Type: application/json' \\
        -d "{\\"log_path\\": \\"\${LOGFILE}\\", \\"level\\": \\"Info\\", \\"show_level\\": true}"
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/boot-source' \\
        -H 'Accept: application/json' -H 'Content-Type: application/json' \\
        -d "{\\"kernel_image_path\\": \\"\${KERNEL}\\", \\"boot_args\\": \\"console=ttyS0 noapic reboot=k panic=1 pci=off nomodules\${EXTRA_ARGS}\\"}"
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/drives/rootfs' \\
        -H 'Accept: application/json' -H 'Content-Type: application/json' \\
        -d "{\\"drive_id\\": \\"rootfs\\", \\"path_on_host\\": \\"\${ROOTFS}\\", \\"is_root_device\\": true, \\"is_read_only\\": false}"
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/machine-config' \\
        -H 'Accept: application/json' -H 'Content-Type: application/json' \\
        -d '{"vcpu_count": 2, "mem_size_mib": 256}'
      if [ "\${WITH_NET}" = 1 ]; then
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/network-interfaces/net1' \\
        -H 'Accept: application/json' -H 'Content-Type: application/json' \\
        -d '{"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}'
      # The metadata service on that NIC, V2 (sessions), with what the guest's init asks for.
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/mmds/config' \\
        -d '{"network_interfaces": ["net1"], "version": "V2"}'
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/mmds' \\
        -d '{"latest": {"meta-data": {"ami-id": "ami-kiln-1234"}}}'
      fi
      # Beyond the guide: every other virtio device, so the boot runs them all under kiln-vmm's seccomp filters.
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/entropy' -d '{}'
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/vsock' \\
        -d "{\\"guest_cid\\": 3, \\"uds_path\\": \\"\${VSOCK}\\"}"
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/balloon' \\
        -d '{"amount_mib": 16, "deflate_on_oom": false, "stats_polling_interval_s": 1}'
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/actions' \\
        -H 'Accept: application/json' -H 'Content-Type: application/json' \\
        -d '{"action_type": "InstanceStart"}'
      curl -s --unix-socket "\${API_SOCKET}" 'http://localhost/'
      # The same image again after the start (as after a resize): the VM holds its lock already, so it is accepted.
      curl -s -i --unix-socket "\${API_SOCKET}" -X PATCH 'http://localhost/drives/rootfs' \\
        -d "{\\"drive_id\\": \\"rootfs\\", \\"path_on_host\\": \\"\${ROOTFS}\\"}"
      # A pre-boot resource after the start: refused, as Firecracker refuses it.
      curl -s -i --unix-socket "\${API_SOCKET}" -X PUT 'http://localhost/boot-source' \\
        -d "{\\"kernel_image_path\\": \\"\${KERNEL}\\"}"
    `;
      const out = execFileSync('bash', ['-c', script], {
        encoding: 'utf8',
        env: {
          ...process.env,
          API_SOCKET: sock,
          KERNEL: kernel.vmlinux,
          ROOTFS: disk,
          LOGFILE: logPath,
          WITH_NET: canNetns ? '1' : '0',
          EXTRA_ARGS: canNetns ? ' kiln.mmds=169.254.169.254' : '',
          VSOCK: join(dir, 'v.sock'),
        },
      });
      assert.equal(
        out.match(/HTTP\/1\.1 204/g)?.length,
        canNetns ? 12 : 9,
        `every configuration call, InstanceStart and the drive PATCH answered 204:\n${out}`,
      );
      assert.match(out, /"state":"Running"/);
      assert.match(
        out,
        /HTTP\/1\.1 400[\s\S]*"fault_message":"The requested operation is not supported after starting the microVM."/,
      );
      const guard = sleep(12 * 60_000, null, { ref: false });
      const code = await Promise.race([exited, guard]);
      if (code === null) child.kill('SIGKILL');
      assert.equal(code, 0, `kiln-vmm exits 0 when the guest powers off:\n${console.slice(-3000)}`);
      assert.match(console, /EXT4-fs \(vda\): mounted filesystem/);
      assert.match(console, /KILN_INIT cpus=2 /);
      if (canNetns) assert.match(console, /KILN_MMDS ami-kiln-1234/, 'the guest read MMDS with a V2 session token');
      assert.match(console, /dropped `pci=off`/);
      assert.match(console, /dropped `noapic`/);
      assert.ok(!existsSync(sock), 'the API socket is removed at exit');
      const vmmLog = readFileSync(logPath, 'utf8');
      assert.match(
        vmmLog,
        /\[Info\] \[anonymous-instance\] InstanceStart: .*, 2 vCPU, 256 MiB, 1 drive\(s\), (1|0) network interface\(s\)/,
      );
      assert.match(vmmLog, /\[Info\] \[anonymous-instance\] the VM ended: the guest powered off/);
    },
  );
});
