// The migration protocol's parts that need no guest: frames read back as written
// whatever the chunking, an oversized or truncated stream refused; the token proven
// without being sent; the daemons' signed requests (a wrong token, a replayed nonce, an
// old timestamp, a changed body all refused); a receiving kiln-vmm refusing a source that
// speaks another protocol version or has the wrong token, and listening on afterwards;
// the destination daemon refusing a VM whose disks it does not have, or whose name it has.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Manager, unixHttp } from '../../src/manager/manager.js';
import { parseDefinition } from '../../src/manager/definition.js';
import { Verifier, parsePeer, readToken, sign } from '../../src/manager/peer.js';
import { Store } from '../../src/manager/store.js';
import { createGuestMemoryFile, memoryFileIdentity } from '../../src/memory/shared-memory.js';
import { encodeStateFile } from '../../src/snapshot/format.js';
import {
  Frame,
  FrameReader,
  MAX_PAYLOAD,
  errorText,
  frame,
  jsonFrame,
  parseAddress,
  proof,
  proofMatches,
} from '../../src/migration/wire.js';
import { tempDir } from '../helpers.js';

const VMM = fileURLToPath(new URL('../../src/vmm-cli.cjs', import.meta.url));

describe('the migration wire format', () => {
  test('frames come back whole and in order however the stream cuts them', async () => {
    const stream = new PassThrough();
    const reader = new FrameReader(stream, 'the test');
    const big = Buffer.alloc(3 * 1024 * 1024 + 5, 7);
    const all = Buffer.concat([jsonFrame(Frame.HELLO, { a: 1 }), frame(Frame.PAGES, big), frame(Frame.GO)]);
    // One byte, then odd sizes: headers and payloads split anywhere.
    for (let at = 0, step = 1; at < all.length; at += step, step = (step * 7 + 3) % 65_537)
      stream.write(all.subarray(at, at + step));
    const hello = await reader.next();
    assert.equal(hello.type, Frame.HELLO);
    assert.deepEqual(JSON.parse(hello.payload.toString()), { a: 1 });
    const pages = await reader.next();
    assert.equal(pages.type, Frame.PAGES);
    assert.ok(pages.payload.equals(big));
    assert.equal((await reader.next()).type, Frame.GO);
  });

  test('an oversized frame, a stream that ends mid-frame and an ERROR frame are errors with their reason', async () => {
    const huge = new PassThrough();
    const header = Buffer.alloc(8);
    header.writeUInt8(Frame.PAGES, 0);
    header.writeUInt32LE(MAX_PAYLOAD + 1, 4);
    huge.write(header);
    await assert.rejects(new FrameReader(huge, 'the source').next(), /the source sent a frame of \d+ bytes/);
    const cut = new PassThrough();
    const reader = new FrameReader(cut, 'the destination');
    cut.write(frame(Frame.STATE, Buffer.alloc(100)).subarray(0, 50));
    cut.end();
    await assert.rejects(reader.next(), /the destination closed the connection/);
    const refusing = new PassThrough();
    refusing.write(jsonFrame(Frame.ERROR, { message: 'wrong migration token' }));
    await assert.rejects(
      new FrameReader(refusing, 'the destination').expect(Frame.OK, 'OK'),
      /the destination: wrong migration token/,
    );
    assert.equal(errorText(Buffer.from('not json')), 'an unreadable error');
  });

  test('the token is proven with an HMAC of a nonce, checked in constant time', () => {
    const nonce = Buffer.alloc(32, 1);
    const good = proof('the token', nonce).toString('hex');
    assert.equal(proofMatches('the token', nonce, good), true);
    assert.equal(proofMatches('another token', nonce, good), false);
    assert.equal(proofMatches('the token', Buffer.alloc(32, 2), good), false, 'a proof is for one nonce');
    assert.equal(proofMatches('the token', nonce, 'the token'), false);
    assert.equal(proofMatches('the token', nonce, 42), false);
  });

  test('addresses: tcp:HOST:PORT, [v6] hosts, unix:PATH; anything else is refused', () => {
    assert.deepEqual(parseAddress('tcp:10.0.0.2:6000', 'x'), { kind: 'tcp', host: '10.0.0.2', port: 6000 });
    assert.deepEqual(parseAddress('tcp:[::1]:0', 'x'), { kind: 'tcp', host: '::1', port: 0 });
    assert.deepEqual(parseAddress('unix:/run/m.sock', 'x'), { kind: 'unix', path: '/run/m.sock' });
    for (const bad of ['10.0.0.2:6000', 'tcp:host', 'tcp:h:70000', 'unix:', 'udp:h:1'])
      assert.throws(() => parseAddress(bad, 'destination'), /destination must be tcp:HOST:PORT or unix:PATH/);
    assert.deepEqual(parsePeer('192.0.2.7:7077'), { host: '192.0.2.7', port: 7077 });
    assert.throws(() => parsePeer('192.0.2.7'), /must be ADDR:PORT/);
    assert.throws(() => readToken('short\n', 'F'), /too short/);
  });

  test("the daemons' requests: signed with the token, each nonce once, within two minutes, body included", () => {
    const verifier = new Verifier('a-token-of-sixteen+');
    const header = sign('a-token-of-sixteen+', 'POST', '/migrations', '{"a":1}');
    assert.equal(verifier.check(header, 'POST', '/migrations', '{"a":2}'), false, 'another body');
    assert.equal(verifier.check(header, 'GET', '/migrations', '{"a":1}'), false, 'another method');
    assert.equal(verifier.check(header, 'POST', '/migrations', '{"a":1}'), true);
    assert.equal(verifier.check(header, 'POST', '/migrations', '{"a":1}'), false, 'a replay');
    assert.equal(verifier.check(sign('another-token-here', 'GET', '/m', ''), 'GET', '/m', ''), false);
    const [, nonce, mac] = sign('a-token-of-sixteen+', 'GET', '/m', '').split('.');
    assert.equal(verifier.check(`${Date.now() - 10 * 60_000}.${nonce}.${mac}`, 'GET', '/m', ''), false, 'too old');
    assert.equal(verifier.check(undefined, 'GET', '/m', ''), false);
    assert.equal(verifier.check('garbage', 'GET', '/m', ''), false);
  });
});

describe('refusals before anything moves', () => {
  test('a receiving kiln-vmm refuses another protocol version and a wrong token, and listens on', async () => {
    const dir = tempDir();
    const api = join(dir, 'vmm.sock');
    const child = spawn(process.execPath, [VMM, '--api-sock', api, '--id', 'rx'], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 200 && (await unixHttp(api, 'GET', '/').catch(() => null)) === null; i++) await sleep(25);
      const sock = join(dir, 'in.sock');
      const r = await unixHttp(api, 'PUT', '/migration/receive', { listen: `unix:${sock}`, token: 'the-right-token' });
      assert.equal(r.status, 204, JSON.stringify(r.body));
      const attempt = async (version: number, token: string) => {
        const s = createConnection(sock);
        const reader = new FrameReader(s, 'the destination');
        const hello = JSON.parse((await reader.expect(Frame.HELLO, 'HELLO')).toString()) as {
          versions: number[];
          nonce: string;
        };
        assert.deepEqual(hello.versions, [1]);
        s.write(
          jsonFrame(Frame.AUTH, { version, proof: proof(token, Buffer.from(hello.nonce, 'hex')).toString('hex') }),
        );
        const answer = await reader.expect(Frame.OK, 'OK').then(
          () => 'accepted',
          (err: Error) => err.message,
        );
        s.destroy();
        return answer;
      };
      assert.match(await attempt(99, 'the-right-token'), /protocol version 99 is not spoken here \(1\)/);
      assert.match(await attempt(1, 'a-wrong-token'), /wrong migration token/);
      const p = (await unixHttp(api, 'GET', '/migration')).body as { phase: string };
      assert.equal(p.phase, 'listening', 'the destination waits on for its real source');
      assert.equal(((await unixHttp(api, 'GET', '/')).body as { state: string }).state, 'Not started');
      const send = await unixHttp(api, 'PUT', '/migration/send', { destination: `unix:${sock}`, token: 'x' });
      assert.equal(send.status, 400, 'nothing to send before a VM runs');
    } finally {
      child.kill('SIGKILL');
    }
  });

  test('a receiving kiln-vmm handed a guest memory file (memory_fd) takes only the source whose memory it is', async () => {
    const dir = tempDir();
    const api = join(dir, 'vmm.sock');
    const bytes = 4 * 1024 * 1024;
    const handed = createGuestMemoryFile(bytes, false);
    const identity = memoryFileIdentity(handed);
    const other = createGuestMemoryFile(bytes, false);
    // The daemon's way: the file is the new VMM's fd 3.
    const child = spawn(process.execPath, [VMM, '--api-sock', api, '--id', 'rx'], {
      stdio: ['ignore', 'ignore', 'ignore', handed],
    });
    closeSync(handed);
    try {
      for (let i = 0; i < 200 && (await unixHttp(api, 'GET', '/').catch(() => null)) === null; i++) await sleep(25);
      const sock = join(dir, 'in.sock');
      const receive = (memoryFd: number) =>
        unixHttp(api, 'PUT', '/migration/receive', { listen: `unix:${sock}`, token: 't', memory_fd: memoryFd });
      const stdio = await receive(2);
      assert.equal(stdio.status, 400);
      assert.match(JSON.stringify(stdio.body), /`memory_fd` must be an inherited fd \(3 or more\), not 2/);
      const closed = await receive(999);
      assert.equal(closed.status, 400);
      assert.match(JSON.stringify(closed.body), /`memory_fd` 999 is not an open file/);
      const r = await receive(3);
      assert.equal(r.status, 204, JSON.stringify(r.body));
      /** A source that proves the token and sends its configuration; resolves with the destination's answer. */
      const source = async (sharedMemory?: object) => {
        const s = createConnection(sock);
        const reader = new FrameReader(s, 'the destination');
        const hello = JSON.parse((await reader.expect(Frame.HELLO, 'HELLO')).toString()) as { nonce: string };
        s.write(
          jsonFrame(Frame.AUTH, { version: 1, proof: proof('t', Buffer.from(hello.nonce, 'hex')).toString('hex') }),
        );
        await reader.expect(Frame.OK, 'OK');
        const blueprint = {
          kiln: 'test',
          config: { cpus: 1, memoryMiB: 4 },
          boot: {},
          compat: null,
          memoryBytes: bytes,
          ...(sharedMemory ? { sharedMemory } : {}),
        };
        s.write(frame(Frame.CONFIG, encodeStateFile(blueprint)));
        const answer = await reader.expect(Frame.OK, 'OK').then(
          () => 'accepted',
          (err: Error) => err.message,
        );
        s.destroy();
        return answer;
      };
      assert.match(await source(), /handed a guest memory file \(memory_fd\) and the source copies its memory/);
      assert.match(
        await source(memoryFileIdentity(other)),
        /memory_fd 3 is another file than the source's guest memory/,
      );
      assert.match(
        await source({ ...identity, bytes: 2 * bytes }),
        /memory_fd 3 holds 4194304 bytes of memory; the VM has 8388608/,
      );
      const p = (await unixHttp(api, 'GET', '/migration')).body as { phase: string };
      assert.equal(p.phase, 'listening', 'the destination waits on for the source whose memory it holds');
    } finally {
      child.kill('SIGKILL');
      closeSync(other);
    }
  });

  test('the destination daemon refuses a VM whose disks it lacks or whose name it has, and keeps nothing', async () => {
    const dir = tempDir();
    const store = new Store(dir);
    const manager = new Manager(store);
    const definition = parseDefinition({ name: 'incoming' });
    const missing = join(dir, 'not-here.img');
    await assert.rejects(
      manager.prepareIncoming({ definition, config: { cpus: 1, memoryMiB: 64, disks: [{ id: 'd', path: missing }] } }),
      new RegExp(
        `disk '${missing}' of 'incoming' is not on this host: a migration needs the VM's disks on shared storage`,
      ),
    );
    assert.equal(store.exists('incoming'), false);
    store.create(parseDefinition({ name: 'taken' }));
    const disk = join(dir, 'here.img');
    writeFileSync(disk, Buffer.alloc(4096));
    await assert.rejects(
      manager.prepareIncoming({
        definition: parseDefinition({ name: 'taken' }),
        config: { cpus: 1, memoryMiB: 64, disks: [{ id: 'd', path: disk }] },
      }),
      /a VM named 'taken' already exists on this host/,
    );
    await assert.rejects(manager.prepareIncoming({ definition: { name: 'Bad Name!' }, config: {} }), /name/);
  });
});
