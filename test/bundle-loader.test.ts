// kiln-vmm's bundles run from V8's code cache the build made for them, and a cache that
// does not belong to its bundle is never used.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL, fileURLToPath } from 'node:url';
import { Script } from 'node:vm';
import { spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { BUILD_LINE, bundleBuild, cacheFile, runBundle, wrapBundle } from '../src/bundle-loader.js';

const BUNDLES = ['vmm-cli', 'vcpu/worker', 'virtio/io-worker', 'jail/jailer-cli', 'jail/enter', 'cli'].map((b) =>
  fileURLToPath(new URL(`../src/${b}.bundle.js`, import.meta.url)),
);

describe('the built bundles', () => {
  for (const bundle of BUNDLES)
    test(`${bundle.replace(/.*dist\//, '')}: its cache names its build and V8 takes it`, () => {
      const code = readFileSync(bundle, 'utf8');
      const build = bundleBuild(code);
      assert.match(build ?? '', /^[0-9a-f]{64}$/, 'the bundle ends with its build name');
      const cache = readFileSync(`${bundle}.cache`);
      assert.equal(cache.toString('latin1', 0, 64), build, 'the cache was made for this build');
      const script = new Script(wrapBundle(code), { filename: bundle, cachedData: cache.subarray(64) });
      assert.equal(script.cachedDataRejected, false, 'V8 accepts the cache');
      // A cache made from a run holds more than the eager compile of the source.
      const eager = new Script(wrapBundle(code), { filename: bundle }).createCachedData();
      assert.ok(cache.length - 64 > eager.length, `${cache.length - 64} > ${eager.length}`);
    });

  test('the entry points are stubs that run their bundle', () => {
    for (const bundle of BUNDLES) {
      const stub = readFileSync(bundle.replace(/\.bundle\.js$/, '.js'), 'utf8');
      assert.match(stub, /^#!\/usr\/bin\/env node\n/);
      assert.ok(stub.includes(`runBundle(new URL('./${bundle.replace(/.*\//, '')}'`), stub);
      const cjs = readFileSync(bundle.replace(/\.bundle\.js$/, '.cjs'), 'utf8');
      assert.match(cjs, /^#!\/usr\/bin\/env node\n/);
      assert.ok(cjs.includes(`\${__dirname}/${bundle.replace(/.*\//, '')}\``), cjs);
    }
  });

  // What kiln-vmm's bin, the manager and the warm workers run (scripts/bundle.mjs).
  test('the CommonJS stubs run kiln-vmm and its workers from their bundles', async () => {
    const vmm = fileURLToPath(new URL('../src/vmm-cli.cjs', import.meta.url));
    const r = spawnSync(process.execPath, [vmm, '--version'], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^Firecracker v[\d.]+ \(Kiln /);
    const bad = spawnSync(process.execPath, [vmm, '--no-such-flag'], { encoding: 'utf8' });
    assert.notEqual(bad.status, 0, 'a refused start still exits with an error status');
    for (const entry of ['vcpu/worker', 'virtio/io-worker']) {
      const cell = new Int32Array(new SharedArrayBuffer(4));
      const w = new Worker(new URL(`../src/${entry}.cjs`, import.meta.url), {
        workerData: { warmLoaded: cell.buffer },
      });
      let failed: Error | null = null;
      w.once('error', (err) => (failed = err));
      while (Atomics.load(cell, 0) === 0 && failed === null) await sleep(5);
      await w.terminate();
      if (failed) throw failed;
    }
  });
});

describe('runBundle', () => {
  let dir: string;
  let file: string;
  let code: string;
  const g = globalThis as { kilnBundleTest?: unknown };

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'kiln-bundle-'));
    file = join(dir, 'b.bundle.js');
    // What a bundle uses: require, its URL, a top-level await, a function called late.
    // Unique per test: V8 keeps what it compiled per process, and would not read a cache
    // for a source it has compiled before.
    const body =
      `// ${randomUUID()}\n` +
      "const { basename } = require('node:path');\n" +
      'function late(x) { return x * 2; }\n' +
      'await Promise.resolve();\n' +
      'globalThis.kilnBundleTest = { name: basename(new URL(__kilnUrl).pathname), late: late(21) };\n';
    code = `#!/usr/bin/env node\n${body}${BUILD_LINE}${'ab'.repeat(32)}\n`;
    writeFileSync(file, code);
    delete g.kilnBundleTest;
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const makeCache = (build: string, data?: Buffer) =>
    writeFileSync(
      `${file}.cache`,
      // Compiled under another name, so the load below does not find it among what V8 compiled already.
      cacheFile(build, data ?? new Script(wrapBundle(code), { filename: `${file}.other` }).createCachedData()),
    );

  async function run(): Promise<string> {
    const r = runBundle(pathToFileURL(file));
    await r.done;
    assert.deepEqual(g.kilnBundleTest, { name: 'b.bundle.js', late: 42 }, 'the bundle ran to its end');
    return r.use;
  }

  test('uses a cache made for the bundle', async () => {
    makeCache('ab'.repeat(32));
    assert.equal(await run(), 'used');
  });

  test('runs without a cache', async () => {
    assert.equal(await run(), 'none');
  });

  test('KILN_NO_CODE_CACHE=1 leaves a good cache unused', async () => {
    makeCache('ab'.repeat(32));
    process.env.KILN_NO_CODE_CACHE = '1';
    try {
      assert.equal(await run(), 'none');
    } finally {
      delete process.env.KILN_NO_CODE_CACHE;
    }
  });

  test('leaves a cache made for another build unused', async () => {
    makeCache('cd'.repeat(32));
    assert.equal(await run(), 'stale');
  });

  test('a bundle that names no build never uses a cache', async () => {
    code = code.slice(0, code.indexOf(BUILD_LINE)) + '\n'.repeat(BUILD_LINE.length + 65);
    writeFileSync(file, code);
    makeCache('ab'.repeat(32));
    assert.equal(await run(), 'stale');
  });

  test('a cache V8 refuses (garbage) is dropped and the bundle compiled', async () => {
    makeCache('ab'.repeat(32), Buffer.alloc(4096, 0x5a));
    assert.equal(await run(), 'rejected');
  });

  test('a truncated cache is dropped and the bundle compiled', async () => {
    const good = new Script(wrapBundle(code), { filename: `${file}.other` }).createCachedData();
    makeCache('ab'.repeat(32), good.subarray(0, good.length >> 1));
    assert.equal(await run(), 'rejected');
  });

  test("a bundle's error reaches its caller", async () => {
    writeFileSync(file, `throw new Error('bundle failed');${BUILD_LINE}${'ab'.repeat(32)}\n`);
    await assert.rejects(runBundle(pathToFileURL(file)).done, /bundle failed/);
  });
});
