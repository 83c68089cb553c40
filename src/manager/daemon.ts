// `kiln daemon`: the manager behind a small JSON API on <state>/kiln.sock, and the
// client side the `kiln` verbs use (starting the daemon on demand). The daemon owns no
// VM state of its own: definitions are files, running VMs are kiln-vmm processes, so a
// daemon that crashes and restarts finds every VM as it really is.
import { spawn } from 'node:child_process';
import { openSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import FindMyWay from 'find-my-way';
import { KilnError } from '../errors.js';
import { Manager, unixHttp } from './manager.js';
import { checkName, Store, type VmSpec } from './store.js';

const CLI = fileURLToPath(new URL('../cli.js', import.meta.url));

function reply(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function readJson(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let text = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => {
      text += c;
      if (text.length > 1 << 20) req.destroy(new Error('request body too large'));
    });
    req.on('end', () => {
      try {
        resolve(text ? (JSON.parse(text) as unknown) : {});
      } catch (err) {
        reject(new KilnError(`the request body is not JSON: ${(err as Error).message}`));
      }
    });
    req.on('error', reject);
  });
}

/** Fills in defaults and checks a VM definition from `kiln create` or a file. */
export function normalizeSpec(raw: unknown): VmSpec {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new KilnError('a VM definition must be an object');
  const r = raw as Record<string, unknown>;
  const known = ['name', 'kernel', 'initrd', 'cmdline', 'cpus', 'memoryMiB', 'disks', 'nets', 'rng', 'vsock', 'balloonMiB', 'cpuWeight', 'cpuQuotaPercent', 'pinCpus'];
  const unknown = Object.keys(r).filter((k) => !known.includes(k));
  if (unknown.length > 0) throw new KilnError(`unknown field(s) in the VM definition: ${unknown.join(', ')} (known: ${known.join(', ')})`);
  const int = (key: string, fallback: number, min: number, max: number): number => {
    const v = r[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new KilnError(`${key} must be a whole number from ${min} to ${max} (got ${JSON.stringify(v)})`);
    return v;
  };
  const optString = (key: string): string | undefined => {
    const v = r[key];
    if (v !== undefined && typeof v !== 'string') throw new KilnError(`${key} must be a string`);
    return v as string | undefined;
  };
  const list = (key: string): unknown[] => {
    const v = r[key] ?? [];
    if (!Array.isArray(v)) throw new KilnError(`${key} must be a list`);
    return v;
  };
  const cpus = int('cpus', 1, 1, 32);
  if (cpus > 1 && cpus % 2 !== 0) throw new KilnError(`cpus must be 1 or an even number (got ${cpus})`);
  const kernel = optString('kernel');
  const initrd = optString('initrd');
  const cmdline = optString('cmdline');
  return {
    name: checkName(String(r.name ?? '')),
    ...(kernel !== undefined ? { kernel } : {}),
    ...(initrd !== undefined ? { initrd } : {}),
    ...(cmdline !== undefined ? { cmdline } : {}),
    cpus,
    memoryMiB: int('memoryMiB', 128, 16, 1 << 20),
    disks: list('disks').map((d) => {
      const x = d as { path?: unknown; readOnly?: unknown; root?: unknown };
      if (typeof x.path !== 'string') throw new KilnError('each disk needs a path');
      return { path: x.path, readOnly: x.readOnly === true, root: x.root === true };
    }),
    nets: list('nets').map((n) => {
      const x = n as { tap?: unknown; mac?: unknown };
      if (typeof x.tap !== 'string') throw new KilnError('each network interface needs a tap name');
      return { tap: x.tap, ...(typeof x.mac === 'string' ? { mac: x.mac } : {}) };
    }),
    rng: r.rng === true,
    ...(r.vsock !== undefined ? { vsock: r.vsock as VmSpec['vsock'] & object } : {}),
    ...(r.balloonMiB !== undefined ? { balloonMiB: int('balloonMiB', 0, 0, 1 << 20) } : {}),
    cpuWeight: int('cpuWeight', 100, 1, 10_000),
    cpuQuotaPercent: int('cpuQuotaPercent', 0, 0, 100 * 1024),
    pinCpus: list('pinCpus').map((c) => {
      if (typeof c !== 'number' || !Number.isInteger(c) || c < 0) throw new KilnError('pinCpus must list host CPU numbers');
      return c;
    }),
  };
}

/** Runs the daemon until SIGTERM. */
export async function runDaemon(store: Store, log: (line: string) => void): Promise<void> {
  const manager = new Manager(store, log);
  const router = FindMyWay({ defaultRoute: (_req: IncomingMessage, res: ServerResponse) => reply(res, 404, { error: 'no such endpoint' }) });
  const route = (method: 'GET' | 'POST' | 'DELETE', path: string, handler: (name: string, body: unknown, query: URLSearchParams) => Promise<unknown>) =>
    router.on(method, path, (req, res, params) => {
      void (async () => {
        try {
          const body = method === 'POST' ? await readJson(req) : undefined;
          reply(res, 200, await handler(params.name ?? '', body, new URL(req.url ?? '/', 'http://kiln').searchParams));
        } catch (err) {
          reply(res, err instanceof KilnError ? 400 : 500, { error: err instanceof Error ? err.message : String(err) });
        }
      })();
    });
  route('GET', '/vms', () => manager.list());
  route('POST', '/vms', async (_n, body) => {
    const spec = normalizeSpec(body);
    store.create(spec);
    return manager.status(spec);
  });
  route('GET', '/vms/:name', async (name) => ({ ...(await manager.status(store.get(name))), definition: store.get(name) }));
  route('POST', '/vms/:name/start', (name) => manager.start(name));
  route('POST', '/vms/:name/stop', (name, body) => manager.stop(name, (body as { force?: boolean }).force === true));
  route('POST', '/vms/:name/restart', async (name) => {
    await manager.stop(name, false);
    return manager.start(name);
  });
  route('POST', '/vms/:name/pause', (name) => manager.setPaused(name, true));
  route('POST', '/vms/:name/resume', (name) => manager.setPaused(name, false));
  route('DELETE', '/vms/:name', async (name) => {
    await manager.remove(name);
    return { removed: name };
  });
  route('GET', '/vms/:name/logs', async (name, _b, q) => ({ log: manager.logs(name, Number(q.get('bytes') ?? 64 * 1024)) }));

  rmSync(store.socketPath, { force: true });
  const server = createServer((req, res) => router.lookup(req, res));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(store.socketPath, () => resolve());
  });
  log(`kiln daemon: listening on ${store.socketPath} (state in ${store.dir})`);
  await new Promise<void>((resolve) => {
    process.once('SIGTERM', resolve);
    process.once('SIGINT', resolve);
  });
  await new Promise((resolve) => server.close(resolve));
  rmSync(store.socketPath, { force: true });
}

/** One call to the daemon; starts it first if nothing answers on its socket. */
export async function daemonCall(store: Store, method: string, path: string, body?: unknown): Promise<unknown> {
  // A stop waits for the guest (up to 30 s, then SIGTERM): allow the daemon minutes.
  const attempt = () => unixHttp(store.socketPath, method, path, body, 10 * 60_000);
  let r: { status: number; body: unknown };
  try {
    r = await attempt();
  } catch {
    // Nobody answers (no daemon, or a stale socket from one that crashed): start the
    // daemon, detached so it outlives this command, and retry until it listens.
    rmSync(store.socketPath, { force: true });
    const log = openSync(join(store.dir, 'daemon.log'), 'a');
    spawn(process.execPath, [CLI, 'daemon'], { detached: true, stdio: ['ignore', log, log], env: { ...process.env, KILN_STATE_DIR: store.dir } }).unref();
    for (let i = 0; ; i++) {
      try {
        r = await attempt();
        break;
      } catch (err) {
        if (i >= 100) throw new KilnError(`the kiln daemon did not start (see ${join(store.dir, 'daemon.log')}): ${(err as Error).message}`);
        await new Promise((res) => setTimeout(res, 50));
      }
    }
  }
  if (r.status !== 200) throw new KilnError((r.body as { error?: string } | undefined)?.error ?? `the daemon answered ${r.status}`);
  return r.body;
}
