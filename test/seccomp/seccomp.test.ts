// Kiln's seccomp filters: the BPF compiler judged by an independent interpreter (and by
// the kernel, in child processes), the default policy on real vCPU and I/O threads, and
// the --seccomp-filter file format.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import {
  actionValue,
  AUDIT_ARCH_X86_64,
  compileFilter,
  runProgram,
  SECCOMP_RET,
  syscallNumber,
  type ArgOp,
  type FilterSpec,
} from '../../src/seccomp/bpf.js';
import {
  compilePolicy,
  DEFAULT_POLICY,
  defaultPrograms,
  parseFilterFile,
  policyToJson,
} from '../../src/seccomp/policy.js';
import { kvmSkip, tempDir } from '../helpers.js';

const PROBE = new URL('./probe.js', import.meta.url).pathname;
const VMM = new URL('../../src/vmm-cli.cjs', import.meta.url).pathname;
const EPERM = SECCOMP_RET.ERRNO | 1;

describe('the seccomp BPF compiler', () => {
  const spec: FilterSpec = {
    mismatchAction: 'kill_process',
    matchAction: 'allow',
    rules: [{ syscall: 'read' }, { syscall: 'write' }, { syscall: 'mkdir', action: { errno: 1 } }],
  };
  const program = compileFilter(spec);

  test('listed calls get their action, others the mismatch action; a foreign arch or x32 call is killed', () => {
    assert.equal(runProgram(program, { nr: syscallNumber('read') }), SECCOMP_RET.ALLOW);
    assert.equal(runProgram(program, { nr: syscallNumber('write') }), SECCOMP_RET.ALLOW);
    assert.equal(runProgram(program, { nr: syscallNumber('mkdir') }), EPERM);
    assert.equal(runProgram(program, { nr: syscallNumber('openat') }), SECCOMP_RET.KILL_PROCESS);
    // read's number from the i386 table (3) must not pass as x86-64's read (0).
    assert.equal(runProgram(program, { nr: 0, arch: 0x40000003 }), SECCOMP_RET.KILL_PROCESS);
    assert.equal(runProgram(program, { nr: 0x40000000 | syscallNumber('read') }), SECCOMP_RET.KILL_PROCESS);
    assert.notEqual(AUDIT_ARCH_X86_64, 0x40000003);
  });

  test('argument conditions compare as unsigned 32- or 64-bit values, for every operator', () => {
    const ops: ArgOp[] = ['eq', 'ne', 'lt', 'le', 'gt', 'ge'];
    const truth = (op: ArgOp, a: bigint, b: bigint): boolean => {
      if (typeof op === 'object') return (a & op.masked_eq) === (b & op.masked_eq);
      return { eq: a === b, ne: a !== b, lt: a < b, le: a <= b, gt: a > b, ge: a >= b }[op];
    };
    const u64 = fc.oneof(
      fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      fc.constantFrom(0n, 1n, 0xffffffffn, 0x100000000n, 2n ** 64n - 1n),
    );
    fc.assert(
      fc.property(
        fc.oneof(
          fc.constantFrom(...ops),
          u64.map((m) => ({ masked_eq: m })),
        ),
        fc.constantFrom('dword' as const, 'qword' as const),
        fc.integer({ min: 0, max: 5 }),
        u64,
        u64,
        (op, type, index, rawArg, rawVal) => {
          const mask = type === 'dword' ? 0xffffffffn : 2n ** 64n - 1n;
          const val = rawVal & mask;
          const p = compileFilter({
            mismatchAction: { errno: 2 },
            matchAction: 'allow',
            rules: [{ syscall: 'ioctl', args: [{ index, type, op, val }] }],
          });
          const args = [0n, 0n, 0n, 0n, 0n, 0n];
          args[index] = rawArg;
          // A dword condition looks at the low 32 bits only, as seccompiler's do.
          const expected = truth(op, rawArg & mask, val) ? SECCOMP_RET.ALLOW : SECCOMP_RET.ERRNO | 2;
          assert.equal(runProgram(p, { nr: syscallNumber('ioctl'), args }), expected);
        },
      ),
      { numRuns: 3000 },
    );
  });

  test('several rules for one syscall: the first whose conditions hold wins', () => {
    const p = compileFilter({
      mismatchAction: 'kill_process',
      matchAction: 'allow',
      rules: [
        { syscall: 'ioctl', args: [{ index: 1, type: 'dword', op: 'eq', val: 0xae80n }] },
        { syscall: 'ioctl', args: [{ index: 1, type: 'dword', op: 'eq', val: 0x4004ae61n }], action: 'log' },
      ],
    });
    const ioctl = syscallNumber('ioctl');
    assert.equal(runProgram(p, { nr: ioctl, args: [3n, 0xae80n] }), SECCOMP_RET.ALLOW);
    assert.equal(runProgram(p, { nr: ioctl, args: [3n, 0x4004ae61n] }), actionValue('log'));
    assert.equal(runProgram(p, { nr: ioctl, args: [3n, 0x5401n] }), SECCOMP_RET.KILL_PROCESS);
  });

  test('an unknown syscall name and an out-of-range value are refused with the reason', () => {
    assert.throws(
      () => compileFilter({ mismatchAction: 'allow', matchAction: 'allow', rules: [{ syscall: 'frobnicate' }] }),
      /unknown syscall 'frobnicate'/,
    );
    assert.throws(
      () =>
        compileFilter({
          mismatchAction: 'allow',
          matchAction: 'allow',
          rules: [{ syscall: 'read', args: [{ index: 0, type: 'dword', op: 'eq', val: 1n << 32n }] }],
        }),
      /does not fit a dword/,
    );
  });

  test('the default policy: vCPU threads may run KVM_RUN but not open files or sockets; the process may not exec', () => {
    const programs = {
      vcpu: compileFilter(DEFAULT_POLICY.vcpu),
      io: compileFilter(DEFAULT_POLICY.io),
      process: compileFilter(DEFAULT_POLICY.process),
    };
    const KVM_RUN = 0xae80n;
    assert.equal(runProgram(programs.vcpu, { nr: syscallNumber('ioctl'), args: [5n, KVM_RUN] }), SECCOMP_RET.ALLOW);
    // KVM_SET_USER_MEMORY_REGION would let a compromised vCPU thread remap guest memory.
    assert.equal(
      runProgram(programs.vcpu, { nr: syscallNumber('ioctl'), args: [5n, 0x4020ae46n] }),
      SECCOMP_RET.KILL_PROCESS,
    );
    for (const name of ['openat', 'socket', 'connect', 'execve', 'clone3'])
      assert.equal(runProgram(programs.vcpu, { nr: syscallNumber(name) }), SECCOMP_RET.KILL_PROCESS, name);
    for (const name of ['openat', 'execve', 'ptrace', 'mount'])
      assert.equal(runProgram(programs.io, { nr: syscallNumber(name) }), SECCOMP_RET.KILL_PROCESS, name);
    for (const name of ['execve', 'ptrace', 'mount', 'setns', 'bpf'])
      assert.equal(runProgram(programs.process, { nr: syscallNumber(name) }), EPERM, name);
    for (const name of ['openat', 'accept4', 'read'])
      assert.equal(runProgram(programs.process, { nr: syscallNumber(name) }), SECCOMP_RET.ALLOW, name);
  });
});

describe('the seccomp filters on real threads', () => {
  for (const thread of ['vcpu', 'io'] as const) {
    test(`a call off the ${thread} thread's list (mkdir) kills the process with SIGSYS`, () => {
      const r = spawnSync(process.execPath, [PROBE, 'forbidden', thread], { encoding: 'utf8' });
      assert.equal(r.signal, 'SIGSYS', `stdout: ${r.stdout} stderr: ${r.stderr}`);
      assert.doesNotMatch(r.stdout, /survived/);
    });
  }

  test(
    'a guest runs under the default filters: every thread has Seccomp 2 and no_new_privs, vCPU threads a second filter, and the process can no longer exec',
    { skip: kvmSkip },
    () => {
      const r = spawnSync(process.execPath, [PROBE, 'vm'], { encoding: 'utf8', timeout: 120_000 });
      assert.equal(r.status, 0, r.stderr);
      const report = JSON.parse(r.stdout) as {
        threads: Array<{ comm: string; seccomp: number; filters: number; noNewPrivs: number }>;
        exits: number[];
        execError: string | null;
      };
      for (const t of report.threads) {
        assert.equal(t.seccomp, 2, `${t.comm}: Seccomp`);
        assert.equal(t.noNewPrivs, 1, `${t.comm}: NoNewPrivs`);
      }
      const vcpus = report.threads.filter((t) => t.comm.startsWith('fc_vcpu'));
      assert.equal(vcpus.length, 2);
      for (const t of vcpus) assert.equal(t.filters, 2, 'the process-wide filter and the vCPU allow-list');
      assert.ok(
        report.exits.reduce((a, b) => a + b, 0) > 0,
        `the guest made port-I/O exits under the filter (per vCPU: ${report.exits.join(', ')})`,
      );
      assert.equal(report.execError, 'EPERM');
    },
  );
});

describe("kiln-vmm's built-in filters", () => {
  test('the bundle carries the default policy compiled by the build, byte for byte', () => {
    // kiln-vmm does not compile its default filters at start: the build puts them in its bundle.
    const bundle = readFileSync(VMM.replace(/\.cjs$/, '.bundle.js'), 'utf8');
    const programs = compilePolicy(DEFAULT_POLICY);
    for (const category of ['process', 'vcpu', 'io'] as const) {
      const b64 = Buffer.from(programs[category]).toString('base64');
      assert.ok(b64.length > 100, category);
      assert.ok(bundle.includes(`${category}:"${b64}"`), `the bundle holds the ${category} program as compiled now`);
    }
    // Outside the bundle, the same function compiles them.
    assert.deepEqual(defaultPrograms(), programs);
  });
});

describe('--seccomp-filter files', () => {
  test('the built-in policy printed by --print-seccomp-filter reads back as itself', () => {
    const text = policyToJson(DEFAULT_POLICY);
    const back = parseFilterFile(text, 'default.json');
    for (const category of ['process', 'vcpu', 'io'] as const)
      assert.deepEqual(compileFilter(back[category]), compileFilter(DEFAULT_POLICY[category]), category);
    const printed = spawnSync(process.execPath, [VMM, '--print-seccomp-filter'], { encoding: 'utf8' });
    assert.equal(printed.status, 0);
    assert.equal(printed.stdout, text);
  });

  test('a compiled (binary) filter, a missing category, a bad operator and an unknown syscall are refused by name', () => {
    const bad = (text: string) => () => parseFilterFile(text, 'f.json');
    assert.throws(bad('\u0003\u0000\u0000\u0000vcpu'), /f\.json: not a JSON seccomp filter.*not its compiled output/);
    const one = { default_action: 'kill_process', filter_action: 'allow', filter: [{ syscall: 'read' }] };
    assert.throws(bad(JSON.stringify({ vcpu: one, io: one })), /f\.json: process: /);
    assert.throws(
      bad(
        JSON.stringify({
          process: one,
          vcpu: { ...one, filter: [{ syscall: 'read', args: [{ index: 0, type: 'dword', op: 'between', val: 1 }] }] },
          io: one,
        }),
      ),
      /f\.json: vcpu\.filter\.0\.args\.0\.op/,
    );
    assert.throws(
      bad(JSON.stringify({ process: one, vcpu: one, io: { ...one, filter: [{ syscall: 'sys_read' }] } })),
      /f\.json: io: unknown syscall 'sys_read'/,
    );
  });

  test('kiln-vmm refuses --no-seccomp with --seccomp-filter, and a bad filter file, before anything starts', () => {
    const dir = tempDir();
    const file = join(dir, 'filter.json');
    writeFileSync(file, '{"vcpu": {}}');
    const both = spawnSync(
      process.execPath,
      [VMM, '--no-seccomp', '--seccomp-filter', file, '--api-sock', join(dir, 's')],
      {
        encoding: 'utf8',
      },
    );
    assert.equal(both.status, 2);
    assert.match(both.stderr, /--no-seccomp or --seccomp-filter, not both/);
    const badFile = spawnSync(process.execPath, [VMM, '--seccomp-filter', file, '--api-sock', join(dir, 's')], {
      encoding: 'utf8',
    });
    assert.equal(badFile.status, 2);
    assert.match(badFile.stderr, /filter\.json: /);
  });
});
