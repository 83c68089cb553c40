// The manager's snapshot verbs end to end: a running kit Linux with a shell and a
// writable disk is snapshotted (its shell's variables are in the snapshot, its disk is
// copied), cloned into a second VM that runs beside it, and restored after a change to
// its disk: the shell remembers, the disk is as it was. A diff taken after the restore
// restores (its chain laid over t1), is merged, and outlives its base. Bad tags and
// existing tags are refused; nothing is overwritten.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { unixHttp } from '../../src/manager/manager.js';
import { Store } from '../../src/manager/store.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { CLI, ask, kiln } from './kiln-cli.js';

describe('kiln snapshot, restore and clone', { skip: kvmSkip }, () => {
  test(
    "a running Linux's shell state and disk survive snapshot, clone and restore",
    { timeout: 20 * 60_000 },
    async () => {
      const dir = tempDir();
      const tapA = `ksnap${process.pid % 10000}a`;
      const tapB = `ksnap${process.pid % 10000}b`;
      const disk = join(dir, 'data.img');
      writeFileSync(disk, Buffer.alloc(1 << 20), { mode: 0o600 });
      try {
        const created = kiln(dir, [
          'create',
          'orig',
          '--memory',
          '128M',
          '--disk',
          disk,
          '--net',
          `tap=${tapA}`,
          '--vsock',
          `3,${join(dir, 'v.sock')}`,
        ]);
        assert.equal(created.status, 0, created.stderr);
        const started = kiln(dir, ['start', 'orig']);
        assert.equal(started.status, 0, started.stderr);
        ask(dir, 'orig', 'echo up-$((6*7))', /up-42/, 60);
        // State only the running guest has: a shell variable, and a mark on its disk.
        ask(
          dir,
          'orig',
          'X=kept-in-memory; echo before | dd of=/dev/vda conv=fsync 2>/dev/null; echo marked',
          /marked/,
        );
        assert.equal(readFileSync(disk).subarray(0, 7).toString(), 'before\n');

        const bad = kiln(dir, ['snapshot', 'orig', 'Bad_Tag']);
        assert.equal(bad.status, 1);
        assert.match(bad.stderr, /invalid snapshot tag 'Bad_Tag'/);
        const snap = kiln(dir, ['snapshot', 'orig', 't1', '--json']);
        assert.equal(snap.status, 0, snap.stderr);
        const meta = JSON.parse(snap.stdout) as {
          tag: string;
          disks: unknown[];
          memoryBytes: number;
          memoryOnDisk: number;
        };
        assert.equal(meta.tag, 't1');
        assert.equal(meta.disks.length, 1, 'the writable disk was copied');
        assert.equal(meta.memoryBytes, 128 * 1024 * 1024);
        // Progress of the long parts comes to the client as they go.
        assert.match(snap.stderr, /kiln: 'orig': (copying disk \w+: 100%|disk \w+ copied as a reflink)/);
        const again = kiln(dir, ['snapshot', 'orig', 't1']);
        assert.equal(again.status, 1);
        assert.match(again.stderr, /already has a snapshot 't1'/);
        assert.match(kiln(dir, ['info', 'orig']).stdout, /^Snapshots: +t1$/m);
        assert.equal(
          (JSON.parse(kiln(dir, ['snapshots', 'orig', '--json']).stdout) as { snapshots: unknown[] }).snapshots.length,
          1,
        );
        // The original runs on after the snapshot (it was paused, then resumed) and changes its disk.
        ask(
          dir,
          'orig',
          'echo after! | dd of=/dev/vda conv=fsync 2>/dev/null; echo changed-$X',
          /changed-kept-in-memory/,
        );
        assert.equal(readFileSync(disk).subarray(0, 7).toString(), 'after!\n');

        // A clone from t1 runs beside the original, with the snapshot's memory, its own disk
        // copy, its own TAP (it must be given one) and its own vsock CID.
        const noNet = kiln(dir, ['clone', 'orig', 'twin', '--from', 't1']);
        assert.equal(noNet.status, 1);
        assert.match(
          noNet.stderr,
          /'orig' has network interface 'net0'; a clone needs its own: --net id=net0,tap=NAME/,
        );
        assert.equal(kiln(dir, ['ls', '--json']).stdout.includes('twin'), false, 'a refused clone leaves nothing');
        const cloned = kiln(dir, ['clone', 'orig', 'twin', '--from', 't1', '--net', `tap=${tapB}`]);
        assert.equal(cloned.status, 0, cloned.stderr);
        assert.match(cloned.stdout, /^twin: running$/m);
        assert.ok(existsSync(`/sys/class/net/${tapB}`), "the clone's VMM opened its own TAP");
        const twinConfig = await unixHttp(join(new Store(dir).runDir('twin'), 'api.sock'), 'GET', '/vm/config');
        const fc = twinConfig.body as {
          'network-interfaces': Array<{ host_dev_name: string }>;
          vsock: { guest_cid: number };
        };
        assert.equal(fc['network-interfaces'][0]!.host_dev_name, tapB);
        assert.equal(fc.vsock.guest_cid, 4, 'a CID of its own');
        assert.match(kiln(dir, ['info', 'twin']).stdout, /^vsock: +CID 4, /m);
        ask(dir, 'twin', 'echo twin-$X; head -c 7 /dev/vda', /twin-kept-in-memory\s+before/);
        assert.equal(
          readFileSync(disk).subarray(0, 7).toString(),
          'after!\n',
          "the clone never wrote the original's disk",
        );
        const states = JSON.parse(kiln(dir, ['ls', '--json']).stdout) as {
          vms: Array<{ name: string; state: string }>;
        };
        assert.deepEqual(states.vms.map((v) => `${v.name}:${v.state}`).sort(), ['orig:running', 'twin:running']);

        // Restore: refused while running; once stopped, the VM continues from t1, its disk put back.
        const busy = kiln(dir, ['restore', 'orig', 't1']);
        assert.equal(busy.status, 1);
        assert.match(busy.stderr, /'orig' is running; stop it first/);
        assert.equal(kiln(dir, ['stop', 'orig', '--force']).status, 0);
        const restored = kiln(dir, ['restore', 'orig', 't1']);
        assert.equal(restored.status, 0, restored.stderr);
        assert.equal(readFileSync(disk).subarray(0, 7).toString(), 'before\n', 'the disk is as it was at t1');
        ask(dir, 'orig', 'echo restored-$X', /restored-kept-in-memory/);
        const missing = kiln(dir, ['restore', 'twin', 'nope']);
        assert.match(missing.stderr, /'twin' has no snapshot 'nope'/);

        // A diff: only what changed since t1 (the snapshot this run was restored from).
        ask(dir, 'orig', 'Y=in-the-diff; echo set-$Y', /set-in-the-diff/);
        const noBase = kiln(dir, ['snapshot', 'twin', 'x', '--diff']);
        assert.equal(noBase.status, 1);
        assert.match(noBase.stderr, /'twin' has no snapshot of this run to diff against: take a full snapshot first/);
        const d1 = kiln(dir, ['snapshot', 'orig', 'd1', '--diff', '--json']);
        assert.equal(d1.status, 0, d1.stderr);
        const diffMeta = JSON.parse(d1.stdout) as { type: string; base: string; memoryOnDisk: number };
        assert.equal(diffMeta.type, 'diff');
        assert.equal(diffMeta.base, 't1');
        assert.ok(diffMeta.memoryOnDisk < meta.memoryOnDisk, 'a diff is smaller');
        assert.match(kiln(dir, ['snapshots', 'orig']).stdout, /^d1 .* diff of t1, /m);
        const baseRm = kiln(dir, ['snapshot', 'rm', 'orig', 't1']);
        assert.equal(baseRm.status, 1);
        assert.match(baseRm.stderr, /snapshot 't1' is the base of diff 'd1'; merge it first/);
        assert.equal(kiln(dir, ['stop', 'orig', '--force']).status, 0);
        const fromDiff = kiln(dir, ['restore', 'orig', 'd1']);
        assert.equal(fromDiff.status, 0, fromDiff.stderr);
        assert.match(fromDiff.stderr, /kiln: 'orig': laying 1 diff\(s\) over 't1'/);
        ask(dir, 'orig', 'echo diff-$X-$Y', /diff-kept-in-memory-in-the-diff/);
        // Merged, the diff stands alone: its base can go, and it still restores.
        const merged = kiln(dir, ['snapshot', 'merge', 'orig', 'd1', '--json']);
        assert.equal(merged.status, 0, merged.stderr);
        assert.equal((JSON.parse(merged.stdout) as { type: string }).type, 'full');
        assert.equal(kiln(dir, ['snapshot', 'rm', 'orig', 't1']).status, 0);
        assert.equal(kiln(dir, ['stop', 'orig', '--force']).status, 0);
        const fromMerged = kiln(dir, ['restore', 'orig', 'd1']);
        assert.equal(fromMerged.status, 0, fromMerged.stderr);
        ask(dir, 'orig', 'echo merged-$X-$Y', /merged-kept-in-memory-in-the-diff/);

        // A VM with snapshots is not removed by accident.
        kiln(dir, ['stop', 'orig', '--force']);
        const rm = kiln(dir, ['rm', 'orig']);
        assert.equal(rm.status, 1);
        assert.match(rm.stderr, /has 1 snapshot\(s\) \(d1\); remove them first/);
        assert.equal(kiln(dir, ['snapshot', 'rm', 'orig', 'd1']).status, 0);
        assert.equal(
          (JSON.parse(kiln(dir, ['snapshots', 'orig', '--json']).stdout) as { snapshots: unknown[] }).snapshots.length,
          0,
        );
      } finally {
        for (const name of ['orig', 'twin']) {
          kiln(dir, ['stop', name, '--force']);
          for (const tag of ['d1', 't1']) kiln(dir, ['snapshot', 'rm', name, tag]);
          kiln(dir, ['rm', name]);
        }
        spawnSync('pkill', ['-f', `${CLI} daemon`], { env: { ...process.env, KILN_STATE_DIR: dir } });
      }
    },
  );
});
