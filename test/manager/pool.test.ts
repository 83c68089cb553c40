// The daemon's pool of VMMs started ahead (kiln daemon --pool N, or "pool" in daemon.json):
// a start and a restore take a jailed process that was already waiting, whose files were
// bound into its jail from outside; the pool refills, replaces a process that died, gives
// its slot back when the VM stops, and shrinks under memory pressure.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { parsePoolSize, readDaemonConfig } from '../../src/manager/commands.js';
import { JAIL_UID_BASE } from '../../src/manager/jail.js';
import { Store } from '../../src/manager/store.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { pvhKernel, SAY_K, THEN_IDLE } from '../../src/guest/pvh-kernel.js';
import { CLI, daemonsOf, kiln } from './kiln-cli.js';

interface PoolCounts {
  idle: number;
  starting: number;
  size: number;
}

const poolOf = (dir: string) => JSON.parse(kiln(dir, ['pool', '--json']).stdout) as PoolCounts;

/** The pids the pool's slots recorded (idle and starting processes, and those handed out). */
function slotPids(dir: string): Map<string, number> {
  const pids = new Map<string, number>();
  const pool = join(dir, 'pool');
  for (const slot of existsSync(pool) ? readdirSync(pool) : []) {
    try {
      pids.set(slot, Number(readFileSync(join(pool, slot, 'pid'), 'utf8')));
    } catch {
      // a slot being made
    }
  }
  return pids;
}

async function until<T>(what: string, probe: () => T | null | undefined | false, seconds = 60): Promise<T> {
  for (let i = 0; i < seconds * 10; i++) {
    const v = probe();
    if (v) return v;
    await sleep(100);
  }
  assert.fail(`timed out waiting for ${what}`);
}

const alive = (pid: number) => existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(readSafe(`/proc/${pid}/status`));
function readSafe(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** Mount points under `dir` in this mount namespace. */
const mountsUnder = (dir: string) =>
  readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m === dir || m.startsWith(`${dir}/`));

/** Stops `dir`'s daemon (SIGTERM: it ends its idle pool processes) and waits for them all. */
async function stopDaemon(dir: string, poolPids: number[]): Promise<void> {
  for (const pid of daemonsOf(dir)) process.kill(pid, 'SIGTERM');
  await until('the daemon to end', () => daemonsOf(dir).length === 0, 30);
  await until('the pool processes to end', () => poolPids.every((p) => !alive(p)), 30);
}

describe("the daemon's VMM pool", () => {
  test('the pool size: --pool and daemon.json take 0..64; anything else is refused with its place', () => {
    assert.equal(parsePoolSize('3', '--pool'), 3);
    assert.equal(parsePoolSize(0, 'daemon.json'), 0);
    assert.throws(() => parsePoolSize('-1', '--pool'), /--pool: the pool size must be a whole number from 0 to 64/);
    assert.throws(() => parsePoolSize(65, 'x'), /from 0 to 64 \(got 65\)/);
    assert.throws(() => parsePoolSize(1.5, 'x'), /whole number/);
    const dir = tempDir();
    try {
      const store = new Store(dir);
      assert.deepEqual(readDaemonConfig(store), { pool: 0 }, 'no daemon.json: no pool');
      writeFileSync(join(dir, 'daemon.json'), '{"pool": 4}');
      assert.deepEqual(readDaemonConfig(store), { pool: 4 });
      writeFileSync(join(dir, 'daemon.json'), '{"pool": 4, "pol": 1}');
      assert.throws(() => readDaemonConfig(store), /unknown setting\(s\) pol \(known: pool\)/);
      writeFileSync(join(dir, 'daemon.json'), '{"pool": "many"}');
      assert.throws(() => readDaemonConfig(store), /daemon\.json: the pool size must be/);
      writeFileSync(join(dir, 'daemon.json'), '{pool');
      assert.throws(() => readDaemonConfig(store), /daemon\.json is not JSON/);
      // The daemon refuses to start on a bad configuration rather than running without it.
      const r = kiln(dir, ['daemon']);
      assert.notEqual(r.status, 0);
      assert.match(r.stderr, /daemon\.json is not JSON/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test(
    'start and restore take a jailed VMM that was waiting; the pool refills, replaces the dead, gives slots back',
    { skip: kvmSkip, timeout: 5 * 60_000 },
    async () => {
      const dir = tempDir();
      const seen = new Set<number>();
      try {
        writeFileSync(join(dir, 'daemon.json'), JSON.stringify({ pool: 2 }));
        const kernel = join(dir, 'idle.elf');
        writeFileSync(kernel, pvhKernel([...SAY_K, ...THEN_IDLE]));
        // A disk only its owner may open: lent to the pool process's jail user while the VM runs.
        const disk = join(dir, 'data.img');
        writeFileSync(disk, Buffer.alloc(1 << 20), { mode: 0o600 });
        const created = kiln(dir, ['create', 'tiny', '--kernel', kernel, '--memory', '128M', '--disk', disk]);
        assert.equal(created.status, 0, created.stderr);
        // The first verb starts the daemon, which reads daemon.json and fills its pool.
        await until('two pool processes ready', () => poolOf(dir).idle === 2);
        const waiting = slotPids(dir);
        [...waiting.values()].forEach((p) => seen.add(p));
        assert.equal(waiting.size, 2);
        for (const pid of waiting.values()) {
          // Jailed like any VMM: its own uid, already pivoted into its root.
          const uid = Number(/^Uid:\s+(\d+)/m.exec(readSafe(`/proc/${pid}/status`))![1]);
          assert.ok(uid >= JAIL_UID_BASE, `pool process ${pid} runs as jail uid ${uid}`);
        }

        const started = kiln(dir, ['start', 'tiny', '--json']);
        assert.equal(started.status, 0, started.stderr);
        const info = JSON.parse(kiln(dir, ['info', 'tiny', '--json']).stdout) as {
          state: string;
          pid: number;
          jail: { uid: number; root: string };
        };
        assert.equal(info.state, 'running');
        assert.ok([...waiting.values()].includes(info.pid), `the VM runs in a pool process (${info.pid})`);
        assert.ok(info.jail.root.startsWith(join(dir, 'pool') + '/'), info.jail.root);
        // The guest ran (its 'K' is in the console log the pool process's output became), with
        // its kernel and disk bound into the jail after the process had entered it.
        const log = join(dir, 'run', 'tiny', 'console.log');
        await until("the guest's first byte in its console log", () => readSafe(log).includes('K'), 30);
        assert.match(readSafe(log), /InstanceStart: .*idle\.elf \(pvh\), 1 vCPU, 128 MiB, 1 drive/);
        assert.equal(statSync(disk).uid, info.jail.uid, 'the disk is lent to the jail user while the VM runs');

        // The pool refills behind the VM it handed out.
        await until('the pool to refill', () => poolOf(dir).idle === 2);
        const refilled = slotPids(dir);
        [...refilled.values()].forEach((p) => seen.add(p));

        // A pool process that dies is replaced, never handed out.
        const victim = [...refilled.values()].find((p) => p !== info.pid)!;
        process.kill(victim, 'SIGKILL');
        await until(
          'the dead pool process to be replaced',
          () => poolOf(dir).idle === 2 && ![...slotPids(dir).values()].includes(victim),
        );
        assert.match(readSafe(join(dir, 'daemon.log')), new RegExp(`pool process ${victim} ended`));
        [...slotPids(dir).values()].forEach((p) => seen.add(p));

        // A snapshot, a stop (the slot and its mounts go), a restore through the pool.
        const snap = kiln(dir, ['snapshot', 'tiny', 't1']);
        assert.equal(snap.status, 0, snap.stderr);
        const slot = join(dir, 'pool', [...slotPids(dir)].find(([, p]) => p === info.pid)![0]);
        assert.ok(mountsUnder(slot).length >= 2, 'the kernel and the disk are bound into the jail from outside');
        assert.equal(kiln(dir, ['stop', 'tiny', '--force']).status, 0);
        await until('the slot to be given back', () => !existsSync(slot) && mountsUnder(slot).length === 0, 30);
        assert.equal(statSync(disk).uid, 0, 'the disk is given back to its owner');
        const before = slotPids(dir);
        const restored = kiln(dir, ['restore', 'tiny', 't1']);
        assert.equal(restored.status, 0, restored.stderr);
        const after = JSON.parse(kiln(dir, ['info', 'tiny', '--json']).stdout) as { state: string; pid: number };
        assert.equal(after.state, 'running');
        assert.ok([...before.values()].includes(after.pid), `the restore took a pool process (${after.pid})`);
        assert.match(readSafe(log), /snapshot loaded: \/snapshot\/state .*; running/);
        [...slotPids(dir).values()].forEach((p) => seen.add(p));
        assert.equal(kiln(dir, ['stop', 'tiny', '--force']).status, 0);
        await until('the restored slot to be given back', () => mountsUnder(join(dir, 'pool')).length <= 1, 30);
      } finally {
        await stopDaemon(dir, [...seen]);
        assert.deepEqual(mountsUnder(dir), [], 'nothing stays mounted');
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );

  test(
    'under memory pressure the pool gives its processes back and does not refill',
    { skip: kvmSkip, timeout: 3 * 60_000 },
    async () => {
      const dir = tempDir();
      const seen = new Set<number>();
      try {
        // A floor no host reaches: the pool is always under pressure.
        const daemonLog = openSync(join(dir, 'daemon.log'), 'a');
        const daemon = spawn(process.execPath, [CLI, 'daemon', '--pool', '2'], {
          env: { ...process.env, KILN_STATE_DIR: dir, KILN_POOL_MIN_AVAILABLE_MIB: String(1 << 30) },
          stdio: ['ignore', daemonLog, daemonLog],
        });
        closeSync(daemonLog);
        await until('the daemon', () => existsSync(join(dir, 'kiln.sock')), 30);
        await until('the pool to have started its processes', () => {
          [...slotPids(dir).values()].forEach((p) => seen.add(p));
          return seen.size >= 1;
        });
        await until('the pool to give everything back', () => {
          [...slotPids(dir).values()].forEach((p) => seen.add(p));
          const c = poolOf(dir);
          return c.idle === 0 && c.starting === 0 && [...seen].every((p) => !alive(p));
        });
        await sleep(3000);
        assert.deepEqual(poolOf(dir), { idle: 0, starting: 0, size: 2 }, 'nothing refilled under pressure');
        assert.match(readSafe(join(dir, 'daemon.log')), /memory pressure .*: the pool gives back process \d+/);
        assert.equal(daemon.exitCode, null, 'the daemon runs on');
      } finally {
        await stopDaemon(dir, [...seen]);
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});
