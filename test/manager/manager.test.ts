// The VM manager: definitions on disk (atomic, corrupt files kept and reported), bad
// definitions refused, host limits with a message saying what is left, and end to end
// through the `kiln` verbs: a VM created, started in its cgroup, surviving a daemon
// crash (kill -9) with its true state found again, paused and resumed, its console log
// kept, and removed.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import {
  appendFileSync,
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readFileSync,
  readdirSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { once } from 'node:events';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { cgroupDirs, weightToShares } from '../../src/manager/cgroup.js';
import { JAIL_UID_BASE } from '../../src/manager/jail.js';
import { Manager, MAX_CONSOLE_LOG_BYTES } from '../../src/manager/manager.js';
import { parseDefinition } from '../../src/manager/definition.js';
import { checkStartable } from '../../src/manager/preflight.js';
import { Store, sweepTemporaryFiles, writeAtomically } from '../../src/manager/store.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';
import { CLI, daemonsOf, kiln, kilnAsync } from './kiln-cli.js';

/** Whether anything (a dangling link too) is at `path`. */
function present(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

function stopDaemon(stateDir: string): void {
  spawnSync('pkill', ['-f', `${CLI} daemon`], { env: { ...process.env, KILN_STATE_DIR: stateDir } });
}

describe('the VM store', () => {
  test('a console log past its cap is rotated once into console.log.1; kiln logs reads across the two', () => {
    const dir = tempDir();
    const store = new Store(dir);
    store.create(parseDefinition({ name: 'chatty' }));
    const run = store.runDir('chatty');
    mkdirSync(run, { recursive: true });
    const log = join(run, 'console.log');
    const big = Buffer.alloc(MAX_CONSOLE_LOG_BYTES + 1024, 'x');
    big.write('THE-END', big.length - 7);
    writeFileSync(log, big);
    const manager = new Manager(store);
    manager.rotateConsoleLogs();
    assert.equal(statSync(log).size, 0, 'console.log starts again');
    assert.equal(statSync(`${log}.1`).size, big.length, 'the old content is console.log.1');
    appendFileSync(log, 'after\n');
    assert.equal(manager.logs('chatty', 13), 'THE-ENDafter\n'.slice(-13));
    manager.rotateConsoleLogs();
    assert.equal(statSync(log).size, 6, 'a log under the cap is left alone');
  });

  test('definitions are written atomically; a corrupt one is reported and left alone', () => {
    const dir = tempDir();
    const store = new Store(dir);
    store.create(parseDefinition({ name: 'alpha', cpus: 2, memoryMiB: 256 }));
    store.create(parseDefinition({ name: 'beta' }));
    assert.throws(() => store.create(parseDefinition({ name: 'beta' })), /a VM named 'beta' already exists/);
    assert.deepEqual(
      readdirSync(join(dir, 'vms')).sort(),
      ['alpha.json', 'beta.json'],
      'no temporary files left behind',
    );
    writeFileSync(join(dir, 'vms', 'gamma.json'), '{"name": "gamma", "cpus":');
    const { vms, broken } = store.list();
    assert.deepEqual(
      vms.map((v) => v.name),
      ['alpha', 'beta'],
    );
    assert.equal(broken.length, 1);
    assert.equal(broken[0]!.name, 'gamma');
    assert.equal(
      readFileSync(join(dir, 'vms', 'gamma.json'), 'utf8'),
      '{"name": "gamma", "cpus":',
      'the corrupt file is kept as it was',
    );
    assert.throws(() => store.get('gamma'), /is broken: it is not JSON.*left as it is/);
    // A file that is JSON but no longer a valid definition is broken too, with the field and the reason.
    writeFileSync(join(dir, 'vms', 'delta.json'), JSON.stringify({ name: 'delta', vsock: 5 }));
    writeFileSync(join(dir, 'vms', 'eps.json'), '{"name": "eps", "__proto__": {"cpus": 2}}');
    const again = store.list();
    assert.deepEqual(
      again.vms.map((v) => v.name),
      ['alpha', 'beta'],
    );
    assert.match(again.broken.find((b) => b.name === 'delta')!.error, /^vsock: must be an object \(got number 5\)/);
    assert.match(again.broken.find((b) => b.name === 'eps')!.error, /^__proto__: is not a known field/);
    assert.throws(() => store.get('delta'), /the definition of 'delta' .* is broken: vsock: must be an object/);
    const target = join(dir, 'x.json');
    writeAtomically(target, 'one');
    writeAtomically(target, 'two');
    assert.equal(readFileSync(target, 'utf8'), 'two');
    // A write that fails (here the rename: the target is a directory) leaves nothing behind.
    mkdirSync(join(dir, 'adir', 'inside'), { recursive: true });
    assert.throws(() => writeAtomically(join(dir, 'adir'), 'three'));
    assert.deepEqual(
      readdirSync(dir).filter((f) => f.includes('.tmp-')),
      [],
      'no temporary file left',
    );
    // One a crash left is swept when the daemon starts.
    writeFileSync(join(dir, 'vms', 'delta.json.tmp-4242'), '{"na');
    assert.deepEqual(sweepTemporaryFiles(join(dir, 'vms')), ['delta.json.tmp-4242']);
    assert.ok(!existsSync(join(dir, 'vms', 'delta.json.tmp-4242')));
  });

  test('a definition that could not start on this host is refused: missing or unwritable files, too much memory', () => {
    const dir = tempDir();
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(4096));
    assert.doesNotThrow(() => checkStartable(parseDefinition({ name: 'ok', disks: [{ path: disk }] })));
    assert.throws(
      () => checkStartable(parseDefinition({ name: 'ok', kernel: join(dir, 'vmlinux') })),
      /^ConfigError: kernel: '.*vmlinux' does not exist$/,
    );
    assert.throws(
      () => checkStartable(parseDefinition({ name: 'ok', disks: [{ path: dir }] })),
      /disks\[0\]\.path: '.*' is not a regular file or block device/,
    );
    assert.throws(
      () => checkStartable(parseDefinition({ name: 'ok', memoryMiB: 4 << 20 })),
      /memoryMiB: 4194304 MiB is more than this host has/,
    );
    chmodSync(disk, 0o444);
    const unprivileged = process.getuid?.() !== 0;
    if (unprivileged)
      assert.throws(
        () => checkStartable(parseDefinition({ name: 'ok', disks: [{ path: disk }] })),
        /is not readable and writable/,
      );
    assert.doesNotThrow(() => checkStartable(parseDefinition({ name: 'ok', disks: [{ path: disk, readOnly: true }] })));
  });

  test('bad definitions are refused with the reason', () => {
    assert.throws(() => parseDefinition({ name: 'Upper' }), /name: 'Upper' is not a valid VM name/);
    assert.throws(
      () => parseDefinition({ name: 'ok', cpus: 300 }),
      /cpus: must be a whole number from 1 to 254 \(got 300\)/,
    );
    assert.throws(
      () => parseDefinition({ name: 'ok', memoryMiB: 'lots' }),
      /memoryMiB: must be a whole number from 1 to 4194304 \(got 'lots'\)/,
    );
    assert.throws(
      () => parseDefinition({ name: 'ok', colour: 'red' }),
      /colour: is not a known field \(known: name, kernel, /,
    );
    assert.throws(() => parseDefinition({ name: 'ok', constructor: 'x' }), /constructor: is not a known field/);
    assert.throws(() => parseDefinition({ name: 'ok', toString: 'x' }), /toString: is not a known field/);
    assert.throws(() => parseDefinition({ name: 'ok', disks: [{}] }), /disks\[0\]\.path: is required/);
    assert.throws(
      () => parseDefinition({ name: 'ok', disks: [{ path: 'rel.img' }] }),
      /disks\[0\]\.path: must be an absolute path \(got 'rel.img'\)/,
    );
    assert.throws(
      () => parseDefinition({ name: 'ok', cpuWeight: 0 }),
      /cpuWeight: must be a whole number from 1 to 10000 \(got 0\)/,
    );
    assert.throws(() => parseDefinition({ name: 'ok', vsock: { guestCid: 3 } }), /vsock\.uds: is required/);
    assert.throws(
      () => parseDefinition({ name: 'ok', nets: [{ tap: 'a', passt: '/b' }] }),
      /nets\[0\]: needs either tap/,
    );
    assert.deepEqual(parseDefinition({ name: 'ok' }), {
      name: 'ok',
      cpus: 1,
      memoryMiB: 128,
      smt: false,
      trackDirtyPages: false,
      disks: [],
      nets: [],
      rng: false,
      cpuWeight: 100,
      cpuQuotaPercent: 0,
      pinCpus: [],
    });
  });

  test('cgroup v1 shares follow the v2 weight scale', () => {
    assert.equal(weightToShares(100), 1024);
    assert.equal(weightToShares(200), 2048);
    assert.equal(weightToShares(1), 10);
  });
});

describe('kiln VM-manager verbs', () => {
  test("the state directory is its owner's alone, whatever the umask; another user cannot reach the daemon", () => {
    const dir = join(tempDir(), 'state');
    try {
      const made = spawnSync('sh', ['-c', `umask 000; exec "${process.execPath}" "${CLI}" create priv --memory 64M`], {
        encoding: 'utf8',
        env: { ...process.env, KILN_STATE_DIR: dir },
      });
      assert.equal(made.status, 0, made.stderr);
      const mode = (path: string) => statSync(path).mode & 0o777;
      for (const d of [dir, join(dir, 'vms'), join(dir, 'run')]) assert.equal(mode(d), 0o700, d);
      assert.equal(mode(join(dir, 'vms', 'priv.json')), 0o600);
      assert.equal(mode(join(dir, 'kiln.sock')) & 0o077, 0, 'only the owner may connect to the socket');
      const setpriv = toolAvailable('setpriv', '--version');
      assert.ok(setpriv, 'setpriv (util-linux) is installed');
      if (process.getuid?.() === 0) {
        const other = spawnSync(
          'setpriv',
          ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, 'ls'],
          {
            encoding: 'utf8',
            env: { ...process.env, KILN_STATE_DIR: dir },
          },
        );
        assert.equal(other.status, 1, other.stderr);
        assert.match(other.stderr, /cannot use the state directory .*: EACCES/);
        // Even where the modes would let it in, the daemon checks who connects (SO_PEERCRED).
        chmodSync(join(dir, '..'), 0o711);
        chmodSync(dir, 0o711);
        chmodSync(join(dir, 'kiln.sock'), 0o666);
        const peer = spawnSync(
          'setpriv',
          ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, 'ls'],
          { encoding: 'utf8', env: { ...process.env, KILN_STATE_DIR: dir } },
        );
        assert.equal(peer.status, 1, peer.stderr);
        assert.match(peer.stderr, /not allowed: the kiln daemon serves its owner, root and the kiln group/);
        assert.match(readFileSync(join(dir, 'daemon.log'), 'utf8'), /refused a connection from uid 65534/);
      }
    } finally {
      stopDaemon(dir);
    }
  });

  test(
    'with KILN_GROUP the socket is 0660 and the group may use the daemon; others still may not',
    { skip: process.getuid?.() === 0 && toolAvailable('groupadd', '--help') ? false : 'needs root and groupadd' },
    () => {
      const group = `kilnt${process.pid % 100000}`;
      assert.equal(spawnSync('groupadd', [group]).status, 0);
      const gid = Number(
        /^[^:]+:[^:]*:(\d+):/m.exec(
          readFileSync('/etc/group', 'utf8')
            .split('\n')
            .find((l) => l.startsWith(`${group}:`))!,
        )![1],
      );
      const parent = tempDir();
      chmodSync(parent, 0o711);
      const dir = join(parent, 'state');
      const env = { ...process.env, KILN_STATE_DIR: dir, KILN_GROUP: group };
      try {
        const first = spawnSync(process.execPath, [CLI, 'ls'], { encoding: 'utf8', env });
        assert.equal(first.status, 0, first.stderr);
        const dirStat = statSync(dir);
        assert.equal(dirStat.mode & 0o777, 0o710);
        assert.equal(dirStat.gid, gid);
        const sock = statSync(join(dir, 'kiln.sock'));
        assert.equal(sock.mode & 0o777, 0o660);
        assert.equal(sock.gid, gid);
        for (const d of ['vms', 'run']) assert.equal(statSync(join(dir, d)).mode & 0o777, 0o700, d);
        const asMember = spawnSync(
          'setpriv',
          ['--reuid=65534', `--regid=${gid}`, '--clear-groups', process.execPath, CLI, 'ls', '--json'],
          { encoding: 'utf8', env },
        );
        assert.equal(asMember.status, 0, asMember.stderr);
        assert.deepEqual(JSON.parse(asMember.stdout).vms, []);
        const outsider = spawnSync(
          'setpriv',
          ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, 'ls'],
          { encoding: 'utf8', env },
        );
        assert.equal(outsider.status, 1);
      } finally {
        stopDaemon(dir);
        spawnSync('groupdel', [group]);
      }
    },
  );

  test('concurrent first use starts one daemon per state directory', async () => {
    const dir = tempDir();
    try {
      const results = await Promise.all(Array.from({ length: 4 }, () => kilnAsync(dir, ['ls', '--json'])));
      for (const r of results) assert.equal(r.status, 0, r.stderr);
      // Daemons that lost the race stop at once; wait for them to be gone.
      for (let i = 0; i < 50 && daemonsOf(dir).length > 1; i++) await sleep(100);
      assert.equal(daemonsOf(dir).length, 1, 'one daemon serves the directory');
      assert.equal(kiln(dir, ['ls']).status, 0, 'and keeps serving it');
    } finally {
      stopDaemon(dir);
    }
  });

  test('usage and limits: a start that would overcommit says how much is left; nothing starts', () => {
    const dir = tempDir();
    try {
      writeFileSync(join(dir, 'limits.json'), JSON.stringify({ cpuOvercommit: 0.5 }));
      assert.equal(kiln(dir, ['create', 'big', '--cpus', '4', '--memory', '64M']).status, 0);
      const r = kiln(dir, ['start', 'big']);
      assert.equal(r.status, 1);
      assert.match(
        r.stderr,
        /would exceed the vCPU limit of 1 \(2 host CPUs x 0.5\); 1 vCPUs are left|would exceed the vCPU limit of \d+ .*vCPUs are left/,
      );
      assert.equal(JSON.parse(kiln(dir, ['ls', '--json']).stdout).vms[0].state, 'stopped');
      const noName = kiln(dir, ['start']);
      assert.equal(noName.status, 2);
      assert.match(noName.stderr, /missing required argument 'name'/);
      const wrongVerb = kiln(dir, ['stop', 'big', '--cpus', '4']);
      assert.equal(wrongVerb.status, 2, 'an option of another verb is refused');
      assert.match(wrongVerb.stderr, /unknown option '--cpus'/);
      assert.equal(kiln(dir, ['info', 'nope']).status, 1);
      assert.equal(kiln(dir, ['create', '-f', join(dir, 'missing.yaml')]).status, 1);
      const yaml = join(dir, 'vm.yaml');
      writeFileSync(yaml, 'name: from-yaml\ncpus: 2\nmemoryMiB: 96\nrng: true\n');
      assert.equal(kiln(dir, ['create', '-f', yaml]).status, 0);
      const listed = JSON.parse(kiln(dir, ['ls', '--json']).stdout) as {
        vms: Array<{ name: string; memoryMiB: number }>;
      };
      assert.deepEqual(
        listed.vms.map((v) => `${v.name}:${v.memoryMiB}`),
        ['big:64', 'from-yaml:96'],
      );
      // Nothing is stored that would not start: a missing disk is refused at create, naming the field.
      const missing = kiln(dir, ['create', 'nodisk', '--disk', join(dir, 'nope.img')]);
      assert.equal(missing.status, 2, missing.stderr);
      assert.equal(missing.stderr, `kiln: disks[0].path: '${join(dir, 'nope.img')}' does not exist\n`);
      assert.equal(kiln(dir, ['info', 'nodisk']).status, 1, 'not stored');
      // A VM whose VMM cannot start: kiln start says so, with the end of its console log, and exits 1.
      writeFileSync(join(dir, 'notes.txt'), 'this is not a kernel\n'.repeat(100));
      assert.equal(kiln(dir, ['create', 'broken', '--kernel', join(dir, 'notes.txt')]).status, 0);
      const failed = kiln(dir, ['start', 'broken']);
      assert.equal(failed.status, 1, failed.stderr);
      assert.match(failed.stderr, /'broken' did not start: its VMM exited/);
      assert.match(failed.stderr, /not a Linux kernel/);
      assert.equal((JSON.parse(kiln(dir, ['info', 'broken', '--json']).stdout) as { state: string }).state, 'stopped');
      // A pid file that cannot be written (here a directory is in its way; a full disk does the
      // same): the VMM is stopped, not left running untracked.
      assert.equal(kiln(dir, ['create', 'pidless', '--kernel', join(dir, 'notes.txt')]).status, 0);
      mkdirSync(join(dir, 'run', 'pidless', 'vmm.pid'), { recursive: true });
      const lost = kiln(dir, ['start', 'pidless']);
      assert.equal(lost.status, 1, lost.stderr);
      assert.match(lost.stderr, /cannot record the VMM's pid for 'pidless' \(EISDIR\); it was stopped/);
      const strays = spawnSync('pgrep', ['-f', '--', 'vmm-cli[.]c?js .*--id pidless'], { encoding: 'utf8' });
      assert.equal(strays.status, 1, `no VMM left running (pgrep: ${strays.stdout}${strays.stderr})`);
    } finally {
      stopDaemon(dir);
    }
  });

  test(
    'create, start in a cgroup, survive a daemon crash, pause/resume, keep the console log, rm',
    { skip: kvmSkip, timeout: 15 * 60_000 },
    async () => {
      const dir = tempDir();
      mkdirSync(dir, { recursive: true });
      try {
        // The default guest (no kernel given) stays up with a shell on its serial console.
        // With a disk only its owner may open (lent to the jail user while the VM runs), and a
        // virtio console and a vsock device, whose sockets live in the jail.
        const disk = join(dir, 'data.img');
        writeFileSync(disk, Buffer.alloc(1 << 20), { mode: 0o600 });
        const hvcPath = join(dir, 'hvc.sock');
        const vsockPath = join(dir, 'v.sock');
        const created = kiln(dir, [
          'create',
          'web',
          '--cpus',
          '1',
          '--memory',
          '128M',
          '--cpu-weight',
          '200',
          '--disk',
          disk,
          '--console-socket',
          hvcPath,
          '--vsock',
          `3,${vsockPath}`,
        ]);
        assert.equal(created.status, 0, created.stderr);
        // Two starts at once: one VMM. The daemon serialises state changes per VM.
        const both = await Promise.all([
          kilnAsync(dir, ['start', 'web', '--json']),
          kilnAsync(dir, ['start', 'web', '--json']),
        ]);
        const started = both.find((r) => r.status === 0);
        const refused = both.find((r) => r.status !== 0);
        assert.ok(started && refused, `one start succeeds, one is refused: ${JSON.stringify(both)}`);
        assert.equal(JSON.parse(started.stdout).state, 'running');
        assert.match(refused.stderr, /'web' is already running/);
        const pid = Number(readFileSync(join(dir, 'run', 'web', 'vmm.pid'), 'utf8'));
        // Jailed by default: its own uid, no new privileges, seccomp on every thread, its own root and mounts.
        const status = readFileSync(`/proc/${pid}/status`, 'utf8');
        const uid = Number(/^Uid:\s*(\d+)/m.exec(status)![1]);
        assert.ok(uid >= JAIL_UID_BASE, `the VMM runs as a jail uid (${uid})`);
        for (const tid of readdirSync(`/proc/${pid}/task`)) {
          const ts = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
          assert.match(ts, /^NoNewPrivs:\s*1$/m, `thread ${tid}`);
          assert.match(ts, /^Seccomp:\s*2$/m, `thread ${tid}`);
        }
        assert.notEqual(
          statSync(`/proc/${pid}/ns/mnt`).ino,
          statSync('/proc/self/ns/mnt').ino,
          'its own mount namespace',
        );
        assert.notEqual(statSync(`/proc/${pid}/root/`).ino, statSync('/').ino, "its root is not the host's");
        assert.ok(!existsSync(`/proc/${pid}/root/etc/passwd`), "the host's files are not in its jail");
        const info = kiln(dir, ['info', 'web']).stdout;
        assert.match(info, new RegExp(`^Jail: +uid ${uid}, chroot `, 'm'));
        assert.equal(statSync(disk).uid, uid, 'the 0600 disk is lent to the jail user');
        // The jail's console and vsock sockets, reached through the definition's paths.
        assert.ok(lstatSync(hvcPath).isSymbolicLink() && lstatSync(vsockPath).isSymbolicLink());
        assert.match(
          info,
          /^vsock: +CID 3, socket .*v\.sock \(in the jail; guest-initiated connections reach listeners at /m,
        );
        let hvc = '';
        const hvcClient = createConnection(hvcPath);
        await once(hvcClient, 'connect');
        hvcClient.setEncoding('utf8').on('data', (c: string) => (hvc += c));
        const vsockClient = createConnection(vsockPath);
        await once(vsockClient, 'connect');
        vsockClient.destroy();
        const cgroup = readFileSync(`/proc/${pid}/cgroup`, 'utf8');
        if (cgroupDirs('web').length > 0) assert.match(cgroup, /kiln\/web/, 'the VMM runs in its own cgroup');
        if (existsSync('/sys/fs/cgroup/cpu/kiln/web/cpu.shares'))
          assert.equal(readFileSync('/sys/fs/cgroup/cpu/kiln/web/cpu.shares', 'utf8').trim(), '2048');
        // The daemon dies; the VM does not; a new daemon finds it running.
        stopDaemon(dir);
        spawnSync('pkill', ['-9', '-f', `${CLI} daemon`]);
        const after = JSON.parse(kiln(dir, ['ls', '--json']).stdout) as { vms: Array<{ state: string; pid: number }> };
        assert.equal(after.vms[0]!.state, 'running');
        assert.equal(after.vms[0]!.pid, pid);
        assert.equal(kiln(dir, ['pause', 'web']).stdout.trim(), 'web: paused');
        assert.equal(kiln(dir, ['resume', 'web']).stdout.trim(), 'web: running');
        assert.equal(kiln(dir, ['rm', 'web']).status, 1, 'a running VM is not removed');
        // `kiln console`: the scroll-back, then the live console; what we type reaches the shell.
        for (let i = 0; i < 600 && !kiln(dir, ['logs', 'web']).stdout.includes('KILN_INIT'); i++) await sleep(500);
        await sleep(3000);
        // The init writes to hvc0 after its disk and entropy checks.
        for (let i = 0; i < 240 && !hvc.includes('KILN_HVC'); i++) await sleep(250);
        assert.match(
          kiln(dir, ['logs', 'web']).stdout,
          /KILN_BLK dev=vda sectors=2048 ro=0 /,
          'the lent disk was read',
        );
        assert.match(hvc, /KILN_HVC hello/, "the guest's hvc0 output reached the client through the jail's socket");
        hvcClient.destroy();
        // Piped: the input is typed into the guest's shell and its output printed; the console
        // ends once the input has ended and the guest has been quiet for --linger seconds.
        // The shell may not be up yet (its init installs busybox's links first, which takes a
        // while on software KVM): typed again until it answers; each run shows the scroll-back.
        let output = '';
        for (let attempt = 0; attempt < 8 && !/piped-42/.test(output); attempt++) {
          const piped = spawnSync(process.execPath, [CLI, 'console', 'web', '--linger', '15'], {
            input: 'echo piped-$((6*7))\n',
            encoding: 'utf8',
            env: { ...process.env, KILN_STATE_DIR: dir },
            timeout: 180_000,
          });
          assert.equal(piped.status, 0, piped.stderr);
          output = piped.stdout;
        }
        assert.match(output, /piped-42/, 'the piped command ran in the guest');
        const consoleProc = spawn(process.execPath, [CLI, 'console', 'web'], {
          env: { ...process.env, KILN_STATE_DIR: dir },
          stdio: ['pipe', 'pipe', 'pipe'],
        });
        let seen = '';
        consoleProc.stdout.setEncoding('utf8').on('data', (c: string) => (seen += c));
        const consoleExit = new Promise<number | null>((resolve) => consoleProc.on('exit', (c) => resolve(c)));
        await sleep(1000);
        consoleProc.stdin.write('echo console-$((6*7))\n');
        for (let i = 0; i < 120 && !seen.includes('console-42'); i++) await sleep(500);
        assert.match(seen, /KILN_INIT cpus=1 /, 'the scroll-back came first');
        assert.match(seen, /console-42/, 'the shell ran what was typed on the console');
        consoleProc.stdin.write('/bin/busybox poweroff -f\n');
        assert.equal(await consoleExit, 0, 'the console ends when the VM does');
        let state = 'running';
        for (let i = 0; i < 600 && state !== 'stopped'; i++) {
          await sleep(500);
          state = (JSON.parse(kiln(dir, ['info', 'web', '--json']).stdout) as { state: string }).state;
        }
        assert.equal(state, 'stopped');
        // The guest powered off on its own, under a daemon that did not spawn its VMM: the
        // daemon still gives the disk back and removes the socket links.
        for (let i = 0; i < 150 && (statSync(disk).uid !== 0 || present(hvcPath)); i++) await sleep(200);
        assert.equal(statSync(disk).uid, 0, "the disk is root's again");
        assert.ok(!present(hvcPath) && !present(vsockPath), 'the socket links are gone');
        assert.match(kiln(dir, ['logs', 'web']).stdout, /KILN_INIT cpus=1 /, 'the console log keeps the guest output');
        // Queries change nothing: the VM that powered off keeps its (empty) cgroup until it is removed.
        const cgroupDir = cgroupDirs('web')[0];
        if (cgroupDir) assert.ok(existsSync(cgroupDir), 'ls and info left the cgroup alone');
        assert.equal(kiln(dir, ['rm', 'web']).status, 0);
        if (cgroupDir) assert.ok(!existsSync(cgroupDir), 'rm removed the cgroup');
        assert.equal(JSON.parse(kiln(dir, ['ls', '--json']).stdout).vms.length, 0);
      } finally {
        // After a failure: no VMM left running, no cgroup left behind.
        kiln(dir, ['stop', 'web', '--force']);
        kiln(dir, ['rm', 'web']);
        stopDaemon(dir);
      }
    },
  );

  test(
    'two VMs pinned to one host CPU share it by their CPU weights (300:100 -> about 3:1)',
    { skip: kvmSkip || (cgroupDirs('x').length === 0 ? 'needs cgroups' : false), timeout: 5 * 60_000 },
    async () => {
      const dir = tempDir();
      try {
        for (const [name, weight] of [
          ['heavy', '300'],
          ['light', '100'],
        ] as const) {
          assert.equal(
            kiln(dir, ['create', name, '--cmdline', 'kiln.spin', '--cpu-weight', weight, '--pin', '0']).status,
            0,
          );
          const r = kiln(dir, ['start', name]);
          assert.equal(r.status, 0, r.stderr);
        }
        // CPU time (user + system ticks) of each VMM's vCPU threads.
        const vcpuTicks = (name: string): number => {
          const pid = Number(readFileSync(join(dir, 'run', name, 'vmm.pid'), 'utf8'));
          let ticks = 0;
          for (const tid of readdirSync(`/proc/${pid}/task`)) {
            if (!readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').startsWith('fc_vcpu')) continue;
            const fields = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8').split(') ')[1]!.split(' ');
            ticks += Number(fields[11]) + Number(fields[12]);
          }
          return ticks;
        };
        // Both vCPUs are busy from the start (booting, then kiln.spin's loop) and pinned to CPU 0.
        await sleep(3000);
        const before = [vcpuTicks('heavy'), vcpuTicks('light')];
        await sleep(10_000);
        const heavy = vcpuTicks('heavy') - before[0]!;
        const light = vcpuTicks('light') - before[1]!;
        const share = heavy / (heavy + light);
        process.stderr.write(
          `# CPU share of the weight-300 VM against the weight-100 one: ${share.toFixed(3)} (${heavy} vs ${light} ticks)\n`,
        );
        assert.ok(heavy + light > 500, `both VMs ran (${heavy + light} ticks in 10 s)`);
        assert.ok(share > 0.65 && share < 0.85, `share ${share.toFixed(3)} is about 0.75`);
      } finally {
        kiln(dir, ['stop', 'heavy', '--force']);
        kiln(dir, ['stop', 'light', '--force']);
        // rm also removes their cgroups (named by VM, shared by every state directory).
        kiln(dir, ['rm', 'heavy']);
        kiln(dir, ['rm', 'light']);
        stopDaemon(dir);
      }
    },
  );
});
