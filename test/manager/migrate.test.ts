// kiln migrate and kiln upgrade: two hosts as two network namespaces with their own
// addresses (a veth pair), each with its own daemon and state directory (and cgroup
// parent). On A, `kiln upgrade` moves one running kit Linux into a new VMM process
// without a reboot (its loop counts on; its guest memory handed over, not copied). Another, with a disk on shared storage (the
// same path for both) and a TAP NIC, running a loop that keeps changing its memory, is
// moved from A to B: on B its console answers, its loop's count went on, its disk is
// intact, its NIC works on B's TAP and its definition is there; A no longer has it. A
// token file that is not B's is refused, the VM running on at A.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync, rmdirSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { cgroupVersion } from '../../src/manager/cgroup.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { CLI, ask, kiln, kilnAsync } from './kiln-cli.js';
import { READ_COUNT } from '../vmm-driver.js';
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

/** Types `command` on VM `name`'s console once (for commands that must not run twice). */
function typeOnce(dir: string, name: string, command: string): void {
  const r = kiln(dir, ['console', name, '--linger', '1'], `${command}\n`);
  assert.equal(r.status, 0, r.stderr);
}

/** The loop's count as the guest reads it (read again while the loop has it truncated). */
const count = (dir: string, name: string, tag: string) =>
  Number(ask(dir, name, `${READ_COUNT} echo ${tag}-$c-end`, new RegExp(`${tag}-(\\d+)-end`), 20, 10)[1]);

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
        daemons.push(
          await daemonIn(nsA, stateA, `kiln-migrate-a-${tag}`, ['--listen', `${net}.1:7077`, '--token-file', token]),
        );
        daemons.push(await daemonIn(nsB, stateB, cgroupB, ['--listen', `${net}.2:7077`, '--token-file', token]));
        const to = `${net}.2:7077`;

        // 64 MiB of noise: copying it (--copy-disks, below) takes a moment, while the guest writes.
        const disk = join(dir, 'shared.img');
        writeFileSync(disk, randomBytes(64 << 20), { mode: 0o600 });
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
        ask(stateA, 'upg', 'echo up-$((6*7))', /up-42/, 60);
        ask(stateA, 'mover', 'echo up-$((6*7))', /up-42/, 60);
        // Typed once each (a retried command would start a second loop).
        const loop = '(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo $i > /tmp/count; done) &';
        // One busy guest at a time (two would starve each other's shells on 2 cores).
        typeOnce(stateA, 'upg', loop);

        // A live upgrade: a new VMM (another pid) of this Kiln runs the same guest, which
        // never stopped counting; a VM with a NIC is refused (its TAP cannot be open twice).
        const upgBefore = count(stateA, 'upg', 'before');
        const pidBefore = (JSON.parse(kiln(stateA, ['info', 'upg', '--json']).stdout) as { pid: number }).pid;
        const upgraded = kiln(stateA, ['upgrade', 'upg', '--json']);
        assert.equal(upgraded.status, 0, upgraded.stderr);
        const now = JSON.parse(upgraded.stdout) as { pid: number; state: string; memory: string };
        assert.equal(now.state, 'running');
        assert.notEqual(now.pid, pidBefore, 'a new VMM process runs it');
        // Its guest memory was handed over, not copied: the new VMM maps the old one's memfd.
        assert.equal(now.memory, 'handed over');
        assert.ok(
          readdirSync(`/proc/${now.pid}/fd`).some(
            (fd) => readlinkSync(`/proc/${now.pid}/fd/${fd}`) === '/memfd:kiln-guest-ram (deleted)',
          ),
          'the new VMM holds the guest memory file',
        );
        assert.match(upgraded.stderr, /runs in its new VMM \(pid \d+\); it was paused for \d+ ms/);
        const upgAfter = count(stateA, 'upg', 'after');
        assert.ok(upgAfter > upgBefore, `the loop went on through the upgrade: ${upgBefore} then ${upgAfter}`);
        assert.equal(kiln(stateA, ['stop', 'upg', '--force']).status, 0);
        typeOnce(stateA, 'mover', loop);
        ask(stateA, 'mover', 'echo shared | dd of=/dev/vda conv=fsync 2>/dev/null; echo marked-$((6*7))', /marked-42/);
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

        // Back to A with --copy-disks, the guest writing a mark into each of 12 chunks of
        // its disk meanwhile: all 12 are in the copy (those written during the copy too).
        typeOnce(
          stateB,
          'mover',
          'touch /tmp/stop; (for j in $(seq 1 12); do echo mark-$j | dd of=/dev/vda bs=512 seek=$((j*2048)) conv=fsync 2>/dev/null; done; echo done > /tmp/marks) &',
        );
        // Answered only once the shell has read the line before: the marking has begun.
        ask(stateB, 'mover', 'echo marking-$((6*7))', /marking-42/, 60);
        const back = kiln(stateB, ['migrate', 'mover', '--to', `${net}.1:7077`, '--token-file', token, '--copy-disks']);
        assert.equal(back.status, 0, back.stderr);
        assert.doesNotMatch(kiln(stateB, ['ls']).stdout, /mover/, 'B no longer has it');
        const info = JSON.parse(kiln(stateA, ['info', 'mover', '--json']).stdout) as {
          state: string;
          definition: { disks: Array<{ path: string }> };
        };
        assert.equal(info.state, 'running');
        const copied = info.definition.disks[0]!.path;
        assert.equal(copied.startsWith(join(stateA, 'disks', 'mover')), true, `its disk is the copy: ${copied}`);
        ask(stateA, 'mover', 'cat /tmp/marks; sync; echo synced-$((6*7))', /done\s+synced-42/, 60);
        assert.equal(kiln(stateA, ['stop', 'mover', '--force']).status, 0);
        const image = readFileSync(copied);
        const original = readFileSync(disk);
        for (let j = 1; j <= 12; j++)
          assert.equal(
            image.subarray(j << 20, (j << 20) + `mark-${j}\n`.length).toString(),
            `mark-${j}\n`,
            `mark ${j}`,
          );
        assert.ok(image.subarray(0, 7).equals(original.subarray(0, 7)), 'what was there before came along');
        assert.ok(image.subarray(50 << 20).equals(original.subarray(50 << 20)), 'and the rest of it');
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
