// Live migration between two kiln-vmm processes: the fixture's booted Linux, loaded in
// one, keeps a loop running that changes its memory and is moved, while it runs, into
// another (over TCP with TLS, and over a Unix socket); on the destination its shell
// answers, its loop's count went on and its disk reads, and the source has ended. A wrong
// token is refused and the destination listens on; a destination killed mid-way leaves
// the VM running at the source; a source killed mid-way leaves nothing running at the
// destination; a guest dirtying memory faster than the link carries it is throttled and
// converges, or the migration gives up and the VM runs on at the source.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, test } from 'node:test';
import { unixHttp } from '../../src/manager/manager.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';
import { FIXTURE_DISK_MARK, linuxSnapshotFixture, type LinuxFixture } from '../linux-fixture.js';
import { READ_COUNT, ask, put, startVmm, type RunningVmm } from '../vmm-driver.js';

const log = (line: string) => process.stderr.write(`# ${line}\n`);
const fault = (r: { body: unknown }) => (r.body as { fault_message?: string }).fault_message ?? '';
const TOKEN = 'a-shared-secret-of-this-test';

interface Progress {
  phase: string;
  address: string;
  iteration: number;
  pages_sent: number;
  throttle_percent: number;
  downtime_ms?: number;
  error?: string;
}
const progress = async (vmm: RunningVmm) => (await unixHttp(vmm.api, 'GET', '/migration')).body as Progress;

/** The fixture's NIC (if it has one) on a TAP of this VMM's own. */
const nics = (fixture: LinuxFixture, tap: string) =>
  fixture.nic ? { network_overrides: [{ iface_id: 'net0', host_dev_name: tap }] } : {};

/** A kiln-vmm running the fixture's Linux, with a loop counting into /tmp/count (the guest's RAM). */
async function source(fixture: LinuxFixture, dir: string, name: string, loop = true): Promise<RunningVmm> {
  const vmm = await startVmm(dir, name);
  await put(vmm.api, '/snapshot/load', {
    snapshot_path: fixture.state,
    mem_backend: { backend_type: 'File', backend_path: fixture.memory },
    resume_vm: true,
    ...nics(fixture, `kmg${process.pid % 10000}${name}`),
  });
  await ask(vmm, 'echo up-$((6*7))', /up-42/, 120);
  if (loop) vmm.console.write('(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo $i > /tmp/count; done) &\n');
  return vmm;
}

/** The loop's count as the guest reads it now. */
async function count(vmm: RunningVmm, tag: string): Promise<number> {
  // Read again while the loop has the file truncated (between its open and its write).
  const m = await ask(vmm, `${READ_COUNT} echo ${tag}-$c-end`, new RegExp(`${tag}-(\\d+)-end`), 120, 15_000);
  return Number(/-(\d+)-end/.exec(m)![1]);
}

async function until<T>(what: string, seconds: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) assert.fail(`${what}: not within ${seconds} s`);
    await sleep(100);
  }
}

const stop = async (...vmms: RunningVmm[]) => {
  for (const v of vmms) {
    if (v.child.exitCode === null) v.child.kill('SIGKILL');
    await v.exited;
  }
};

describe('live migration between kiln-vmm processes', { skip: kvmSkip }, () => {
  test(
    'a running Linux moves over TCP with TLS: its shell, its loop and its disk go on at the destination; the source ends',
    { timeout: 10 * 60_000 },
    async () => {
      const fixture = await linuxSnapshotFixture(log);
      const dir = tempDir();
      const a = await source(fixture, dir, 'a');
      const b = await startVmm(dir, 'b');
      const intruder = await startVmm(dir, 'c');
      try {
        const before = await count(a, 'before');
        // A certificate for 127.0.0.1 (the source checks it against this CA: itself).
        const tlsOk = toolAvailable('openssl', 'version');
        const cert = join(dir, 'cert.pem');
        const key = join(dir, 'key.pem');
        if (tlsOk)
          execFileSync('openssl', [
            'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
            '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert,
          ], { stdio: 'ignore' }); // prettier-ignore
        else log('openssl missing: this migration runs without TLS');
        const bad = await unixHttp(b.api, 'PUT', '/migration/receive', { listen: 'tcp:127.0.0.1:0' });
        assert.equal(bad.status, 400);
        assert.match(fault(bad), /missing field `token`/);
        await put(b.api, '/migration/receive', {
          listen: 'tcp:127.0.0.1:0',
          token: TOKEN,
          ...(tlsOk ? { tls_cert: cert, tls_key: key } : {}),
          ...nics(fixture, `kmg${process.pid % 10000}b`),
        });
        const late = await unixHttp(b.api, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 64 });
        assert.equal(late.status, 400, 'a receiving VMM takes no configuration');
        const address = (await progress(b)).address;
        assert.match(address, /^tcp:127\.0\.0\.1:\d+$/);
        // A wrong token: refused, and nothing changes on either side.
        await put(intruder.api, '/snapshot/load', {
          snapshot_path: fixture.state,
          mem_backend: { backend_type: 'File', backend_path: fixture.memory },
          resume_vm: true,
          ...nics(fixture, `kmg${process.pid % 10000}c`),
        });
        const wrong = await unixHttp(intruder.api, 'PUT', '/migration/send', {
          destination: address,
          token: 'not-the-token',
          ...(tlsOk ? { tls_ca: cert } : {}),
        });
        assert.equal(wrong.status, 400);
        assert.match(fault(wrong), /wrong migration token/);
        // A local migration (kiln upgrade's) hands memory over: a VM restored from a
        // snapshot's memory file has private memory, so it is refused before connecting.
        const local = await unixHttp(intruder.api, 'PUT', '/migration/send', {
          destination: address,
          token: TOKEN,
          local: true,
        });
        assert.equal(local.status, 400);
        assert.match(fault(local), /a local migration hands guest memory over, and this VM's memory is private/);
        assert.equal((await progress(b)).phase, 'listening');
        assert.equal(((await unixHttp(intruder.api, 'GET', '/')).body as { state: string }).state, 'Running');

        await put(a.api, '/migration/send', {
          destination: address,
          token: TOKEN,
          downtime_ms: 300,
          ...(tlsOk ? { tls_ca: cert } : {}),
        });
        const second = await unixHttp(a.api, 'PUT', '/migration/send', { destination: address, token: TOKEN });
        assert.equal(second.status, 400, 'a second migration of the same VM is refused');
        assert.match(fault(second), /migration of this microVM is in progress/);
        const code = await a.exited;
        assert.equal(code, 0, `the source ends once the destination runs the VM: ${a.output().slice(-1500)}`);
        const done = await progress(b);
        assert.equal(done.phase, 'completed', JSON.stringify(done));
        log(`migrated: ${done.pages_sent} pages, downtime ${done.downtime_ms} ms`);
        assert.equal(((await unixHttp(b.api, 'GET', '/')).body as { state: string }).state, 'Running');
        await ask(b, 'echo moved-$((6*7))', /moved-42/, 120, 15_000);
        const after = await count(b, 'after');
        assert.ok(after > before, `the loop went on: ${before} then ${after}`);
        const later = await count(b, 'later');
        assert.ok(later > after, `and goes on at the destination: ${after} then ${later}`);
        // The loop stops (a busy guest's shell answers slowly), then its disk reads.
        await ask(b, 'touch /tmp/stop; echo stopped-$((6*7))', /stopped-42/, 120, 15_000);
        await ask(b, 'head -c 17 /dev/vda; echo', new RegExp(FIXTURE_DISK_MARK.trim()), 120, 15_000);
      } finally {
        await stop(a, b, intruder);
      }
    },
  );

  test(
    'a destination killed mid-way leaves the VM running at the source; a source killed mid-way leaves nothing at the destination',
    { timeout: 10 * 60_000 },
    async () => {
      const fixture = await linuxSnapshotFixture(log);
      const dir = tempDir();
      const a = await source(fixture, dir, 'a');
      const b = await startVmm(dir, 'b');
      const c = await startVmm(dir, 'c');
      try {
        /** A slow migration (1 MiB/s) from `a` into `to`, until the first pages arrived. */
        const slowly = async (to: RunningVmm, name: string) => {
          const sock = join(dir, `to-${name}.sock`);
          await put(to.api, '/migration/receive', {
            listen: `unix:${sock}`,
            token: TOKEN,
            ...nics(fixture, `kmg${process.pid % 10000}${name}`),
          });
          await put(a.api, '/migration/send', { destination: `unix:${sock}`, token: TOKEN, max_bandwidth_mib_s: 1 });
          await until('pages reach the destination', 30, async () =>
            (await progress(to)).pages_sent > 0 ? true : undefined,
          );
        };
        const failure = (side: RunningVmm, what: string) =>
          until(what, 60, async () => {
            const p = await progress(side);
            return p.phase === 'failed' ? p : undefined;
          });
        // The destination dies during the first pass.
        await slowly(b, 'b');
        b.child.kill('SIGKILL');
        await b.exited;
        const failed = await failure(a, 'the source sees the failure');
        assert.match(failed.error ?? '', /closed|failed|ECONNRESET|EPIPE/);
        assert.equal(((await unixHttp(a.api, 'GET', '/')).body as { state: string }).state, 'Running');
        const on = await count(a, 'still');
        assert.ok(on > 0);

        // Now the other way round: the source dies during the first pass.
        await slowly(c, 'c');
        a.child.kill('SIGKILL');
        await a.exited;
        const gone = await failure(c, 'the destination sees the failure');
        assert.match(gone.error ?? '', /closed/);
        assert.equal(((await unixHttp(c.api, 'GET', '/')).body as { state: string }).state, 'Not started');
        assert.match(c.output(), /failed; nothing runs here/);
      } finally {
        await stop(a, b, c);
      }
    },
  );

  test(
    'a guest dirtying memory faster than the link carries it is throttled, and converges or fails cleanly',
    { timeout: 10 * 60_000 },
    async () => {
      const fixture = await linuxSnapshotFixture(log);
      const dir = tempDir();
      const a = await source(fixture, dir, 'a', false);
      const b = await startVmm(dir, 'b');
      try {
        // A 4 MiB buffer filled over and over (dd's reads from /dev/zero: about 1000 pages
        // dirtied per pass); the link carries 1 MiB/s.
        await ask(a, 'dd if=/dev/zero of=/dev/null bs=4M count=100000000 & echo churning-$((6*7))', /churning-42/, 60);
        const sock = join(dir, 'to-b.sock');
        await put(b.api, '/migration/receive', {
          listen: `unix:${sock}`,
          token: TOKEN,
          ...nics(fixture, `kmg${process.pid % 10000}b`),
        });
        await put(a.api, '/migration/send', {
          destination: `unix:${sock}`,
          token: TOKEN,
          max_bandwidth_mib_s: 1,
          max_iterations: 8,
          downtime_ms: 300,
        });
        let throttled = 0;
        const end = await until('the migration ends', 300, async () => {
          if (a.child.exitCode !== null) return 'completed';
          const p = await progress(a).catch(() => null);
          if (!p) return undefined;
          throttled = Math.max(throttled, p.throttle_percent);
          return p.phase === 'failed' ? `failed: ${p.error}` : undefined;
        });
        log(`under churn: ${end} (throttled up to ${throttled}%)`);
        assert.ok(throttled > 0, 'the vCPUs were throttled');
        if (end === 'completed') {
          await ask(b, 'echo converged-$((6*7))', /converged-42/, 120);
        } else {
          assert.match(end, /memory changes faster than the link carries it.*throttled to \d+%.*keeps running here/);
          assert.equal(((await unixHttp(a.api, 'GET', '/')).body as { state: string }).state, 'Running');
          await ask(a, 'echo kept-$((6*7))', /kept-42/, 120);
          assert.equal((await progress(b)).phase, 'failed');
        }
      } finally {
        await stop(a, b);
      }
    },
  );
});
