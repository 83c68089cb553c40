// `kiln daemon`: the manager behind a small JSON API on <state>/kiln.sock, and the
// client side the `kiln` verbs use (starting the daemon on demand). The daemon owns no
// VM state of its own: definitions are files, running VMs are kiln-vmm processes, so a
// daemon that crashes and restarts finds every VM as it really is.
import { spawn } from 'node:child_process';
import { chmodSync, chownSync, openSync, readFileSync, rmSync } from 'node:fs';
import {
  createServer,
  type IncomingMessage,
  type RequestListener,
  type Server as HttpServer,
  type ServerResponse,
} from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import FindMyWay from 'find-my-way';
import { KilnError } from '../errors.js';
import { Manager, PROGRESS_HEADER, PROGRESS_TYPE, ROTATE_EVERY_MS, unixHttp } from './manager.js';
import { ConfigError } from '../config/vm-config.js';
import { lockStateDir } from './lock.js';
import { readJson } from './json-body.js';
import { isLoopback } from '../host.js';
import { AUTH_HEADER, Verifier, parsePeer, splice, type Peer } from './peer.js';
import type { Dashboard } from '../dashboard/server.js';
import { waitFor } from './wait.js';
import type { DashboardReply, ErrorReply, LogsReply, PoolReply, RemovedReply } from './protocol.js';
import { PRIVATE_FILE, sweepTemporaryFiles, type Store } from './store.js';
import { VmmPool } from './pool.js';
import { allocateJailUid } from './jail.js';

/** The `kiln` CLI the daemon starts itself from: its CommonJS stub (scripts/bundle.mjs). */
const CLI = fileURLToPath(new URL('../cli.cjs', import.meta.url));
/** Where `kiln dashboard` serves the web UI unless told otherwise. */
export const DASHBOARD_DEFAULT: Peer = { host: '127.0.0.1', port: 7070 };

function reply(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

/** A group's id from /etc/group. */
export function groupId(name: string, groupFile = '/etc/group'): number {
  for (const line of readFileSync(groupFile, 'utf8').split('\n')) {
    const [n, , gid] = line.split(':');
    if (n === name && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new KilnError(`KILN_GROUP: no group named '${name}' in ${groupFile}`);
}

/** The groups of process `pid` (primary and supplementary), from /proc. */
function processGroups(pid: number): number[] {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const gid = /^Gid:\s*(\d+)/m.exec(status)?.[1];
    const groups = /^Groups:\s*(.*)$/m.exec(status)?.[1] ?? '';
    return [...(gid ? [Number(gid)] : []), ...groups.split(/\s+/).filter(Boolean).map(Number)];
  } catch {
    return [];
  }
}

/** Root, the daemon's own user, or a member of the kiln group. */
export function peerAllowed(peer: { pid: number; uid: number; gid: number }, group: number | null): boolean {
  if (peer.uid === 0 || peer.uid === process.geteuid?.()) return true;
  return group !== null && (peer.gid === group || processGroups(peer.pid).includes(group));
}

/** Runs the daemon until SIGTERM. */
/** Where the daemon takes migrations from other hosts (kiln daemon --listen ADDR:PORT --token-file FILE). */
export interface PeerListen {
  readonly address: Peer;
  readonly token: string;
  /** PEM certificate (chain) and private key: the channel is HTTPS (kiln daemon --tls-cert/--tls-key). */
  readonly tls?: { readonly cert: string; readonly key: string };
}

/**
 * The peer channel: signed requests from other hosts' daemons (peer.ts) to prepare,
 * follow and abort an incoming migration, and the migration stream itself (an HTTP
 * upgrade, piped to the receiving VMM's Unix socket).
 */
async function listenForPeers(manager: Manager, listen: PeerListen, log: (line: string) => void): Promise<HttpServer> {
  const verifier = new Verifier(listen.token);
  const path = (url: string | undefined) => new URL(url ?? '/', 'http://kiln').pathname;
  const handle: RequestListener = (req, res) => {
    let body = '';
    let size = 0;
    req.setEncoding('utf8').on('data', (c: string) => {
      size += c.length;
      if (size > 1024 * 1024) req.destroy();
      else body += c;
    });
    req.on('end', () => {
      void (async () => {
        const p = path(req.url);
        if (!verifier.check(req.headers[AUTH_HEADER] as string | undefined, req.method ?? '', req.url ?? '', body)) {
          log(
            `kiln daemon: refused an unsigned or wrongly signed request from ${req.socket.remoteAddress} (${req.method} ${p})`,
          );
          return reply(res, 401, { error: "not allowed: the request is not signed with this daemon's token" });
        }
        try {
          let m: RegExpExecArray | null;
          if (req.method === 'POST' && p === '/migrations') {
            let input: unknown;
            try {
              input = JSON.parse(body);
            } catch {
              throw new KilnError('the request body is not valid JSON');
            }
            return reply(res, 200, await manager.prepareIncoming(input));
          }
          if (req.method === 'GET' && (m = /^\/migrations\/([^/]+)$/.exec(p)))
            return reply(res, 200, manager.incomingStatus(decodeURIComponent(m[1]!)));
          if (req.method === 'POST' && (m = /^\/migrations\/([^/]+)\/abort$/.exec(p)))
            return reply(res, 200, manager.abortIncoming(decodeURIComponent(m[1]!)));
          reply(res, 404, { error: 'no such endpoint' });
        } catch (err) {
          reply(res, err instanceof KilnError ? 400 : 500, { error: (err as Error).message });
        }
      })();
    });
  };
  const server: HttpServer = listen.tls ? createTlsServer({ ...listen.tls }, handle) : createServer(handle);
  // A client that fails the TLS handshake (or speaks plain HTTP to it) is logged, nothing
  // more, and at most one line every 10 s: anyone who reaches the port can fail handshakes
  // as fast as they like, and must not fill the daemon's log.
  let lastHandshakeLine = 0;
  let unlogged = 0;
  server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: Socket) => {
    const now = Date.now();
    if (now - lastHandshakeLine < 10_000) {
      unlogged++;
      return;
    }
    lastHandshakeLine = now;
    const more = unlogged > 0 ? ` (and ${unlogged} more since the last such line)` : '';
    unlogged = 0;
    log(`kiln daemon: a TLS handshake from ${socket.remoteAddress} failed: ${err.code ?? err.message}${more}`);
  });
  server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
    const p = path(req.url);
    const m = /^\/migrations\/([^/]+)\/stream$/.exec(p);
    const refuse = (status: string, why: string) => {
      log(`kiln daemon: refused a migration stream from ${socket.remoteAddress}: ${why}`);
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    };
    if (!verifier.check(req.headers[AUTH_HEADER] as string | undefined, req.method ?? '', req.url ?? '', ''))
      return refuse('401 Unauthorized', "not signed with this daemon's token");
    if (!m) return refuse('404 Not Found', `no such endpoint ${p}`);
    let target: string;
    try {
      target = manager.incomingSocket(decodeURIComponent(m[1]!));
    } catch (err) {
      return refuse('409 Conflict', (err as Error).message);
    }
    const vmm = createConnection(target);
    vmm.once('connect', () => {
      socket.write('HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: kiln-migration\r\n\r\n');
      if (head.length > 0) vmm.write(head);
      splice(socket, vmm);
    });
    vmm.once('error', (err: NodeJS.ErrnoException) =>
      refuse('502 Bad Gateway', `the receiving VMM: ${err.code ?? err.message}`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        new KilnError(`cannot listen on ${listen.address.host}:${listen.address.port}: ${err.code ?? err.message}`),
      ),
    );
    server.listen(listen.address.port, listen.address.host, resolve);
  });
  const loopback = isLoopback(listen.address.host);
  const how = listen.tls ? ' over TLS' : '';
  const exposure = loopback
    ? ''
    : listen.tls
      ? ' (NOT loopback: reachable from other hosts; requests must be signed with the token)'
      : " (NOT loopback: reachable from other hosts; requests must be signed with the token, but a migrating VM's memory crosses in the clear: give --tls-cert and --tls-key)";
  log(`kiln daemon: taking migrations on ${listen.address.host}:${listen.address.port}${how}${exposure}`);
  return server;
}

export async function runDaemon(
  store: Store,
  log: (line: string) => void,
  opts: { listen?: PeerListen; pool?: number } = {},
): Promise<void> {
  // One daemon per state directory: the first to lock it serves it; any other stops here,
  // before it touches the socket.
  // Everything the daemon creates — its socket first (connecting needs write permission
  // on it), definitions, run directories, console logs — is its owner's alone.
  process.umask(0o077);
  const lock = lockStateDir(store);
  if (lock === null) {
    log(`kiln daemon: another daemon already serves ${store.dir}`);
    return;
  }
  for (const f of sweepTemporaryFiles(store.vmsDir))
    log(`kiln daemon: removed ${f}, left by a write that did not finish`);
  const manager = new Manager(store, log);
  // VMs that ended while no daemon ran: give back what their jails held.
  void manager.reclaimEndedJails();
  const router = FindMyWay({
    defaultRoute: (_req: IncomingMessage, res: ServerResponse) => reply(res, 404, { error: 'no such endpoint' }),
  });
  const route = (
    method: 'GET' | 'POST' | 'DELETE',
    path: string,
    handler: (
      name: string,
      body: unknown,
      query: URLSearchParams,
      params: Record<string, string | undefined>,
      progress: (line: string) => void,
    ) => Promise<unknown> | unknown,
  ) =>
    router.on(method, path, (req, res, params) => {
      // A client that asks for progress (PROGRESS_HEADER) gets lines as the verb goes,
      // then the status and answer as the last line.
      const streaming = req.headers[PROGRESS_HEADER] === '1';
      let begun = false;
      const begin = () => {
        if (!begun) res.writeHead(200, { 'Content-Type': PROGRESS_TYPE });
        begun = true;
      };
      const progress = (line: string) => {
        if (!streaming || res.writableEnded) return;
        begin();
        res.write(`${JSON.stringify({ progress: line })}\n`);
      };
      const answer = (status: number, body: unknown) => {
        if (!streaming) return reply(res, status, body);
        begin();
        res.end(`${JSON.stringify({ status, body })}\n`);
      };
      void (async () => {
        try {
          const body = method === 'POST' ? await readJson(req) : undefined;
          answer(
            200,
            await handler(
              params.name ?? '',
              body,
              new URL(req.url ?? '/', 'http://kiln').searchParams,
              params,
              progress,
            ),
          );
        } catch (err) {
          const body: ErrorReply = {
            error: err instanceof Error ? err.message : String(err),
            ...(err instanceof ConfigError ? { field: err.field } : {}),
          };
          answer(err instanceof KilnError ? 400 : 500, body);
        }
      })();
    });
  route('GET', '/vms', () => manager.list());
  route('GET', '/pool', (): PoolReply => manager.pool?.counts ?? { idle: 0, starting: 0, size: 0 });
  route('POST', '/vms', (_n, body) => manager.create(body));
  route('GET', '/vms/:name', (name) => manager.info(name));
  route('GET', '/vms/:name/preflight', (name) => manager.preflight(name));
  route('POST', '/vms/:name/start', (name, body) =>
    manager.start(name, { jail: (body as { jail?: boolean }).jail !== false }),
  );
  route('POST', '/vms/:name/stop', (name, body) => manager.stop(name, (body as { force?: boolean }).force === true));
  route('POST', '/vms/:name/restart', async (name, body) => {
    await manager.stop(name, false);
    return manager.start(name, { jail: (body as { jail?: boolean }).jail !== false });
  });
  route('POST', '/vms/:name/pause', (name) => manager.setPaused(name, true));
  route('POST', '/vms/:name/resume', (name) => manager.setPaused(name, false));
  route('DELETE', '/vms/:name', async (name): Promise<RemovedReply> => {
    await manager.remove(name);
    return { removed: name };
  });
  route('GET', '/vms/:name/snapshots', (name) => ({ snapshots: manager.snapshots(name) }));
  route('POST', '/vms/:name/snapshots', (name, body, _q, _p, progress) => {
    const b = body as { tag?: unknown; diff?: unknown };
    if (b.tag !== undefined && typeof b.tag !== 'string') throw new KilnError('tag must be a string');
    return manager.snapshot(name, b.tag as string | undefined, { diff: b.diff === true, progress });
  });
  route('DELETE', '/vms/:name/snapshots/:tag', async (name, _b, _q, params) => {
    await manager.removeSnapshot(name, params.tag ?? '');
    return { removed: params.tag };
  });
  route('POST', '/vms/:name/snapshots/:tag/merge', (name, _b, _q, params, progress) =>
    manager.mergeSnapshot(name, params.tag ?? '', progress),
  );
  route('POST', '/vms/:name/restore', (name, body, _q, _p, progress) => {
    const b = body as { tag?: unknown; jail?: unknown };
    if (typeof b.tag !== 'string') throw new KilnError('tag is required');
    return manager.restore(name, b.tag, { jail: b.jail !== false, progress });
  });
  route('POST', '/vms/:name/clone', (name, body, _q, _p, progress) => {
    const b = body as { name?: unknown; from?: unknown; nets?: unknown };
    if (typeof b.name !== 'string') throw new KilnError('the new name is required');
    if (b.from !== undefined && typeof b.from !== 'string') throw new KilnError('from must be a snapshot tag');
    const nets = b.nets ?? [];
    if (
      !Array.isArray(nets) ||
      !nets.every(
        (n: unknown) =>
          typeof n === 'object' &&
          n !== null &&
          Object.entries(n).every(([k, x]) => ['id', 'tap', 'passt', 'mac'].includes(k) && typeof x === 'string'),
      )
    )
      throw new KilnError('nets must be a list of {id, tap | passt}');
    return manager.clone(name, b.name, {
      ...(b.from !== undefined ? { from: b.from as string } : {}),
      nets: nets as Array<{ id?: string; tap?: string; passt?: string }>,
      progress,
    });
  });
  route('POST', '/vms/:name/migrate', (name, body, _q, _p, progress) => {
    const b = body as { to?: unknown; token?: unknown; downtimeMs?: unknown; copyDisks?: unknown; tlsCa?: unknown };
    if (b.tlsCa !== undefined && typeof b.tlsCa !== 'string') throw new KilnError('tlsCa must be PEM text');
    if (typeof b.to !== 'string') throw new KilnError('to (ADDR:PORT) is required');
    if (typeof b.token !== 'string') throw new KilnError('token is required');
    if (b.downtimeMs !== undefined && (!Number.isSafeInteger(b.downtimeMs) || (b.downtimeMs as number) < 1))
      throw new KilnError('downtimeMs must be a whole number of milliseconds');
    return manager.migrate(name, {
      to: b.to,
      token: b.token,
      ...(b.downtimeMs !== undefined ? { downtimeMs: b.downtimeMs as number } : {}),
      copyDisks: b.copyDisks === true,
      ...(b.tlsCa !== undefined ? { tlsCa: b.tlsCa as string } : {}),
      progress,
    });
  });
  // The web dashboard (kiln dashboard): started on the first request, on loopback unless
  // told otherwise; each request mints a new one-time address.
  const web: { dashboard: Promise<Dashboard> | null } = { dashboard: null };
  route('POST', '/dashboard', async (_n, body): Promise<DashboardReply> => {
    const b = body as { listen?: unknown };
    if (b.listen !== undefined && typeof b.listen !== 'string')
      throw new KilnError('listen must be ADDR:PORT (e.g. 127.0.0.1:7070)');
    const want = b.listen !== undefined ? parsePeer(b.listen, '--listen', true) : null;
    let current = web.dashboard ? await web.dashboard.catch(() => null) : null;
    const moved =
      current?.address &&
      want &&
      (want.host !== current.address.host || (want.port !== 0 && want.port !== current.address.port));
    if (current && moved) {
      await current.close();
      log(`kiln daemon: the dashboard left ${current.address!.host}:${current.address!.port}`);
      current = null;
    }
    if (!current) {
      web.dashboard = (async () => {
        const { Dashboard } = await import('../dashboard/server.js');
        const d = new Dashboard({ manager, store, api: (req, res) => router.lookup(req, res), log });
        await d.listen(want ?? DASHBOARD_DEFAULT);
        log(
          `kiln daemon: serving the dashboard on http://${d.address!.host}:${d.address!.port}/${d.loopback ? '' : ' (NOT loopback: reachable from other machines; every request needs a session from kiln dashboard)'}`,
        );
        return d;
      })();
      current = await web.dashboard.catch((err: unknown) => {
        web.dashboard = null;
        throw err;
      });
    }
    return {
      url: current.mintUrl(),
      listen: `${current.address!.host}:${current.address!.port}`,
      loopback: current.loopback,
    };
  });
  route('POST', '/vms/:name/upgrade', (name, _b, _q, _p, progress) => manager.upgrade(name, progress));
  route('GET', '/vms/:name/logs', async (name, _b, q): Promise<LogsReply> => {
    const bytes = Number(q.get('bytes') ?? 64 * 1024);
    if (!Number.isSafeInteger(bytes) || bytes < 0)
      throw new KilnError(`bytes must be a whole number of bytes (got '${q.get('bytes')}')`);
    return { log: manager.logs(name, bytes) };
  });

  rmSync(store.socketPath, { force: true });
  const group = process.env.KILN_GROUP ? groupId(process.env.KILN_GROUP) : null;
  const server = createServer((req, res) => router.lookup(req, res));
  // Who connects is checked, not just the socket's mode: its owner, root, or the kiln group.
  const { peerCredentials } = await import('../kvm/libc.js');
  server.on('connection', (socket) => {
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
    const peer = fd >= 0 ? peerCredentials(fd) : null;
    if (peer !== null && peerAllowed(peer, group)) return;
    log(`kiln daemon: refused a connection from ${peer ? `uid ${peer.uid} (pid ${peer.pid})` : 'an unknown peer'}`);
    const text = JSON.stringify({ error: 'not allowed: the kiln daemon serves its owner, root and the kiln group' });
    socket.end(
      `HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(text)}\r\nConnection: close\r\n\r\n${text}`,
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(store.socketPath, () => resolve());
  });
  // 0600 from the umask; with a kiln group, 0660 and the group's, and the directory passable by it.
  if (group !== null) {
    chownSync(store.dir, -1, group);
    chownSync(store.socketPath, -1, group);
    chmodSync(store.socketPath, 0o660);
  }
  log(`kiln daemon: listening on ${store.socketPath} (state in ${store.dir})`);
  if (opts.pool) {
    try {
      manager.pool = new VmmPool({
        dir: join(store.dir, 'pool'),
        size: opts.pool,
        uidsInUse: () => manager.jailUidsInUse(''),
        allocateUid: allocateJailUid,
        log,
        ...(process.env.KILN_POOL_MIN_AVAILABLE_MIB
          ? { minAvailableMiB: Number(process.env.KILN_POOL_MIN_AVAILABLE_MIB) }
          : {}),
      });
      log(`kiln daemon: keeping ${opts.pool} VMM(s) started ahead (the pool)`);
    } catch (err) {
      log(`kiln daemon: no pool: ${(err as Error).message}`);
    }
  }
  let peers: HttpServer | null = null;
  if (opts.listen) {
    try {
      peers = await listenForPeers(manager, opts.listen, log);
    } catch (err) {
      server.close();
      rmSync(store.socketPath, { force: true });
      throw err;
    }
  }
  const rotation = setInterval(() => {
    manager.rotateConsoleLogs();
    void manager.reclaimEndedJails();
  }, ROTATE_EVERY_MS);
  await new Promise<void>((resolve) => {
    // A second signal while the daemon winds down (its pool) changes nothing: it finishes.
    process.on('SIGTERM', () => resolve());
    process.on('SIGINT', () => resolve());
  });
  clearInterval(rotation);
  await (await web.dashboard?.catch(() => null))?.close();
  await manager.pool?.close();
  peers?.close();
  await new Promise((resolve) => server.close(resolve));
  rmSync(store.socketPath, { force: true });
}

/** One call to the daemon; starts it first if nothing answers on its socket. */
/** Whether a request certainly never reached a daemon (so sending it again cannot do anything twice). */
const neverDelivered = (err: unknown) => ['ENOENT', 'ECONNREFUSED'].includes((err as NodeJS.ErrnoException).code ?? '');

export async function daemonCall<T>(
  store: Store,
  method: string,
  path: string,
  body?: unknown,
  onProgress?: (line: string) => void,
): Promise<T> {
  // A stop waits for the guest (up to 30 s, then SIGTERM): allow the daemon minutes.
  const attempt = () => unixHttp(store.socketPath, method, path, body, 10 * 60_000, onProgress);
  let r: { status: number; body: unknown };
  try {
    r = await attempt();
  } catch (err) {
    // A request that may have reached a daemon (a reset, a timeout) is not sent again:
    // a start or create must not happen twice.
    if (!neverDelivered(err)) throw new KilnError(`the kiln daemon did not answer: ${(err as Error).message}`);
    // Nobody listens: start the daemon, detached so it outlives this command, and send
    // the request once it listens. (The daemon itself removes a stale socket, holding
    // the state directory's lock: a client never unlinks a socket.)
    const log = openSync(join(store.dir, 'daemon.log'), 'a', PRIVATE_FILE);
    spawn(process.execPath, [CLI, 'daemon'], {
      detached: true,
      stdio: ['ignore', log, log],
      env: { ...process.env, KILN_STATE_DIR: store.dir },
    }).unref();
    // Polled at least every 20 ms (each try is one connect to a Unix socket): a daemon
    // starts in a few hundred milliseconds, which a doubling delay could overshoot by as much.
    const sent = await waitFor(
      async () => {
        try {
          return await attempt();
        } catch (e) {
          if (!neverDelivered(e)) throw new KilnError(`the kiln daemon did not answer: ${(e as Error).message}`);
          return null;
        }
      },
      10_000,
      undefined,
      20,
    );
    if (sent === null) throw new KilnError(`the kiln daemon did not start (see ${join(store.dir, 'daemon.log')})`);
    r = sent;
  }
  if (r.status !== 200) {
    const e = r.body as ErrorReply | undefined;
    if (e?.field !== undefined) throw new ConfigError(e.field, e.error.slice(e.field ? e.field.length + 2 : 0));
    throw new KilnError(e?.error ?? `the daemon answered ${r.status}`);
  }
  return r.body as T;
}
