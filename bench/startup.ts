// `npm run bench -- startup`: kiln-vmm's own start-up, without a guest (so it runs on a
// host without KVM too), as shipped (the CommonJS stubs, with the code cache), without its
// code cache (KILN_NO_CODE_CACHE=1) and through the ES module stubs (`vmm-cli.js`,
// `worker.js`: Node's ES module loader set up first), in the same run, against Node's
// floor (`node -e 0`):
//
// - version: spawning `kiln-vmm --version` (every module evaluated) until it exits;
// - cli: spawning `kiln --version` (what every `kiln` verb pays before it does anything)
//   until it exits;
// - api: spawning `kiln-vmm --api-sock` until its API socket exists;
// - vcpu_worker, io_worker: starting a warm vCPU or I/O thread (a Worker of its bundle)
//   until it has loaded its modules and waits for its VM;
// - idle_rss: resident memory of a kiln-vmm waiting for its API (its warm threads
//   started), after 2 s;
// - jailed_api (as root): spawning kiln-jailer until the jailed kiln-vmm's API socket
//   exists: three Node starts (the jailer, its second stage in the jail's mount
//   namespace, kiln-vmm), as a jailed start without the daemon's pool pays them.
//
// Runs alternate between the variants, so a slow moment of the machine costs each alike.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { vmmEnvironment } from '../src/host.js';
import { median, rssMiB, type BenchContext } from './util.js';

const RUNS = 21;
const VARIANTS = {
  cache: { env: {}, ext: 'cjs' },
  nocache: { env: { KILN_NO_CODE_CACHE: '1' }, ext: 'cjs' },
  esm: { env: {}, ext: 'js' },
} as const;
type Variant = keyof typeof VARIANTS;
const vmmOf = (v: Variant) => fileURLToPath(new URL(`../src/vmm-cli.${VARIANTS[v].ext}`, import.meta.url));
const cliOf = (v: Variant) => fileURLToPath(new URL(`../src/cli.${VARIANTS[v].ext}`, import.meta.url));
const jailerOf = (v: Variant) => fileURLToPath(new URL(`../src/jail/jailer-cli.${VARIANTS[v].ext}`, import.meta.url));
const JAIL_UID = 4000;
const WORKERS = { vcpu: 'vcpu/worker', io: 'virtio/io-worker' } as const;
const workerOf = (kind: keyof typeof WORKERS, v: Variant) =>
  new URL(`../src/${WORKERS[kind]}.${VARIANTS[v].ext}`, import.meta.url);

const envOf = (v: Variant): NodeJS.ProcessEnv => ({ ...vmmEnvironment(), ...VARIANTS[v].env });

function timeExit(args: string[], env: NodeJS.ProcessEnv): number {
  const start = performance.now();
  const r = spawnSync(process.execPath, args, { env, stdio: 'ignore' });
  if (r.status !== 0) throw new Error(`${args.join(' ')} exited with ${r.status}`);
  return performance.now() - start;
}

/**
 * Spawns `node ARGV`; resolves with the time until `sock` exists, and the process's RSS
 * after `holdMs` if asked; then ends it (the jailer executes its second stage and that
 * kiln-vmm: one pid throughout).
 */
async function timeToSocket(
  argv: string[],
  sock: string,
  env: NodeJS.ProcessEnv,
  holdMs = 0,
): Promise<{ ms: number; rssMiB: number }> {
  rmSync(sock, { force: true });
  const start = performance.now();
  const child = spawn(process.execPath, argv, { env, stdio: 'ignore' });
  let exited = false;
  const gone = new Promise<void>((resolve) => child.once('exit', () => ((exited = true), resolve())));
  while (!existsSync(sock) && !exited) await sleep(1);
  const ms = performance.now() - start;
  const served = existsSync(sock);
  let rss = 0;
  if (served && holdMs > 0 && !exited) {
    await sleep(holdMs);
    const now = rssMiB(child.pid!);
    if (now === null) throw new Error('kiln-vmm ended while it waited for its API');
    rss = now;
  }
  if (!exited) child.kill('SIGTERM');
  await gone;
  rmSync(sock, { force: true });
  if (!served) throw new Error('kiln-vmm exited before serving its API');
  return { ms, rssMiB: rss };
}

/** Spawns kiln-jailer with kiln-vmm; resolves with the time until the jailed VMM's API socket exists. */
async function timeJailed(v: Variant, base: string, id: string): Promise<number> {
  const jail = join(base, basename(vmmOf(v)), id);
  const args = ['--id', id, '--exec-file', vmmOf(v), '--uid', String(JAIL_UID), '--gid', String(JAIL_UID)];
  try {
    const argv = [jailerOf(v), ...args, '--chroot-base-dir', base];
    return (await timeToSocket(argv, join(jail, 'root', 'run', 'firecracker.socket'), envOf(v))).ms;
  } finally {
    rmSync(jail, { recursive: true, force: true });
  }
}

/** Starts a warm worker of `kind`; resolves with the time until it marks its modules loaded. */
async function timeWorker(url: URL, env: NodeJS.ProcessEnv): Promise<number> {
  const cell = new Int32Array(new SharedArrayBuffer(4));
  const start = performance.now();
  const w = new Worker(url, {
    workerData: { warmLoaded: cell.buffer },
    env,
    stdout: true,
    stderr: true,
    resourceLimits: { maxYoungGenerationSizeMb: 2 },
  });
  let failed: Error | null = null;
  w.once('error', (err) => (failed = err));
  while (Atomics.load(cell, 0) === 0 && failed === null) await sleep(0);
  const ms = performance.now() - start;
  await w.terminate();
  if (failed) throw failed;
  return ms;
}

export async function benchStartup(ctx: BenchContext): Promise<void> {
  const floor: number[] = [];
  const each = (): Record<Variant, number[]> => ({ cache: [], nocache: [], esm: [] });
  const t = { version: each(), cli: each(), api: each(), vcpu: each(), io: each(), rss: each(), jailed: each() };
  const root = process.getuid?.() === 0;
  if (!root) ctx.log('not root: no jailed starts measured');
  const sock = join(ctx.dir, 'api.sock');
  for (let i = 0; i < RUNS; i++) {
    floor.push(timeExit(['-e', '0'], vmmEnvironment()));
    for (const v of Object.keys(VARIANTS) as Variant[]) {
      t.version[v].push(timeExit([vmmOf(v), '--version'], envOf(v)));
      t.cli[v].push(timeExit([cliOf(v), '--version'], envOf(v)));
      const api = await timeToSocket([vmmOf(v), '--api-sock', sock], sock, envOf(v), i < 3 ? 2000 : 0);
      t.api[v].push(api.ms);
      if (api.rssMiB > 0) t.rss[v].push(api.rssMiB);
      t.vcpu[v].push(await timeWorker(workerOf('vcpu', v), envOf(v)));
      t.io[v].push(await timeWorker(workerOf('io', v), envOf(v)));
      if (root) t.jailed[v].push(await timeJailed(v, ctx.dir, `startup-${v}-${i}`));
    }
  }
  const f = (n: number) => (Number.isFinite(n) ? n.toFixed(1) : 'na');
  ctx.log(`node -e 0: ${f(median(floor))} ms (median of ${RUNS})`);
  for (const [name, by] of Object.entries(t))
    if (by.cache.length > 0)
      ctx.log(
        `${name.padEnd(8)} as shipped ${f(median(by.cache)).padStart(6)}, without the code cache ${f(median(by.nocache)).padStart(6)}, through the ES module stubs ${f(median(by.esm)).padStart(6)}${name === 'rss' ? ' MiB' : ' ms'}`,
      );
  ctx.result(
    `startup version_ms=${f(median(t.version.cache))} version_nocache_ms=${f(median(t.version.nocache))} ` +
      `api_ms=${f(median(t.api.cache))} api_nocache_ms=${f(median(t.api.nocache))} ` +
      `vcpu_worker_ms=${f(median(t.vcpu.cache))} vcpu_worker_nocache_ms=${f(median(t.vcpu.nocache))} ` +
      `io_worker_ms=${f(median(t.io.cache))} io_worker_nocache_ms=${f(median(t.io.nocache))} ` +
      `idle_rss_mib=${f(median(t.rss.cache))} idle_rss_nocache_mib=${f(median(t.rss.nocache))} ` +
      `version_esm_ms=${f(median(t.version.esm))} api_esm_ms=${f(median(t.api.esm))} ` +
      `vcpu_worker_esm_ms=${f(median(t.vcpu.esm))} io_worker_esm_ms=${f(median(t.io.esm))} ` +
      `jailed_api_ms=${f(median(t.jailed.cache))} jailed_api_esm_ms=${f(median(t.jailed.esm))} ` +
      `cli_ms=${f(median(t.cli.cache))} cli_nocache_ms=${f(median(t.cli.nocache))} cli_esm_ms=${f(median(t.cli.esm))} node_ms=${f(median(floor))}`,
  );
}
