// kiln migrate between two hosts: two network namespaces with their own addresses (a
// veth pair), each with its own daemon and state directory (and cgroup parent). A kit
// Linux with a shell and a disk on shared storage (the same path for both), running a
// loop that keeps changing its memory, is moved from A to B: on B its console answers,
// its loop's count went on, its disk is intact and its definition is there; A no longer
// has it. A token file that is not B's is refused, the VM running on at A.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { cgroupVersion } from '../../src/manager/cgroup.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { canNetns } from '../linux-fixture.js';

const CLI = fileURLToPath(new URL('../../src/cli.js', import.meta.url));
const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });

function kiln(stateDir: string, args: string[], input?: string) {
  return spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    env: { ...process.env, KILN_STATE_DIR: stateDir },
    timeout: 10 * 60_000,
    ...(input !== undefined ? { input } : {}),
  });
}

/** Types `command` on VM `name`'s console until `answer` comes back. */
function ask(dir: string, name: string, command: string, answer: RegExp, tries = 20): RegExpExecArray {
  let seen = '';
  for (let i = 0; i < tries; i++) {
    const r = kiln(dir, ['console', name, '--linger', '5'], `${command}\n`);
    seen = r.stdout;
    const m = answer.exec(seen.split(command).at(-1) ?? '');
    if (m) return m;
  }
  assert.fail(`'${name}' did not answer ${answer} to ${command}; its console ended with:\n${seen.slice(-1500)}`);
}

/** A daemon for `stateDir` inside network namespace `ns`. */
async function daemonIn(ns: string, stateDir: string, cgroupParent: string, args: string[]): Promise<ChildProcess> {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, CLI, 'daemon', ...args], {
    env: { ...process.env, KILN_STATE_DIR: stateDir, KILN_CGROUP_PARENT: cgroupParent },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (out += c));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (out += c));
  for (let i = 0; i < 200 && !existsSync(join(stateDir, 'kiln.sock')); i++) await sleep(50);
  if (args.includes('--listen')) for (let i = 0; i < 200 && !/taking migrations/.test(out); i++) await sleep(50);
  assert.ok(existsSync(join(stateDir, 'kiln.sock')), `the daemon in ${ns} listens: ${out}`);
  return child;
}

const count = (dir: string, tag: string) =>
  Number(ask(dir, 'mover', `echo ${tag}-$(cat /tmp/count)-end`, new RegExp(`${tag}-(\\d+)-end`))[1]);

describe('kiln migrate between two hosts', { skip: kvmSkip || (!canNetns && 'needs root, TUN and iproute2') }, () => {
  test(
    'a running Linux with a loop and a shared disk moves from host A to host B; its definition moves with it',
    { timeout: 20 * 60_000 },
    async () => {
      const dir = tempDir();
      const tag = `${process.pid % 100000}`;
      const [nsA, nsB] = [`kmga${tag}`, `kmgb${tag}`];
      const net = `10.${77 + (process.pid % 20)}.${process.pid % 250}`;
      const [stateA, stateB] = [join(dir, 'host-a'), join(dir, 'host-b')];
      const cgroupB = `kiln-migrate-b-${tag}`;
      const daemons: ChildProcess[] = [];
      ip('netns', 'add', nsA);
      ip('netns', 'add', nsB);
      try {
        ip('link', 'add', `kva${tag}`, 'netns', nsA, 'type', 'veth', 'peer', 'name', `kvb${tag}`, 'netns', nsB);
        ip('-n', nsA, 'addr', 'add', `${net}.1/24`, 'dev', `kva${tag}`);
        ip('-n', nsB, 'addr', 'add', `${net}.2/24`, 'dev', `kvb${tag}`);
        for (const [ns, dev] of [
          [nsA, `kva${tag}`],
          [nsB, `kvb${tag}`],
        ] as const) {
          ip('-n', ns, 'link', 'set', dev, 'up');
          ip('-n', ns, 'link', 'set', 'lo', 'up');
        }
        const token = join(dir, 'token');
        writeFileSync(token, 'the-migration-token-of-this-test\n', { mode: 0o600 });
        const wrong = join(dir, 'wrong-token');
        writeFileSync(wrong, 'not-the-token-b-knows-about\n', { mode: 0o600 });
        const loose = join(dir, 'loose-token');
        writeFileSync(loose, 'the-migration-token-of-this-test\n', { mode: 0o644 });
        daemons.push(await daemonIn(nsA, stateA, `kiln-migrate-a-${tag}`, []));
        daemons.push(await daemonIn(nsB, stateB, cgroupB, ['--listen', `${net}.2:7077`, '--token-file', token]));
        const to = `${net}.2:7077`;

        const disk = join(dir, 'shared.img');
        writeFileSync(disk, Buffer.alloc(1 << 20), { mode: 0o600 });
        const created = kiln(stateA, ['create', 'mover', '--memory', '128M', '--disk', disk]);
        assert.equal(created.status, 0, created.stderr);
        const started = kiln(stateA, ['start', 'mover']);
        assert.equal(started.status, 0, started.stderr);
        ask(stateA, 'mover', 'echo up-$((6*7))', /up-42/, 60);
        ask(
          stateA,
          'mover',
          '(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; done) & echo shared | dd of=/dev/vda conv=fsync 2>/dev/null; echo looping',
          /looping/,
        );
        const before = count(stateA, 'before');

        const refused = kiln(stateA, ['migrate', 'mover', '--to', to, '--token-file', wrong]);
        assert.equal(refused.status, 1);
        assert.match(refused.stderr, /not signed with this daemon's token/);
        const lax = kiln(stateA, ['migrate', 'mover', '--to', to, '--token-file', loose]);
        assert.equal(lax.status, 1);
        assert.match(lax.stderr, /readable by others/);
        assert.match(kiln(stateA, ['ls']).stdout, /mover\s+running/);
        assert.doesNotMatch(kiln(stateB, ['ls']).stdout, /mover/, 'a refused migration leaves nothing on B');

        const moved = kiln(stateA, ['migrate', 'mover', '--to', to, '--token-file', token]);
        assert.equal(moved.status, 0, moved.stderr);
        assert.match(moved.stdout, /^mover: running on /m);
        assert.match(moved.stderr, /pre-copy: iteration \d+, \d+ pages sent/);
        assert.doesNotMatch(kiln(stateA, ['ls']).stdout, /mover/, 'A no longer has it');
        assert.match(kiln(stateB, ['ls']).stdout, /mover\s+running/);
        const after = count(stateB, 'after');
        assert.ok(after > before, `the loop went on at B: ${before} then ${after}`);
        ask(stateB, 'mover', 'head -c 7 /dev/vda', /shared/);
        assert.equal(readFileSync(disk).subarray(0, 7).toString(), 'shared\n');
        const stopped = kiln(stateB, ['stop', 'mover', '--force']);
        assert.equal(stopped.status, 0, stopped.stderr);
      } finally {
        for (const d of daemons) d.kill('SIGTERM');
        await sleep(500);
        for (const state of [stateA, stateB]) kiln(state, ['stop', 'mover', '--force']);
        for (const d of daemons) if (d.exitCode === null) d.kill('SIGKILL');
        for (const ns of [nsA, nsB]) spawnSync('ip', ['netns', 'del', ns]);
        const v = cgroupVersion();
        for (const parent of [`kiln-migrate-a-${tag}`, cgroupB])
          for (const d of v === 2 ? [parent] : [join('cpu', parent), join('memory', parent)])
            try {
              rmdirSync(join('/sys/fs/cgroup', d, 'mover'));
            } catch {
              // not made, or already gone
            } finally {
              try {
                rmdirSync(join('/sys/fs/cgroup', d));
              } catch {
                // not made
              }
            }
      }
    },
  );
});
