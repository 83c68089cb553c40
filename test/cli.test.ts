// The `kiln` command as a user runs it.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { kvmSkip } from './helpers.js';

const cli = fileURLToPath(new URL('../src/cli.cjs', import.meta.url));

function kiln(args: string[], env: Record<string, string> = {}, prefix: string[] = []) {
  const [cmd, ...rest] = [...prefix, process.execPath, cli, ...args];
  const r = spawnSync(cmd!, rest, { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** One line on stderr, starting "kiln: ", with no stack trace. */
function assertOneLineError(stderr: string, pattern: RegExp): void {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line, got: ${stderr}`);
  assert.match(lines[0]!, /^kiln: /);
  assert.match(lines[0]!, pattern);
  assert.doesNotMatch(stderr, /\n\s+at /);
}

describe('kiln run --demo', { skip: kvmSkip }, () => {
  test('boots the demo guest, shows its serial output and exits 0', () => {
    const r = kiln(['run', '--demo']);
    assert.equal(r.status, 0, r.stderr);
    assert.match(
      r.stdout,
      /^Hello from the Kiln demo guest!\nRunning in 32-bit protected mode at ring 3 on 1 vCPU\(s\)/,
    );
    assert.match(r.stderr, /exit status 0/);
  });

  test("loads kiln-vmm's seccomp filters (one process-wide, one per vCPU thread) unless --no-seccomp", () => {
    const dir = mkdtempSync(join(tmpdir(), 'kiln-cli-'));
    try {
      const filters = (extra: string[]) => {
        const trace = join(dir, `trace-${extra.length}`);
        const r = kiln(['run', '--demo', '--cpus', '2', ...extra], {}, [
          'strace',
          '-f',
          '-e',
          'trace=seccomp',
          '-o',
          trace,
        ]);
        assert.equal(r.status, 0, r.stderr);
        assert.match(r.stdout, /on 2 vCPU\(s\)/);
        const calls = readFileSync(trace, 'utf8')
          .split('\n')
          .filter((l) => /seccomp\(SECCOMP_SET_MODE_FILTER.*= 0$/.test(l));
        return { all: calls.length, tsync: calls.filter((l) => l.includes('SECCOMP_FILTER_FLAG_TSYNC')).length };
      };
      assert.deepEqual(filters([]), { all: 3, tsync: 1 });
      assert.deepEqual(filters(['--no-seccomp']), { all: 0, tsync: 0 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('--cpus 3 brings up three vCPUs that all check in', () => {
    const r = kiln(['run', '--demo', '--cpus', '3', '--memory', '64M']);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /on 3 vCPU\(s\)/);
  });

  test('--json prints one result object with the serial output', () => {
    const r = kiln(['run', '--demo', '--json']);
    assert.equal(r.status, 0, r.stderr);
    const result = JSON.parse(r.stdout) as {
      status: number;
      reason: string;
      serial: string;
      progress: { last: number };
    };
    assert.equal(result.status, 0);
    assert.equal(result.reason, 'guest-exit');
    assert.match(result.serial, /Hello from the Kiln demo guest!/);
    assert.equal(result.progress.last, 0x600d);
  });

  for (const [args, pattern, status] of [
    [['--memory', '0'], /memoryMiB: must be a whole number from 1 to 4194304 \(got 0\)/, 2],
    [['--memory', '1001K'], /--memory: '1001K' is not a whole number of MiB/, 2],
    [['--memory', '1048576G'], /memoryMiB: must be a whole number from 1 to 4194304 \(got 1073741824\)/, 2],
    [['--memory', '1048576M'], /larger than this host can map/, 1],
    [['--memory', 'lots'], /cannot read 'lots' as a memory size/, 2],
    [['--cpus', '100000'], /cpus: must be a whole number from 1 to 254 \(got 100000\)/, 2],
  ] as const) {
    test(`refuses ${args.join(' ')} with one clear line`, () => {
      const r = kiln(['run', '--demo', ...args]);
      assert.equal(r.status, status);
      assertOneLineError(r.stderr, pattern);
      assert.equal(r.stdout, '', 'the guest never ran');
    });
  }
});

describe('kiln on a host without usable KVM', () => {
  test('no /dev/kvm: one line, exit 1', () => {
    const r = kiln(['run', '--demo'], { KILN_KVM_DEVICE: '/nonexistent/kvm' });
    assert.equal(r.status, 1);
    assertOneLineError(r.stderr, /\/nonexistent\/kvm does not exist: this host has no KVM/);
  });

  test('a device that is not KVM: one line, exit 1', () => {
    const r = kiln(['run', '--demo'], { KILN_KVM_DEVICE: '/dev/null' });
    assert.equal(r.status, 1);
    assertOneLineError(r.stderr, /is not a KVM device/);
  });

  const setpriv = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));
  test(
    'no permission on /dev/kvm: one line, exit 1',
    { skip: !setpriv || kvmSkip ? 'needs setpriv and /dev/kvm' : false },
    () => {
      const r = kiln(['run', '--demo'], {}, [setpriv!, '--reuid=65534', '--regid=65534', '--clear-groups']);
      assert.equal(r.status, 1, r.stderr);
      assertOneLineError(r.stderr, /permission denied opening \/dev\/kvm/);
    },
  );
});

test('usage errors exit 2 and print the usage', () => {
  const r = kiln(['frobnicate']);
  assert.equal(r.status, 2);
  assert.match(r.stderr, /unknown command 'frobnicate'/);
  assert.match(r.stderr, /Usage: kiln/);
  const bad = kiln(['run', '--demo', '--cpus', 'two']);
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /cpus: must be a whole number from 1 to 254 \(got 'two'\)/);
});

test('bad virtio device flags are usage errors (exit 2) before anything runs', () => {
  for (const [args, pattern] of [
    [['--net', 'eth0'], /--net: eth0: unknown option 'eth0' \(expected tap=NAME or passt=SOCKET/],
    [
      ['--net', 'tap=a,passt=b'],
      /nets\[0\]: needs either tap \(a TAP name\) or passt \(a socket path\), not both or neither/,
    ],
    [['--vsock', 'three'], /--vsock: three: expected CID,SOCKET/],
    [['--disk', ',ro'], /--disk: needs a path first/],
    [['--disk', 'x.img,rw'], /unknown option 'rw'/],
    [['--demo', '--rng'], /need a Linux guest, not --demo/],
  ] as const) {
    const r = kiln(['run', ...args]);
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, pattern);
  }
});

test('kiln --version prints the version', () => {
  const r = kiln(['--version']);
  assert.equal(r.status, 0);
  assert.match(r.stdout, /^kiln \d+\.\d+\.\d+\n$/);
});

test("every command the package installs (package.json's bin) is one executable script that answers --version", () => {
  const root = fileURLToPath(new URL('../../', import.meta.url));
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { bin: Record<string, string> };
  assert.deepEqual(Object.keys(pkg.bin).sort(), ['kiln', 'kiln-jailer', 'kiln-snapshot-editor', 'kiln-vmm']);
  for (const [name, path] of Object.entries(pkg.bin)) {
    const file = join(root, path);
    assert.ok(existsSync(file), `${name}: ${path} exists`);
    assert.ok((statSync(file).mode & 0o111) !== 0, `${name}: ${path} is executable`);
    assert.match(readFileSync(file, 'utf8').split('\n')[0]!, /^#!.*node/, `${name}: a node script`);
    const r = spawnSync(file, ['--version'], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 0, `${name} --version: ${r.stderr}`);
    assert.match(r.stdout, /\d+\.\d+\.\d+/, `${name} --version prints a version`);
  }
});
