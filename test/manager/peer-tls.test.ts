// The migration channel between two hosts' daemons over TLS (kiln daemon --tls-cert
// --tls-key, kiln migrate --tls-ca): the signed requests and the migration stream's
// upgrade pass through TLS with the destination's certificate checked; a certificate
// that does not chain to the CA, or names another host, a plain client, and a TLS client
// at a plain daemon are each refused with a clear error, and the daemon goes on. Runs
// without KVM: it drives the channel itself, with requests about migrations that do not
// exist (a whole migration over it needs a running VM: test/manager/migrate.test.ts).
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { peerCall, peerStream, type Peer } from '../../src/manager/peer.js';
import { toolAvailable } from '../helpers.js';
import { CLI, kiln } from './kiln-cli.js';

const hasOpenssl = toolAvailable('openssl', 'version');

/** A self-signed certificate (its own CA) for `san`, and its key (mode 600). */
function selfSigned(dir: string, name: string, san: string): { cert: string; key: string } {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  execFileSync(
    'openssl',
    [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-days',
      '1',
      '-subj',
      `/CN=${name}`,
      '-addext',
      `subjectAltName=${san}`,
      '-keyout',
      key,
      '-out',
      cert,
    ],
    { stdio: 'ignore' },
  );
  chmodSync(key, 0o600);
  return { cert, key };
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

interface Daemon {
  child: ChildProcess;
  port: number;
  output: () => string;
}

async function startDaemon(stateDir: string, tokenFile: string, extra: string[]): Promise<Daemon> {
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [CLI, 'daemon', '--listen', `127.0.0.1:${port}`, '--token-file', tokenFile, ...extra],
    { env: { ...process.env, KILN_STATE_DIR: stateDir }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (out += c));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (out += c));
  for (let i = 0; i < 300 && !/taking migrations/.test(out) && child.exitCode === null; i++) await sleep(50);
  assert.match(out, /taking migrations/, `the daemon listens: ${out}`);
  return { child, port, output: () => out };
}

async function stopDaemon(d: Daemon | undefined): Promise<void> {
  if (!d || d.child.exitCode !== null || d.child.signalCode !== null) return;
  const gone = new Promise((resolve) => d.child.once('exit', resolve));
  d.child.kill('SIGTERM');
  await gone;
}

describe('the migration channel over TLS', { skip: !hasOpenssl && 'needs openssl' }, () => {
  let dir: string;
  let token: string;
  let tokenFile: string;
  let good: { cert: string; key: string };
  let other: { cert: string; key: string };
  let wrongName: { cert: string; key: string };
  let tlsDaemon: Daemon | undefined;
  let plainDaemon: Daemon | undefined;
  const peer = (d: Daemon, ca?: string): Peer => ({ host: '127.0.0.1', port: d.port, ...(ca ? { ca } : {}) });

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'kiln-peer-tls-'));
    token = randomBytes(24).toString('hex');
    tokenFile = join(dir, 'token');
    writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
    good = selfSigned(dir, 'good', 'IP:127.0.0.1');
    other = selfSigned(dir, 'other', 'IP:127.0.0.1');
    wrongName = selfSigned(dir, 'wrong-name', 'DNS:elsewhere.example');
    tlsDaemon = await startDaemon(join(dir, 'tls-state'), tokenFile, ['--tls-cert', good.cert, '--tls-key', good.key]);
    plainDaemon = await startDaemon(join(dir, 'plain-state'), tokenFile, []);
  });
  after(async () => {
    await stopDaemon(tlsDaemon);
    await stopDaemon(plainDaemon);
    rmSync(dir, { recursive: true, force: true });
  });

  test('the daemon says it takes migrations over TLS', () => {
    assert.match(tlsDaemon!.output(), /taking migrations on 127\.0\.0\.1:\d+ over TLS/);
    assert.doesNotMatch(plainDaemon!.output(), /over TLS/);
  });

  test('signed requests pass through TLS, checked against the CA; unsigned ones are refused inside it', async () => {
    const ca = readFileSync(good.cert, 'utf8');
    // A request the daemon answers itself: an incoming migration it does not have.
    await assert.rejects(
      peerCall(peer(tlsDaemon!, ca), token, 'GET', '/migrations/nosuch'),
      /the kiln daemon at 127\.0\.0\.1:\d+: no migration of 'nosuch' is coming in here/,
    );
    await assert.rejects(
      peerCall(peer(tlsDaemon!, ca), token, 'POST', '/migrations', { definition: 'not one' }),
      /the kiln daemon at 127\.0\.0\.1:\d+: .+/,
    );
    await assert.rejects(
      peerCall(peer(tlsDaemon!, ca), 'x'.repeat(32), 'GET', '/migrations/nosuch'),
      /not signed with this daemon's token/,
    );
  });

  test("the migration stream's upgrade goes through TLS too", async () => {
    const ca = readFileSync(good.cert, 'utf8');
    // No such incoming migration: the daemon answers the upgrade with 409, over TLS.
    await assert.rejects(
      peerStream(peer(tlsDaemon!, ca), token, '/migrations/nosuch/stream'),
      /refused the migration stream \(409\)/,
    );
    await assert.rejects(
      peerStream(peer(tlsDaemon!, ca), 'y'.repeat(32), '/migrations/nosuch/stream'),
      /refused the migration stream \(401\)/,
    );
  });

  test('a certificate that does not chain to the CA is refused before anything is sent', async () => {
    const before = tlsDaemon!.output().length;
    await assert.rejects(
      peerCall(peer(tlsDaemon!, readFileSync(other.cert, 'utf8')), token, 'GET', '/migrations/nosuch'),
      /cannot reach the kiln daemon at 127\.0\.0\.1:\d+ over TLS: .*(SELF_SIGNED|UNABLE_TO|CERT)/,
    );
    await assert.rejects(
      peerStream(peer(tlsDaemon!, readFileSync(other.cert, 'utf8')), token, '/migrations/nosuch/stream'),
      /over TLS/,
    );
    // The daemon saw the failed handshakes, and never a request.
    for (let i = 0; i < 40 && !/TLS handshake .* failed/.test(tlsDaemon!.output().slice(before)); i++) await sleep(25);
    assert.match(tlsDaemon!.output().slice(before), /TLS handshake from \S+ failed/);
    assert.doesNotMatch(tlsDaemon!.output().slice(before), /refused an unsigned/);
    // Failing handshakes as fast as one likes do not fill the log: one line per 10 s.
    const ca = readFileSync(other.cert, 'utf8');
    for (let i = 0; i < 20; i++)
      await assert.rejects(peerCall(peer(tlsDaemon!, ca), token, 'GET', '/migrations/nosuch'), /over TLS/);
    await sleep(200);
    const lines =
      tlsDaemon!
        .output()
        .slice(before)
        .match(/TLS handshake from/g) ?? [];
    assert.equal(lines.length, 1, tlsDaemon!.output().slice(before));
    assert.equal(tlsDaemon!.child.exitCode, null);
  });

  test('a certificate naming another host is refused', async () => {
    const d = await startDaemon(join(dir, 'wrong-name-state'), tokenFile, [
      '--tls-cert',
      wrongName.cert,
      '--tls-key',
      wrongName.key,
    ]);
    try {
      await assert.rejects(
        peerCall(peer(d, readFileSync(wrongName.cert, 'utf8')), token, 'GET', '/migrations/nosuch'),
        /over TLS: ERR_TLS_CERT_ALTNAME_INVALID/,
      );
    } finally {
      await stopDaemon(d);
    }
  });

  test('a plain client at a TLS daemon, and a TLS client at a plain one, get a clear error', async () => {
    await assert.rejects(
      peerCall(peer(tlsDaemon!), token, 'GET', '/migrations/nosuch'),
      /cannot reach the kiln daemon at 127\.0\.0\.1:\d+: .*give --tls-ca/,
    );
    await assert.rejects(
      peerCall(peer(plainDaemon!, readFileSync(good.cert, 'utf8')), token, 'GET', '/migrations/nosuch'),
      /cannot reach the kiln daemon at 127\.0\.0\.1:\d+ over TLS: /,
    );
    // Both daemons still answer.
    await assert.rejects(
      peerCall(peer(tlsDaemon!, readFileSync(good.cert, 'utf8')), token, 'GET', '/migrations/nosuch'),
      /no migration of 'nosuch' is coming in here/,
    );
    await assert.rejects(peerCall(peer(plainDaemon!), token, 'GET', '/migrations/nosuch'), /is coming in here/);
    assert.equal(tlsDaemon!.child.exitCode, null);
    assert.equal(plainDaemon!.child.exitCode, null);
  });

  test('bad TLS options are one-line errors, and no daemon starts', () => {
    const state = join(dir, 'bad-state');
    const listen = ['daemon', '--listen', '127.0.0.1:1', '--token-file', tokenFile];
    const cases: Array<[string[], RegExp]> = [
      [[...listen, '--tls-cert', good.cert], /--tls-cert and --tls-key go together/],
      [['daemon', '--tls-cert', good.cert, '--tls-key', good.key], /--tls-cert and --tls-key secure --listen/],
      [[...listen, '--tls-cert', join(dir, 'absent.crt'), '--tls-key', good.key], /cannot read --tls-cert .*ENOENT/],
      [[...listen, '--tls-cert', tokenFile, '--tls-key', good.key], /--tls-cert .* is not a PEM file/],
      [[...listen, '--tls-cert', good.cert, '--tls-key', other.key], /are not a certificate and its key/],
    ];
    const loose = join(dir, 'loose.key');
    writeFileSync(loose, readFileSync(good.key), { mode: 0o644 });
    chmodSync(loose, 0o644);
    cases.push([[...listen, '--tls-cert', good.cert, '--tls-key', loose], /readable by others .*chmod 600/]);
    for (const [args, message] of cases) {
      const r = kiln(state, args);
      assert.notEqual(r.status, 0, args.join(' '));
      assert.match(r.stderr, message, args.join(' '));
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.ok(!existsSync(join(state, 'kiln.sock')), 'no daemon listens');
    }
  });

  test('kiln migrate checks --tls-ca before asking anyone', () => {
    const state = join(dir, 'migrate-state');
    const base = ['migrate', 'vm1', '--to', '127.0.0.1:1', '--token-file', tokenFile];
    for (const [ca, message] of [
      [join(dir, 'absent.crt'), /cannot read --tls-ca .*ENOENT/],
      [tokenFile, /--tls-ca .* is not a PEM file/],
      [good.key, /--tls-ca .* holds no certificate/],
    ] as const) {
      const r = kiln(state, [...base, '--tls-ca', ca]);
      assert.notEqual(r.status, 0);
      assert.match(r.stderr, message);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    }
  });
});
