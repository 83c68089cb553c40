// kiln migrate and kiln upgrade: two hosts as two network namespaces with their own
// addresses (a veth pair), each with its own daemon and state directory (and cgroup
// parent). On A, `kiln upgrade` moves one running kit Linux into a new VMM process
// without a reboot (its loop counts on). Another, with a disk on shared storage (the
// same path for both) and a TAP NIC, running a loop that keeps changing its memory, is
// moved from A to B: on B its console answers, its loop's count went on, its disk is
// intact, its NIC works on B's TAP and its definition is there; A no longer has it. A
// token file that is not B's is refused, the VM running on at A.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { cgroupVersion } from '../../src/manager/cgroup.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { CLI, ask, kiln, kilnAsync } from './kiln-cli.js';
import { canNetns } from '../linux-fixture.js';

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });

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

const count = (dir: string, name: string, tag: string) =>
  Number(ask(dir, name, `echo ${tag}-$(cat /tmp/count)-end`, new RegExp(`${tag}-(\\d+)-end`))[1]);

describe('kiln migrate between two hosts', { skip: kvmSkip || (!canNetns && 'needs root, TUN and iproute2') }, () => {
  test(
    'kiln upgrade gives a running Linux a new VMM; a running Linux with a loop, a shared disk and a NIC moves from host A to host B with its definition',
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
        const tap = `kmgt${tag}`;
        const tapNet = `10.${97 + (process.pid % 20)}.${process.pid % 250}`;
        for (const [name, extra] of [
          ['mover', ['--disk', disk, '--net', `tap=${tap}`]],
          ['upg', []],
        ] as const) {
          const created = kiln(stateA, ['create', name, '--memory', '128M', ...extra]);
          assert.equal(created.status, 0, created.stderr);
        }
        // Both boot at once (the kit Linux takes a while here).
        const starts = await Promise.all(['mover', 'upg'].map((n) => kilnAsync(stateA, ['start', n])));
        for (const st of starts) assert.equal(st.status, 0, st.stderr);
        const loop = '(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; done) &';
        ask(stateA, 'upg', `echo up-$((6*7)); ${loop}`, /up-42/, 60);
        ask(stateA, 'mover', 'echo up-$((6*7))', /up-42/, 60);
        ask(stateA, 'mover', `${loop} echo shared | dd of=/dev/vda conv=fsync 2>/dev/null; echo looping`, /looping/);

        // A live upgrade: a new VMM (another pid) of this Kiln runs the same guest, which
        // never stopped counting; a VM with a NIC is refused (its TAP cannot be open twice).
        const upgBefore = count(stateA, 'upg', 'before');
        const pidBefore = (JSON.parse(kiln(stateA, ['info', 'upg', '--json']).stdout) as { pid: number }).pid;
        const upgraded = kiln(stateA, ['upgrade', 'upg', '--json']);
        assert.equal(upgraded.status, 0, upgraded.stderr);
        const now = JSON.parse(upgraded.stdout) as { pid: number; state: string };
        assert.equal(now.state, 'running');
        assert.notEqual(now.pid, pidBefore, 'a new VMM process runs it');
        assert.match(upgraded.stderr, /runs in its new VMM \(pid \d+\); it was paused for \d+ ms/);
        const upgAfter = count(stateA, 'upg', 'after');
        assert.ok(upgAfter > upgBefore, `the loop went on through the upgrade: ${upgBefore} then ${upgAfter}`);
        assert.equal(kiln(stateA, ['stop', 'upg', '--force']).status, 0);
        const nicUpgrade = kiln(stateA, ['upgrade', 'mover']);
        assert.equal(nicUpgrade.status, 1);
        assert.match(
          nicUpgrade.stderr,
          /has network interfaces: its TAP or passt end cannot be open in two VMMs at once/,
        );

        const before = count(stateA, 'mover', 'before');
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
        assert.match(
          moved.stderr,
          /'mover' runs on .* \(\d+ pages sent, paused for \d+ ms\); its definition moved there/,
        );
        assert.doesNotMatch(kiln(stateA, ['ls']).stdout, /mover/, 'A no longer has it');
        assert.match(kiln(stateB, ['ls']).stdout, /mover\s+running/);
        const after = count(stateB, 'mover', 'after');
        assert.ok(after > before, `the loop went on at B: ${before} then ${after}`);
        ask(stateB, 'mover', 'head -c 7 /dev/vda', /shared/);
        assert.equal(readFileSync(disk).subarray(0, 7).toString(), 'shared\n');
        // Its NIC works at B, on the TAP B's daemon made for it in B's namespace.
        ip('-n', nsB, 'addr', 'add', `${tapNet}.1/24`, 'dev', tap);
        ip('-n', nsB, 'link', 'set', tap, 'up');
        ask(
          stateB,
          'mover',
          `ip addr add ${tapNet}.2/24 dev eth0 2>/dev/null; ip link set eth0 up; ping -c 1 -W 5 ${tapNet}.1 >/dev/null && echo pinged-$((6*7))`,
          /pinged-42/,
        );
        const stopped = kiln(stateB, ['stop', 'mover', '--force']);
        assert.equal(stopped.status, 0, stopped.stderr);
      } finally {
        // VMs first, while their daemons run (a verb with no daemon would start one).
        if (daemons.length === 2)
          for (const state of [stateA, stateB])
            for (const name of ['mover', 'upg']) kiln(state, ['stop', name, '--force']);
        for (const d of daemons) d.kill('SIGTERM');
        await sleep(500);
        for (const d of daemons) if (d.exitCode === null) d.kill('SIGKILL');
        for (const ns of [nsA, nsB]) spawnSync('ip', ['netns', 'del', ns]);
        const v = cgroupVersion();
        for (const parent of [`kiln-migrate-a-${tag}`, cgroupB])
          for (const d of v === 2 ? [parent] : [join('cpu', parent), join('memory', parent)])
            try {
              for (const name of ['mover', 'upg'])
                if (existsSync(join('/sys/fs/cgroup', d, name))) rmdirSync(join('/sys/fs/cgroup', d, name));
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
