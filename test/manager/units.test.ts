// The manager's pure parts: cgroup file writes (on a fake cgroup tree), the definition
// `kiln create` sends (flags, or a file whose relative paths are the file's), the
// readable `kiln info`, the console's escape keys, and the one exit-status table.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { EscapeDecoder } from '../../src/console-relay.js';
import { EXIT_OK, EXIT_VM_FAILED, vmExitStatus } from '../../src/exit-status.js';
import { affinityOf, pinThread } from '../../src/manager/affinity.js';
import { cgroupVersion, controllerSet, cpuMax, prepareCgroup, spawnInCgroup } from '../../src/manager/cgroup.js';
import { waitFor } from '../../src/manager/wait.js';
import { infoText } from '../../src/manager/commands.js';
import { definitionInput } from '../../src/manager/create-input.js';
import { parseDefinition } from '../../src/manager/definition.js';
import type { InfoReply } from '../../src/manager/protocol.js';
import {
  JAIL_CONSOLE,
  JAIL_UID_BASE,
  JAIL_VSOCK,
  prepareJail,
  removeSocketLinks,
  returnLentFiles,
} from '../../src/manager/jail.js';
import { parseVmConfig } from '../../src/config/vm-config.js';
import { tempDir } from '../helpers.js';

/** A cgroup v2 root as the kernel shows it: controllers available, none enabled for children. */
function fakeV2(controllers: string): string {
  const root = tempDir();
  writeFileSync(join(root, 'cgroup.controllers'), `${controllers}\n`);
  writeFileSync(join(root, 'cgroup.subtree_control'), '');
  mkdirSync(join(root, 'kiln'));
  writeFileSync(join(root, 'kiln', 'cgroup.subtree_control'), '');
  return root;
}

describe('cgroups', () => {
  test('controller names are matched whole: "cpuset" is not "cpu"', () => {
    assert.deepEqual([...controllerSet('cpuset io memory pids\n')], ['cpuset', 'io', 'memory', 'pids']);
    assert.equal(controllerSet('cpuset memory').has('cpu'), false);
    // A v2 host with cpuset but no cpu controller is refused with the reason, not half set up.
    const root = fakeV2('cpuset io memory pids');
    assert.throws(
      () => prepareCgroup('web', { cpuWeight: 100, cpuQuotaPercent: 0, memoryBytes: 1 << 30 }, root),
      /controller 'cpu' is not available/,
    );
  });

  test('v2: cpu and memory are enabled for the children (cpuset already being on does not count), then the limits written', () => {
    const root = fakeV2('cpuset cpu io memory pids');
    writeFileSync(join(root, 'cgroup.subtree_control'), 'cpuset');
    // The fake tree does not apply "+cpu" as the kernel would; each write is what Kiln asked for.
    const procs = prepareCgroup('web', { cpuWeight: 300, cpuQuotaPercent: 150, memoryBytes: 640 << 20 }, root);
    assert.equal(cgroupVersion(root), 2);
    assert.deepEqual(procs, [join(root, 'kiln', 'web', 'cgroup.procs')]);
    assert.equal(readFileSync(join(root, 'kiln', 'web', 'cpu.weight'), 'utf8'), '300');
    assert.equal(readFileSync(join(root, 'kiln', 'web', 'cpu.max'), 'utf8'), '150000 100000');
    assert.equal(readFileSync(join(root, 'kiln', 'web', 'memory.max'), 'utf8'), String(640 << 20));
    assert.match(readFileSync(join(root, 'cgroup.subtree_control'), 'utf8'), /^\+(cpu|memory)$/);
    assert.equal(cpuMax(0), 'max 100000');
  });

  test('v1: shares, quota and memory limit in their hierarchies; joining writes the pid to both', async () => {
    const root = tempDir();
    mkdirSync(join(root, 'cpu'));
    mkdirSync(join(root, 'memory'));
    const procs = prepareCgroup('db', { cpuWeight: 50, cpuQuotaPercent: 0, memoryBytes: 256 << 20 }, root);
    const dirs = [join(root, 'cpu', 'kiln', 'db'), join(root, 'memory', 'kiln', 'db')];
    assert.deepEqual(
      procs,
      dirs.map((d) => join(d, 'cgroup.procs')),
    );
    assert.equal(readFileSync(join(root, 'cpu', 'kiln', 'db', 'cpu.shares'), 'utf8'), '512');
    assert.equal(readFileSync(join(root, 'cpu', 'kiln', 'db', 'cpu.cfs_quota_us'), 'utf8'), '-1');
    assert.equal(readFileSync(join(root, 'memory', 'kiln', 'db', 'memory.limit_in_bytes'), 'utf8'), String(256 << 20));
    const child = spawnInCgroup(procs, ['true'], { stdio: 'ignore' });
    assert.equal(await new Promise<number | null>((resolve) => child.on('exit', resolve)), 0);
    for (const p of procs)
      assert.equal(readFileSync(p, 'utf8').trim(), String(child.pid), 'joining writes the pid to both');
  });
});

describe('kiln create', () => {
  test('flags become a definition with absolute paths and the manager fields', () => {
    const input = definitionInput('web', {
      cpuWeight: '200',
      cpuQuota: '50',
      pin: '0,1',
      vm: { cpus: '2', memory: '256M', disk: ['disk.img,root'], net: ['passt=p.sock'] },
    });
    const d = parseDefinition(input);
    assert.equal(d.cpuWeight, 200);
    assert.equal(d.cpuQuotaPercent, 50);
    assert.deepEqual(d.pinCpus, [0, 1]);
    assert.equal(d.disks[0]!.path, join(process.cwd(), 'disk.img'));
    assert.equal(d.nets[0]!.passt, join(process.cwd(), 'p.sock'));
    assert.throws(
      () => parseDefinition(definitionInput('web', { pin: '0,x', vm: {} })),
      /pinCpus\[1\]: must be a whole number from 0 to 8191 \(got 'x'\)/,
    );
  });

  test("a definition file's relative paths are relative to the file", () => {
    const dir = tempDir();
    const file = join(dir, 'vm.yaml');
    writeFileSync(
      file,
      'name: db\nkernel: vmlinux\ndisks:\n  - path: images/root.img\n    root: true\nvsock: { guestCid: 3, uds: v.sock }\n',
    );
    const d = parseDefinition(definitionInput(undefined, { file, vm: {} }));
    assert.equal(d.kernel, join(dir, 'vmlinux'));
    assert.equal(d.disks[0]!.path, join(dir, 'images', 'root.img'));
    assert.equal(d.vsock!.uds, join(dir, 'v.sock'));
    writeFileSync(file, '- just\n- a list\n');
    assert.throws(() => definitionInput(undefined, { file, vm: {} }), /must hold one VM definition/);
  });
});

test('kiln info reads as a summary', () => {
  const definition = parseDefinition({
    name: 'web',
    cpus: 2,
    memoryMiB: 256,
    disks: [{ path: '/var/vm/root.img', root: true }],
    nets: [{ tap: 'tap0' }],
    pinCpus: [1],
  });
  const info: InfoReply = {
    name: 'web',
    state: 'running',
    pid: 1234,
    cpus: 2,
    memoryMiB: 256,
    startedAt: new Date(Date.now() - 3_725_000).toISOString(),
    definition,
    cgroup: { dirs: ['/sys/fs/cgroup/kiln/web'], cpuWeight: 100, cpuQuotaPercent: 0, memoryLimitBytes: 768 << 20 },
    consoleLog: '/var/lib/kiln/run/web/console.log',
    jail: { jailed: true, uid: 2000000000, root: '/run/kiln/web/jail/vmm-cli.js/web/root' },
  };
  const text = infoText(info);
  assert.match(text, /^Name: +web$/m);
  assert.match(text, /^State: +running$/m);
  assert.match(text, /^Uptime: +1h 2m 5s$/m);
  assert.match(text, /^vCPUs: +2 \(pinned to host CPUs 1\)$/m);
  assert.match(text, /^Disk: +disk0: \/var\/vm\/root\.img \(root\)$/m);
  assert.match(text, /^NIC: +net0: tap tap0$/m);
  assert.match(text, /^Limits: +CPU weight 100, CPU quota none, memory 768 MiB$/m);
  assert.match(text, /^Console log: \/var\/lib\/kiln\/run\/web\/console\.log$/m);
  assert.match(
    text,
    /^Jail: +uid 2000000000, chroot \/run\/kiln\/web\/jail\/vmm-cli\.js\/web\/root, seccomp, no new privileges$/m,
  );
  // Said loudly when a VM runs unjailed.
  const loose = infoText({ ...info, jail: { jailed: false, uid: null, root: null } });
  assert.match(loose, /^Jail: +NONE: started with --no-jail, the VMM runs as root/m);
  // Sockets, and where a jailed VMM's guest-initiated vsock connections go.
  const sockets = infoText({
    ...info,
    definition: { ...definition, vsock: { guestCid: 3, uds: '/srv/v.sock' }, consoleSocket: '/srv/hvc.sock' },
  });
  assert.match(
    sockets,
    /^vsock: +CID 3, socket \/srv\/v\.sock \(in the jail; guest-initiated connections reach listeners at \/run\/kiln\/web\/jail\/vmm-cli\.js\/web\/root\/run\/vsock\/v\.sock_PORT\)$/m,
  );
  assert.match(sockets, /^Console: +virtio console on \/srv\/hvc\.sock$/m);
});

test('console escapes: Ctrl-A x quits, Ctrl-A p presses the power button, Ctrl-A Ctrl-A sends one', () => {
  const sent: number[] = [];
  let quit = 0;
  let power = 0;
  const decoder = new EscapeDecoder({ send: (b) => sent.push(...b), quit: () => quit++, powerButton: () => power++ });
  decoder.feed(Buffer.from('ls\r'));
  decoder.feed(Uint8Array.of(0x01)); // split across chunks
  decoder.feed(Uint8Array.of(0x01, 0x61, 0x01, 0x70, 0x01, 0x78));
  assert.deepEqual(sent, [...Buffer.from('ls\r'), 0x01, 0x61]);
  assert.equal(power, 1);
  assert.equal(quit, 1);
  // Where there is no power button (kiln console), Ctrl-A p sends p.
  const plain: number[] = [];
  new EscapeDecoder({ send: (b) => plain.push(...b), quit: () => undefined }).feed(Uint8Array.of(0x01, 0x70));
  assert.deepEqual(plain, [0x70]);
});

test('one exit-status table for kiln run and kiln-vmm', () => {
  assert.equal(vmExitStatus({ reason: 'guest-exit', exitCode: 7 }), 7);
  assert.equal(vmExitStatus({ reason: 'guest-exit', exitCode: null }), EXIT_OK);
  assert.equal(vmExitStatus({ reason: 'hlt', exitCode: null }), EXIT_OK);
  assert.equal(vmExitStatus({ reason: 'stopped', exitCode: null }), EXIT_OK);
  for (const reason of ['shutdown', 'fail-entry', 'internal-error', 'unhandled-exit', 'error'] as const)
    assert.equal(vmExitStatus({ reason, exitCode: null }), EXIT_VM_FAILED);
});

test('a command spawned in a cgroup is in it before it executes: its first act reads its own pid in cgroup.procs', async () => {
  const dir = tempDir();
  const procs = [join(dir, 'cpu.procs'), join(dir, 'memory.procs')];
  const child = spawnInCgroup(procs, ['/bin/sh', '-c', `cat "${procs[0]}" "${procs[1]}"; echo $$`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (out += c));
  const status = await new Promise<number | null>((resolve) => child.on('exit', resolve));
  assert.equal(status, 0);
  assert.deepEqual(
    out.trim().split('\n'),
    [String(child.pid), String(child.pid), String(child.pid)],
    'same pid: written, then exec',
  );
  // A cgroup it cannot join: the command never runs.
  const refused = spawnInCgroup([join(dir, 'missing', 'cgroup.procs')], ['/bin/sh', '-c', 'echo ran'], {
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  let ran = '';
  refused.stdout!.setEncoding('utf8').on('data', (c: string) => (ran += c));
  assert.equal(await new Promise<number | null>((resolve) => refused.on('exit', resolve)), 125);
  assert.equal(ran, '');
});

test('vCPU pinning through sched_setaffinity: the thread runs where it was put; a CPU the host lacks is refused with the reason', async () => {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  try {
    assert.equal(pinThread(child.pid!, 0), null);
    assert.deepEqual(affinityOf(child.pid!), [0]);
    assert.match(pinThread(child.pid!, 4000) ?? '', /^EINVAL/);
    assert.deepEqual(affinityOf(child.pid!), [0], 'unchanged by the refused pinning');
  } finally {
    child.kill();
  }
});

test('waiting backs off (10 ms doubling to 250 ms) instead of sleeping fixed steps, and gives up at its deadline', async () => {
  let now = 0;
  const slept: number[] = [];
  const clock = { now: () => now, sleep: async (ms: number) => void (slept.push(ms), (now += ms)) };
  let calls = 0;
  assert.equal(await waitFor(() => (++calls >= 4 ? 'done' : null), 5_000, clock), 'done');
  assert.deepEqual(slept, [10, 20, 40]);
  slept.length = 0;
  now = 0;
  assert.equal(await waitFor(() => null, 1_000, clock), null);
  assert.deepEqual(slept, [10, 20, 40, 80, 160, 250, 250, 190], 'the last wait is cut to the deadline');
  slept.length = 0;
  now = 0;
  assert.equal(await waitFor(() => null, 100, clock, 20), null);
  assert.deepEqual(slept, [10, 20, 20, 20, 20, 10], 'a capped back-off');
});

test(
  "a jail's files: what the jail user could not open is lent to it (kernel, a writable disk), the rest left alone, and all given back",
  { skip: process.getuid?.() === 0 ? false : 'chown needs root' },
  () => {
    const dir = tempDir();
    const kernel = join(dir, 'vmlinux');
    const initrd = join(dir, 'initrd');
    const disk = join(dir, 'disk.img');
    writeFileSync(kernel, 'k', { mode: 0o600 });
    writeFileSync(initrd, 'i', { mode: 0o644 });
    writeFileSync(disk, Buffer.alloc(512), { mode: 0o644 });
    for (const f of [kernel, initrd, disk]) chmodSync(f, f === kernel ? 0o600 : 0o644);
    const uid = JAIL_UID_BASE + 123;
    const run = join(dir, 'run');
    mkdirSync(run);
    const config = parseVmConfig({ kernel, initrd, disks: [{ path: disk }] });
    const { argv, record } = prepareJail(run, 'vm1', config, uid, () => false);
    assert.equal(statSync(kernel).uid, uid, 'the kernel (0600) is lent');
    assert.equal(statSync(disk).uid, uid, 'the read-write disk (0644) is lent');
    assert.equal(statSync(initrd).uid, 0, 'the world-readable initrd is left alone');
    assert.ok(argv.includes(`${disk}:${disk}:rw`) && argv.includes(`${kernel}:${kernel}:ro`), argv.join(' '));
    const configFile = join(record.root!, 'kiln-config.json');
    assert.equal(statSync(configFile).uid, uid);
    assert.equal(statSync(configFile).mode & 0o777, 0o600, "the config is the jail user's alone");
    assert.deepEqual(returnLentFiles(record), []);
    for (const f of [kernel, initrd, disk]) assert.equal(statSync(f).uid, 0, `${f} is root's again`);
  },
);

test(
  "a jail's sockets: the VMM's vsock and console sockets are in its jail, linked from the definition's paths; passt's socket is bound in and lent",
  { skip: process.getuid?.() === 0 ? false : 'chown needs root' },
  async () => {
    const dir = tempDir();
    const kernel = join(dir, 'vmlinux');
    writeFileSync(kernel, 'k', { mode: 0o644 });
    chmodSync(kernel, 0o644);
    const passtSock = join(dir, 'passt.sock');
    const passt = createServer();
    await new Promise<void>((resolve) => passt.listen(passtSock, resolve));
    chmodSync(passtSock, 0o755);
    try {
      const uid = JAIL_UID_BASE + 124;
      const run = join(dir, 'run');
      mkdirSync(run);
      const uds = join(dir, 'v.sock');
      const hvc = join(dir, 'hvc.sock');
      const config = parseVmConfig({
        kernel,
        vsock: { guestCid: 3, uds },
        consoleSocket: hvc,
        nets: [{ passt: passtSock }],
      });
      const { argv, record } = prepareJail(run, 'vm1', config, uid, () => false);
      const root = record.root!;
      // The VMM inside sees its own socket paths; the definition's paths link to them.
      const inside = JSON.parse(readFileSync(join(root, 'kiln-config.json'), 'utf8')) as {
        vsock: { uds: string };
        consoleSocket: string;
        nets: Array<{ passt: string }>;
      };
      assert.equal(inside.vsock.uds, JAIL_VSOCK);
      assert.equal(inside.consoleSocket, JAIL_CONSOLE);
      assert.equal(inside.nets[0]!.passt, '/run/passt-0.sock');
      assert.equal(readlinkSync(uds), join(root, JAIL_VSOCK));
      assert.equal(readlinkSync(hvc), join(root, JAIL_CONSOLE));
      assert.deepEqual(record.links, [uds, hvc]);
      // Listeners for guest-initiated vsock connections go in a directory of the jail user's.
      const vsockDir = statSync(join(root, 'run', 'vsock'));
      assert.equal(vsockDir.uid, uid);
      assert.equal(vsockDir.mode & 0o777, 0o700);
      // passt's socket (0755: the jail user could not connect) is lent and bound into the jail.
      assert.ok(argv.includes(`${passtSock}:/run/passt-0.sock:rw`), argv.join(' '));
      assert.equal(statSync(passtSock).uid, uid);
      assert.deepEqual(returnLentFiles(record), []);
      assert.equal(statSync(passtSock).uid, 0, "passt's socket is given back");
      removeSocketLinks(run, record);
      assert.ok(!existsSync(uds) && !existsSync(hvc), 'the links went at stop');
      // A path someone else uses is refused, not replaced, and nothing is lent.
      writeFileSync(uds, 'not ours');
      chmodSync(passtSock, 0o755);
      assert.throws(
        () => prepareJail(run, 'vm1', config, uid, () => false),
        new RegExp(`'${uds}' exists: the jailed VMM's socket is linked there`),
      );
      assert.equal(readFileSync(uds, 'utf8'), 'not ours');
      assert.equal(statSync(passtSock).uid, 0, 'nothing lent by the refused start');
      // removeSocketLinks leaves alone what it did not make.
      removeSocketLinks(run, { ...record, links: [uds] });
      assert.equal(readFileSync(uds, 'utf8'), 'not ours');
      // A passt socket that is not there (passt not running) is named.
      rmSync(uds);
      assert.throws(
        () =>
          prepareJail(
            run,
            'vm1',
            parseVmConfig({ kernel, nets: [{ passt: join(dir, 'none.sock') }] }),
            uid,
            () => false,
          ),
        /passt socket '.*none\.sock' of 'vm1' is not a socket: is passt running\?/,
      );
    } finally {
      passt.close();
    }
  },
);
