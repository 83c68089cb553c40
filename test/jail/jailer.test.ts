// kiln-jailer as orchestrators run Firecracker's jailer: its argument checks, the path
// exposure it builds the chroot from, and a jailed kiln-vmm seen from the host (uid, no
// new privileges, seccomp, its own root and mount, pid and network namespaces, cgroup,
// resource limits, device nodes) booting the kit's Linux to power-off.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmdirSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { buildInitramfs, buildMinimalKernel } from '../../src/guestkit/build.js';
import {
  elfInterpreter,
  exposure,
  loadedAddons,
  packageRoot,
  parseBind,
  sharedLibraries,
} from '../../src/jail/plan.js';
import * as libc from '../../src/kvm/libc.js';
import { cgroupMounts } from '../../src/jail/cgroup.js';
import { unixHttp } from '../../src/manager/manager.js';
import { createGuestMemoryFile } from '../../src/memory/shared-memory.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';

const JAILER = fileURLToPath(new URL('../../src/jail/jailer-cli.cjs', import.meta.url));
const VMM = fileURLToPath(new URL('../../src/vmm-cli.cjs', import.meta.url));
const isRoot = process.getuid?.() === 0;
const rootSkip = isRoot ? false : 'kiln-jailer needs root';
if (!isRoot) process.stdout.write('# SKIPPING jailed-VMM tests: they need root\n');
const log = (line: string) => process.stderr.write(`# guest kit: ${line}\n`);
const jailer = (args: string[]) =>
  spawnSync(process.execPath, [JAILER, ...args], { encoding: 'utf8', timeout: 60_000 });

const base_ = (chrootBase: string) => [
  '--exec-file',
  VMM,
  '--uid',
  '4000',
  '--gid',
  '4000',
  '--chroot-base-dir',
  chrootBase,
];

describe('kiln-jailer arguments', () => {
  const base = ['--exec-file', VMM, '--uid', '4000', '--gid', '4000'];
  test('a bad id, uid, resource limit, cgroup, parent cgroup or bind is refused with the reason, exit status 2', () => {
    const cases: Array<[string[], RegExp]> = [
      [['--id', 'a/b', ...base], /invalid --id 'a\/b'/],
      [['--id', 'x'.repeat(65), ...base], /at most 64 characters/],
      [['--id', 'ok', '--exec-file', VMM, '--uid', '-1', '--gid', '0'], /invalid --uid '-1'/],
      [['--id', 'ok', ...base, '--resource-limit', 'cpu=5'], /invalid --resource-limit 'cpu=5'/],
      [['--id', 'ok', ...base, '--cgroup', 'cpu.shares'], /invalid --cgroup 'cpu\.shares'/],
      [['--id', 'ok', ...base, '--parent-cgroup', '../escape'], /invalid --parent-cgroup '\.\.\/escape'/],
      [['--id', 'ok', ...base, '--bind', 'relative:/x'], /invalid --bind 'relative:\/x'/],
      [['--id', 'ok', ...base, '--chroot-base-dir', 'srv'], /--chroot-base-dir must be absolute/],
      [['--id', 'ok', ...base, '--pass-fd', '2'], /invalid --pass-fd '2': an inherited fd, 3 or more/],
      [['--id', 'ok', ...base, '--pass-fd', '999'], /invalid --pass-fd 999: it is not open/],
    ];
    for (const [args, message] of cases) {
      const r = jailer(args);
      assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message);
    }
    assert.deepEqual(parseBind('/a:/b:rw'), { source: '/a', target: '/b', rw: true });
    assert.deepEqual(parseBind('/a'), { source: '/a', target: '/a', rw: false });
  });

  test(
    'run by a user other than root it refuses before touching anything',
    { skip: rootSkip || (toolAvailable('setpriv', '--version') ? false : 'needs setpriv') },
    () => {
      const dir = tempDir();
      const r = spawnSync(
        'setpriv',
        [
          '--reuid',
          '65534',
          '--regid',
          '65534',
          '--clear-groups',
          process.execPath,
          JAILER,
          '--id',
          'x',
          ...base,
          '--chroot-base-dir',
          dir,
        ],
        { encoding: 'utf8' },
      );
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, /kiln-jailer must run as root/);
      assert.deepEqual(readdirSync(dir), []);
    },
  );

  test(
    '--daemonize: its own session, stdio on /dev/null; the VMM serves its API in the jail until SIGTERM',
    { skip: rootSkip },
    async () => {
      const base = tempDir();
      const id = `daemon-${process.pid}`;
      const child = spawn(process.execPath, [JAILER, '--id', id, ...base_(base), '--daemonize'], { stdio: 'ignore' });
      const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
      const sock = join(base, 'vmm-cli.cjs', id, 'root', 'run', 'firecracker.socket');
      for (let i = 0; i < 400 && !existsSync(sock); i++) await sleep(25);
      assert.ok(existsSync(sock), 'the API socket appeared where orchestrators look for it');
      const pid = child.pid!;
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      assert.equal(Number(stat[3]), pid, 'a session of its own (setsid)');
      for (const fd of [0, 1, 2]) assert.equal(readlinkSync(`/proc/${pid}/fd/${fd}`), '/dev/null', `fd ${fd}`);
      process.kill(pid, 'SIGTERM');
      assert.equal(await exited, 0);
    },
  );

  test(
    '--pass-fd: an inherited guest memory file reaches the jailed VMM, which takes it as memory_fd; no other fd crosses',
    { skip: rootSkip },
    async () => {
      const base = tempDir();
      const id = `passfd-${process.pid}`;
      const memory = createGuestMemoryFile(4 * 1024 * 1024, false);
      const stray = libc.memfdCreate('kiln-stray', 0);
      const child = spawn(process.execPath, [JAILER, '--id', id, ...base_(base), '--daemonize', '--pass-fd', '3'], {
        stdio: ['ignore', 'ignore', 'ignore', memory, stray],
      });
      closeSync(memory);
      closeSync(stray);
      const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
      const sock = join(base, 'vmm-cli.cjs', id, 'root', 'run', 'firecracker.socket');
      for (let i = 0; i < 400 && !existsSync(sock); i++) await sleep(25);
      assert.ok(existsSync(sock), 'the jailed VMM serves its API');
      const pid = child.pid!;
      const fds = readdirSync(`/proc/${pid}/fd`).map((fd) => [fd, readlinkSync(`/proc/${pid}/fd/${fd}`)]);
      assert.deepEqual(
        fds.filter(([, target]) => target!.startsWith('/memfd:')),
        [['3', '/memfd:kiln-guest-ram (deleted)']],
        'fd 3 is the guest memory file; the fd not named (4) was closed at exec',
      );
      const r = await unixHttp(sock, 'PUT', '/migration/receive', {
        listen: 'unix:/run/in.sock',
        token: 't',
        memory_fd: 3,
      });
      assert.equal(r.status, 204, JSON.stringify(r.body));
      process.kill(pid, 'SIGTERM');
      assert.equal(await exited, 0);
    },
  );

  test("device numbers: makedev and its inverse agree with glibc's encoding (minors past 255, as userfaultfd's)", () => {
    for (const [major, minor] of [
      [10, 232],
      [10, 257],
      [1, 9],
      [4097, 70000],
    ] as const)
      assert.deepEqual(libc.deviceNumbers(Number(libc.makedev(major, minor))), { major, minor });
    // /dev/null is 1:3 as stat reports it.
    assert.deepEqual(libc.deviceNumbers(statSync('/dev/null').rdev), { major: 1, minor: 3 });
  });

  test("the jail's libraries are the dynamic loader's own answer, as ldd gives it, for node and the addon build it loaded", () => {
    const fromLdd = (file: string) =>
      execFileSync('ldd', [file], { encoding: 'utf8' })
        .split('\n')
        .map((l) => (/=>\s+(\/\S+)/.exec(l) ?? /^\s*(\/\S+)\s+\(/.exec(l))?.[1])
        .filter((l): l is string => l !== undefined);
    const node = process.execPath;
    const loader = elfInterpreter(node);
    assert.ok(loader !== null && existsSync(loader), `node names its loader: ${loader}`);
    assert.deepEqual(sharedLibraries(node), fromLdd(node));
    assert.ok(sharedLibraries(node).some((l) => l.endsWith('/libc.so.6')));
    // This process has loaded koffi (libc.js): exactly that build is listed, not the others koffi ships.
    const root = packageRoot(VMM);
    const addons = loadedAddons(root);
    assert.equal(addons.length, 1, addons.join(', '));
    assert.match(addons[0]!, /koffi.*\.node$/);
    assert.equal(elfInterpreter(addons[0]!), null, "a shared object names no loader: node's lists it");
    assert.deepEqual(sharedLibraries(addons[0]!), fromLdd(addons[0]!));
    assert.equal(elfInterpreter(VMM), null, 'not an ELF file');
    assert.equal(elfInterpreter(join(tempDir(), 'absent')), null, 'no file');
    assert.throws(() => sharedLibraries(join(tempDir(), 'absent')), /cannot list the libraries of .*absent/);
  });

  test('a path is exposed with every symbolic link on its way recreated, and only the end bound', () => {
    const dir = tempDir();
    mkdirSync(join(dir, 'usr/lib/arch'), { recursive: true });
    writeFileSync(join(dir, 'usr/lib/arch/libx.so.1.2'), '');
    symlinkSync('libx.so.1.2', join(dir, 'usr/lib/arch/libx.so.1'));
    symlinkSync('usr/lib', join(dir, 'lib'));
    const steps = exposure(join(dir, 'lib/arch/libx.so.1'));
    const own = steps.filter((s) => s.path.startsWith(`${dir}/`));
    assert.deepEqual(own, [
      { kind: 'symlink', path: join(dir, 'lib'), target: 'usr/lib' },
      { kind: 'mkdir', path: join(dir, 'usr') },
      { kind: 'mkdir', path: join(dir, 'usr/lib') },
      { kind: 'mkdir', path: join(dir, 'usr/lib/arch') },
      { kind: 'symlink', path: join(dir, 'usr/lib/arch/libx.so.1'), target: 'libx.so.1.2' },
      { kind: 'bind', path: join(dir, 'usr/lib/arch/libx.so.1.2'), dir: false },
    ]);
  });
});

function status(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const m = /^(\w+):\s*(.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

describe('a jailed kiln-vmm', { skip: kvmSkip || rootSkip, timeout: 20 * 60_000 }, () => {
  test('runs as the jail user with no new privileges and seccomp on every thread, pivoted into its chroot, in its own namespaces and cgroup, and boots Linux to power-off', async () => {
    const kernel = await buildMinimalKernel(log);
    const initrd = await buildInitramfs(log);
    const base = tempDir();
    const id = `jail-test-${process.pid}`;
    const uid = 40000 + (process.pid % 20000);
    const rootDir = join(base, 'vmm-cli.cjs', id, 'root');
    mkdirSync(rootDir, { recursive: true });
    // What an orchestrator puts in the jail before it starts the VMM.
    copyFileSync(kernel.vmlinux, join(rootDir, 'vmlinux'));
    copyFileSync(initrd.path, join(rootDir, 'initrd.cpio'));
    writeFileSync(
      join(rootDir, 'vm.json'),
      JSON.stringify({
        'boot-source': { kernel_image_path: '/vmlinux', initrd_path: '/initrd.cpio', boot_args: 'console=ttyS0' },
        'machine-config': { vcpu_count: 1, mem_size_mib: 128 },
        drives: [],
      }),
    );
    // A network namespace and a cgroup of the test's own.
    const ns = `kiln-jt${process.pid}`;
    execFileSync('ip', ['netns', 'add', ns]);
    after(() => execFileSync('ip', ['netns', 'del', ns]));
    const v2 = cgroupMounts().some((m) => m.type === 'cgroup2' && m.dir === '/sys/fs/cgroup');
    const parent = `kiln-jail-test-${process.pid}`;
    const cgroupValue = v2 ? 'pids.max=500' : 'cpu.shares=512';
    const args = [
      '--id',
      id,
      '--exec-file',
      VMM,
      '--uid',
      String(uid),
      '--gid',
      String(uid),
      '--chroot-base-dir',
      base,
      '--netns',
      `/var/run/netns/${ns}`,
      '--new-pid-ns',
      '--cgroup-version',
      v2 ? '2' : '1',
      '--parent-cgroup',
      parent,
      '--cgroup',
      cgroupValue,
      '--resource-limit',
      'no-file=1024',
      '--',
      '--config-file',
      '/vm.json',
    ];
    const child = spawn(process.execPath, [JAILER, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (output += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (output += c));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
    after(() => {
      // The cgroup directories the jailer made (empty once the VMM is gone).
      for (const m of cgroupMounts()) {
        for (const dir of [join(m.dir, parent, id), join(m.dir, parent)]) if (existsSync(dir)) rmdirSync(dir);
      }
    });

    const pidFile = join(rootDir, 'vmm-cli.cjs.pid');
    for (let i = 0; i < 400 && !existsSync(join(rootDir, 'run/firecracker.socket')); i++) await sleep(25);
    assert.ok(existsSync(pidFile), `the pid file (--new-pid-ns):\n${output}`);
    const pid = Number(readFileSync(pidFile, 'utf8'));
    // Wait for the vCPU thread so every thread's filters can be read.
    let threads: string[] = [];
    for (let i = 0; i < 400; i++) {
      threads = readdirSync(`/proc/${pid}/task`);
      if (threads.some((t) => readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').startsWith('fc_vcpu'))) break;
      await sleep(25);
    }
    const s = status(pid);
    assert.equal(s.Uid, `${uid}\t${uid}\t${uid}\t${uid}`, 'real, effective, saved and fs uid');
    assert.equal(s.Gid, `${uid}\t${uid}\t${uid}\t${uid}`);
    assert.equal(s.Groups, '', 'no supplementary groups');
    assert.equal(s.CapEff, '0000000000000000', 'no capabilities');
    assert.equal(s.NSpid?.split('\t')[1], '1', 'pid 1 of its own pid namespace');
    for (const t of threads) {
      const ts = readFileSync(`/proc/${pid}/task/${t}/status`, 'utf8');
      assert.match(ts, /^NoNewPrivs:\s*1$/m, `thread ${t}: NoNewPrivs`);
      assert.match(ts, /^Seccomp:\s*2$/m, `thread ${t}: Seccomp`);
    }
    // pivot_root: its / is the jail's root, and the host's files are not there.
    const root = statSync(`/proc/${pid}/root/`);
    const jail = statSync(rootDir);
    assert.deepEqual([root.dev, root.ino], [jail.dev, jail.ino], "the VMM's root is the chroot");
    assert.ok(!existsSync(`/proc/${pid}/root/etc/shadow`), "the host's /etc is not in the jail");
    assert.ok(!existsSync(`/proc/${pid}/root/old_root`), 'the old root is gone');
    assert.notEqual(statSync(`/proc/${pid}/ns/mnt`).ino, statSync('/proc/self/ns/mnt').ino, 'its own mount namespace');
    assert.equal(
      statSync(`/proc/${pid}/ns/net`).ino,
      statSync(`/var/run/netns/${ns}`).ino,
      'the given network namespace',
    );
    assert.match(readFileSync(`/proc/${pid}/limits`, 'utf8'), /^Max open files\s+1024\s+1024/m);
    assert.match(readFileSync(`/proc/${pid}/cgroup`, 'utf8'), new RegExp(`/${parent}/${id}$`, 'm'));
    const nodes = [
      'dev/kvm',
      'dev/net/tun',
      'dev/urandom',
      ...(existsSync('/dev/userfaultfd') ? ['dev/userfaultfd'] : []),
    ];
    for (const node of nodes) {
      const st = statSync(`/proc/${pid}/root/${node}`);
      assert.ok(st.isCharacterDevice(), node);
      assert.equal(st.rdev, statSync(`/${node}`).rdev, `${node} is the host's device`);
      assert.equal(st.uid, uid, `${node} belongs to the jail user`);
    }

    const guard = sleep(12 * 60_000, null, { ref: false });
    const code = await Promise.race([exited, guard]);
    if (code === null) child.kill('SIGKILL');
    assert.equal(code, 0, `the jailed VMM exits 0 when the guest powers off:\n${output.slice(-3000)}`);
    assert.match(output, /KILN_INIT cpus=1 /);
  });
});
