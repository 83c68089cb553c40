// The web dashboard, served by the daemon on a TCP address (loopback unless told
// otherwise): the page and its bundled assets, the daemon's own API under /api, a
// WebSocket of live samples (/ws/events) and one per console viewer (/ws/console/NAME,
// bridged to the VM's serial socket). docs/ARCHITECTURE.md, "The dashboard", has the
// security layers; in short:
//
//   - `kiln dashboard` mints a one-time token (10 minutes); opening the URL with it sets
//     a session cookie (HttpOnly, SameSite=Strict) and redirects to the bare address;
//   - every request and WebSocket upgrade needs that session; upgrades also need an
//     Origin that is this very server; the Host must be this server's (no DNS rebinding);
//   - a state-changing request needs the session's CSRF token in X-Kiln-CSRF (a header a
//     foreign page cannot set without a CORS preflight nobody answers) and, when the
//     browser sends one, this server's Origin.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import { createConnection, type Socket } from 'node:net';
import { isAbsolute, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { WebSocketServer, type RawData, type WebSocket } from 'ws';
import { ConfigError } from '../config/vm-config.js';
import { KilnError } from '../errors.js';
import { definitionInput } from '../manager/create-input.js';
import type { Manager } from '../manager/manager.js';
import type { Peer } from '../manager/peer.js';
import { checkName, type Store } from '../manager/store.js';
import { readJson } from '../manager/json-body.js';
import { isLoopback } from '../host.js';
import { Sampler } from './stats.js';

const COOKIE = 'kiln_session';
const TOKEN_TTL_MS = 10 * 60_000;
const SESSION_TTL_MS = 12 * 60 * 60_000;
/** Live samples go out this often while somebody watches. */
const SAMPLE_EVERY_MS = 1000;
/** The console's scroll-back sent before the live bytes. */
const SCROLLBACK_BYTES = 64 * 1024;
/** A console viewer this far behind stops the reading of its serial connection (the VMM then drops for it alone). */
const CONSOLE_HIGH_WATER = 1024 * 1024;
/** A watcher of the live samples this far behind is cut off. */
const EVENTS_HIGH_WATER = 4 * 1024 * 1024;
/** The largest message a page may send (a paste into the console). */
const MAX_MESSAGE_BYTES = 64 * 1024;

const ASSET_DIR = fileURLToPath(new URL('../../dashboard/', import.meta.url));
const ASSETS: Record<string, string> = {
  'app.js': 'text/javascript; charset=utf-8',
  'app.css': 'text/css; charset=utf-8',
  'favicon.svg': 'image/svg+xml',
};

// xterm.js writes <style> elements for its renderer: styles may be inline, scripts never.
const SECURITY_HEADERS = {
  'Content-Security-Policy':
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
  'X-Content-Type-Options': 'nosniff',
  'Referrer-Policy': 'no-referrer',
  'X-Frame-Options': 'DENY',
  'Cache-Control': 'no-store',
};

interface Session {
  readonly csrf: string;
  readonly expires: number;
}

export interface DashboardOptions {
  readonly manager: Manager;
  readonly store: Store;
  /** The daemon's API (its router): /api/PATH is served as PATH. */
  readonly api: (req: IncomingMessage, res: ServerResponse) => void;
  readonly log: (line: string) => void;
}

const isWildcard = (host: string) => host === '0.0.0.0' || host === '::';

/** Equal strings, compared in constant time. */
function same(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function cookieOf(req: IncomingMessage, name: string): string | undefined {
  for (const part of (req.headers.cookie ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    ...SECURITY_HEADERS,
    ...headers,
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

function sendPage(res: ServerResponse, status: number, html: string): void {
  res.writeHead(status, {
    ...SECURITY_HEADERS,
    'Content-Type': 'text/html; charset=utf-8',
    'Content-Length': Buffer.byteLength(html),
  });
  res.end(html);
}

const explain = (title: string, text: string) =>
  `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Kiln: ${title}</title></head><body><main><h1>${title}</h1><p>${text}</p></main></body></html>`;

const NO_SESSION = explain(
  'Not signed in',
  'This dashboard needs the one-time address <code>kiln dashboard</code> prints. Run it on the host and open the address it gives.',
);
const SPENT_TOKEN = explain(
  'This link has expired or was used',
  'Each address <code>kiln dashboard</code> prints opens one session within 10 minutes. Run it again for a new one.',
);

/**
 * The definition a create form describes, through the very code `kiln create` runs on its
 * flags (so the same mistake gets the same message). Paths must be absolute: the daemon
 * has no working directory of the user's to resolve them against.
 */
export function formDefinition(form: unknown): Record<string, unknown> {
  if (typeof form !== 'object' || form === null || Array.isArray(form))
    throw new KilnError('the form must be an object of fields');
  const f = form as Record<string, unknown>;
  const known = [
    'name',
    'kernel',
    'initrd',
    'cmdline',
    'cpus',
    'memory',
    'disk',
    'net',
    'rng',
    'balloon',
    'cpuTemplate',
    'vsock',
    'consoleSocket',
    'cpuWeight',
    'cpuQuota',
    'pin',
  ];
  for (const k of Object.keys(f)) if (!known.includes(k)) throw new KilnError(`unknown form field '${k}'`);
  const text = (k: string): string | undefined => {
    const x = f[k];
    if (x === undefined || x === null || x === '') return undefined;
    if (typeof x !== 'string') throw new ConfigError(`--${k}`, 'must be text');
    return x.trim() === '' ? undefined : x.trim();
  };
  const list = (k: string): string[] | undefined => {
    const x = f[k];
    if (x === undefined || x === null) return undefined;
    if (!Array.isArray(x) || !x.every((e) => typeof e === 'string')) throw new ConfigError(`--${k}`, 'must be a list');
    const items = (x as string[]).map((e) => e.trim()).filter((e) => e !== '');
    return items.length ? items : undefined;
  };
  const path = (flag: string, p: string | undefined) => {
    if (p !== undefined && !isAbsolute(p))
      throw new ConfigError(
        flag,
        `must be an absolute path (got '${p}'); the daemon does not share your working directory`,
      );
    return p;
  };
  const disks = list('disk');
  disks?.forEach((d) => path('--disk', d.split(',')[0]));
  const nets = list('net');
  nets?.forEach((n) => {
    const passt = /(?:^|,)passt=([^,]*)/.exec(n)?.[1];
    if (passt) path('--net', passt);
  });
  const vsock = text('vsock');
  if (vsock !== undefined) path('--vsock', vsock.slice(vsock.indexOf(',') + 1));
  if (f.rng !== undefined && typeof f.rng !== 'boolean') throw new ConfigError('--rng', 'must be true or false');
  return definitionInput(text('name'), {
    ...(text('cpuWeight') !== undefined ? { cpuWeight: text('cpuWeight') } : {}),
    ...(text('cpuQuota') !== undefined ? { cpuQuota: text('cpuQuota') } : {}),
    ...(text('pin') !== undefined ? { pin: text('pin') } : {}),
    vm: {
      kernel: path('--kernel', text('kernel')),
      initrd: path('--initrd', text('initrd')),
      cmdline: text('cmdline'),
      cpus: text('cpus'),
      memory: text('memory'),
      disk: disks,
      net: nets,
      rng: f.rng === true,
      balloon: text('balloon'),
      cpuTemplate: text('cpuTemplate'),
      vsock,
      consoleSocket: path('--console-socket', text('consoleSocket')),
    },
  });
}

export class Dashboard {
  private server: Server | null = null;
  private readonly wss = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE_BYTES });
  private readonly tokens = new Map<string, number>();
  private readonly sessions = new Map<string, Session>();
  private readonly watchers = new Set<WebSocket>();
  private readonly sampler: Sampler;
  private timer: NodeJS.Timeout | null = null;
  private sampling = false;
  private readonly index: string;
  /** Each asset as it is and gzipped (compressed once, at start). */
  private readonly assets = new Map<string, { plain: Buffer; gzip: Buffer }>();
  address: Peer | null = null;

  constructor(private readonly o: DashboardOptions) {
    try {
      this.index = readFileSync(join(ASSET_DIR, 'index.html'), 'utf8');
      for (const name of Object.keys(ASSETS)) {
        const plain = readFileSync(join(ASSET_DIR, name));
        this.assets.set(name, { plain, gzip: gzipSync(plain, { level: 9 }) });
      }
    } catch (err) {
      throw new KilnError(
        `the dashboard's page is not built (${(err as NodeJS.ErrnoException).code ?? (err as Error).message} in ${ASSET_DIR}): run npm run build`,
      );
    }
    this.sampler = new Sampler(o.manager, o.store);
  }

  /** Serves on `at` (port 0: any free port); `address` then says where. */
  async listen(at: Peer): Promise<void> {
    // Nothing a client sends may end the daemon: a request that trips anything here is a 400.
    const server = createServer((req, res) => {
      try {
        this.request(req, res);
      } catch (err) {
        if (!res.headersSent) sendJson(res, 400, { error: `a malformed request: ${(err as Error).message}` });
        else res.destroy();
      }
    });
    server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
      try {
        this.upgrade(req, socket, head);
      } catch (err) {
        this.o.log(`kiln daemon: the dashboard refused a malformed WebSocket request: ${(err as Error).message}`);
        socket.destroy();
      }
    });
    server.on('clientError', (_err, socket: Socket) => socket.destroy());
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) =>
        reject(new KilnError(`the dashboard cannot listen on ${at.host}:${at.port}: ${err.code ?? err.message}`)),
      );
      server.listen(at.port, at.host, resolve);
    });
    const bound = server.address();
    this.server = server;
    this.address = { host: at.host, port: typeof bound === 'object' && bound ? bound.port : at.port };
  }

  get loopback(): boolean {
    return this.address !== null && isLoopback(this.address.host);
  }

  /** A one-time address that opens a session (valid for 10 minutes). */
  mintUrl(): string {
    if (!this.address) throw new KilnError('the dashboard is not serving');
    const now = Date.now();
    for (const [t, expires] of this.tokens) if (expires < now) this.tokens.delete(t);
    const token = randomBytes(24).toString('base64url');
    this.tokens.set(token, now + TOKEN_TTL_MS);
    const host = isWildcard(this.address.host) ? '127.0.0.1' : this.address.host;
    const shown = isIP(host) === 6 ? `[${host}]` : host;
    return `http://${shown}:${this.address.port}/?token=${token}`;
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    for (const ws of this.wss.clients) ws.terminate();
    const server = this.server;
    this.server = null;
    if (server) {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  }

  /** The Host a browser sent names this server (a DNS-rebound name does not). */
  private hostAllowed(req: IncomingMessage): boolean {
    const host = req.headers.host;
    if (!host || !this.address) return false;
    const name = host.replace(/:\d+$/, '').toLowerCase();
    if (isLoopback(name)) return true;
    if (isWildcard(this.address.host)) return true;
    return name === this.address.host.toLowerCase() || name === `[${this.address.host.toLowerCase()}]`;
  }

  /** The origin a page of this server has, as the browser writes it. */
  private ownOrigin(req: IncomingMessage, origin: string | undefined): boolean {
    return origin !== undefined && origin === `http://${req.headers.host}`;
  }

  private session(req: IncomingMessage): Session | null {
    const id = cookieOf(req, COOKIE);
    if (!id) return null;
    const s = this.sessions.get(id);
    if (!s) return null;
    if (s.expires < Date.now()) {
      this.sessions.delete(id);
      return null;
    }
    return s;
  }

  private request(req: IncomingMessage, res: ServerResponse): void {
    if (!this.hostAllowed(req)) return sendJson(res, 421, { error: 'this is not the address the dashboard serves' });
    const url = new URL(req.url ?? '/', 'http://kiln');
    const token = url.searchParams.get('token');
    if (req.method === 'GET' && url.pathname === '/' && token !== null) return this.signIn(res, token);
    const session = this.session(req);
    if (!session) {
      if (req.method === 'GET' && !url.pathname.startsWith('/api/')) return sendPage(res, 401, NO_SESSION);
      return sendJson(res, 401, { error: 'not signed in: open the address `kiln dashboard` prints' });
    }
    if (req.method === 'GET' && url.pathname === '/')
      return sendPage(res, 200, this.index.replace('__KILN_CSRF__', session.csrf));
    const asset = /^\/assets\/([a-z.]+)$/.exec(url.pathname)?.[1];
    if (req.method === 'GET' && asset !== undefined && this.assets.has(asset)) {
      const { plain, gzip } = this.assets.get(asset)!;
      const zipped = /\bgzip\b/.test(String(req.headers['accept-encoding'] ?? ''));
      const body = zipped ? gzip : plain;
      res.writeHead(200, {
        ...SECURITY_HEADERS,
        'Content-Type': ASSETS[asset]!,
        'Content-Length': body.length,
        'Cache-Control': 'no-cache',
        Vary: 'Accept-Encoding',
        ...(zipped ? { 'Content-Encoding': 'gzip' } : {}),
      });
      return void res.end(body);
    }
    if (!url.pathname.startsWith('/api/')) return sendJson(res, 404, { error: 'no such page' });
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      const origin = req.headers.origin;
      if (origin !== undefined && !this.ownOrigin(req, origin))
        return sendJson(res, 403, { error: `refused: a request from another site (${origin})` });
      const csrf = req.headers['x-kiln-csrf'];
      if (typeof csrf !== 'string' || !same(csrf, session.csrf))
        return sendJson(res, 403, { error: 'refused: the request lacks this session’s CSRF token' });
    }
    if (req.method === 'POST' && url.pathname === '/api/create')
      return void this.create(req, res, url.searchParams.get('check') === '1');
    req.url = `${url.pathname.slice('/api'.length)}${url.search}`;
    this.o.api(req, res);
  }

  private signIn(res: ServerResponse, token: string): void {
    const expires = this.tokens.get(token);
    // Spent either way: a token opens one session at most.
    this.tokens.delete(token);
    if (expires === undefined || expires < Date.now()) return sendPage(res, 401, SPENT_TOKEN);
    const id = randomBytes(32).toString('base64url');
    this.sessions.set(id, { csrf: randomBytes(24).toString('base64url'), expires: Date.now() + SESSION_TTL_MS });
    res.writeHead(303, {
      ...SECURITY_HEADERS,
      Location: '/',
      'Set-Cookie': `${COOKIE}=${id}; HttpOnly; SameSite=Strict; Path=/; Max-Age=${SESSION_TTL_MS / 1000}`,
      'Content-Length': 0,
    });
    res.end();
  }

  /** POST /api/create (?check=1: only check): the form, as `kiln create` takes its flags. */
  private async create(req: IncomingMessage, res: ServerResponse, checkOnly: boolean): Promise<void> {
    try {
      const input = formDefinition(await readJson(req));
      if (checkOnly) {
        this.o.manager.check(input);
        return sendJson(res, 200, { ok: true });
      }
      const status = await this.o.manager.create(input);
      this.o.log(`kiln daemon: the dashboard created '${status.name}'`);
      this.pushSoon();
      sendJson(res, 200, status);
    } catch (err) {
      const field = err instanceof ConfigError ? { field: err.field } : {};
      sendJson(res, err instanceof KilnError ? 400 : 500, { error: (err as Error).message, ...field });
    }
  }

  private upgrade(req: IncomingMessage, socket: Socket, head: Buffer): void {
    const refuse = (status: string, why: string) => {
      this.o.log(`kiln daemon: the dashboard refused a WebSocket: ${why}`);
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n${why}\n`);
    };
    if (!this.hostAllowed(req)) return refuse('421 Misdirected Request', 'an unexpected Host');
    if (!this.ownOrigin(req, req.headers.origin))
      return refuse('403 Forbidden', `a foreign or missing Origin (${req.headers.origin ?? 'none'})`);
    if (!this.session(req)) return refuse('401 Unauthorized', 'not signed in');
    const path = new URL(req.url ?? '/', 'http://kiln').pathname;
    const consoleOf = /^\/ws\/console\/([^/]+)$/.exec(path)?.[1];
    if (path !== '/ws/events' && consoleOf === undefined) return refuse('404 Not Found', `no such socket ${path}`);
    let name = '';
    try {
      name = consoleOf === undefined ? '' : decodeURIComponent(consoleOf);
    } catch {
      return refuse('400 Bad Request', `a malformed VM name in ${path}`);
    }
    this.wss.handleUpgrade(req, socket, head, (ws) => {
      if (consoleOf !== undefined) this.console(ws, name);
      else this.watch(ws);
    });
  }

  /** /ws/events: a sample now and every second; the socket takes no messages. */
  private watch(ws: WebSocket): void {
    this.watchers.add(ws);
    ws.on('message', () => ws.close(1003, 'this socket takes no messages'));
    ws.on('close', () => {
      this.watchers.delete(ws);
      if (this.watchers.size === 0 && this.timer) {
        clearInterval(this.timer);
        this.timer = null;
      }
    });
    ws.on('error', () => ws.terminate());
    this.pushSoon();
    this.timer ??= setInterval(() => this.push(), SAMPLE_EVERY_MS);
  }

  private pushSoon(): void {
    setImmediate(() => this.push());
  }

  private push(): void {
    if (this.sampling || this.watchers.size === 0) return;
    this.sampling = true;
    this.sampler
      .sample()
      .then((sample) => {
        const text = JSON.stringify(sample);
        for (const ws of this.watchers) {
          if (ws.bufferedAmount > EVENTS_HIGH_WATER) ws.terminate();
          else ws.send(text);
        }
      })
      .catch((err: unknown) => this.o.log(`kiln daemon: the dashboard's sample failed: ${(err as Error).message}`))
      .finally(() => (this.sampling = false));
  }

  /**
   * /ws/console/NAME: the console log's tail, then the serial console live. Frames carry
   * the terminal's bytes both ways (what the page types, text or binary, goes to the guest
   * as it is); Kiln's own notices are dimmed lines among them.
   */
  private console(ws: WebSocket, name: string): void {
    const notice = (text: string) => ws.send(Buffer.from(`\r\n\x1b[36m[kiln] ${text}\x1b[0m\r\n`, 'utf8'));
    ws.on('error', () => ws.terminate());
    void (async () => {
      let state: string;
      try {
        checkName(name);
        state = (await this.o.manager.info(name)).state;
        ws.send(Buffer.from(this.o.manager.logs(name, SCROLLBACK_BYTES), 'utf8'));
      } catch (err) {
        notice((err as Error).message);
        return ws.close(4404, 'no such VM');
      }
      if (state === 'stopped') {
        notice(`'${name}' is not running; that was the end of its console log`);
        return ws.close(1000, 'not running');
      }
      if (ws.readyState !== ws.OPEN) return;
      const serial = createConnection(join(this.o.store.runDir(name), 'serial.sock'));
      serial.on('data', (chunk: Buffer) => {
        if (ws.readyState !== ws.OPEN) return;
        ws.send(chunk, () => {
          if (serial.isPaused() && ws.bufferedAmount < CONSOLE_HIGH_WATER / 4) serial.resume();
        });
        // A viewer that stops reading: stop reading for it (the VMM drops its output for
        // this connection alone; the guest and the other viewers go on).
        if (ws.bufferedAmount > CONSOLE_HIGH_WATER) serial.pause();
      });
      serial.on('error', (err: NodeJS.ErrnoException) => {
        notice(`the serial console: ${err.code ?? err.message}`);
        ws.close(1011, 'serial console unavailable');
      });
      serial.on('close', () => {
        if (ws.readyState === ws.OPEN) {
          notice(`'${name}' stopped`);
          ws.close(1000, 'the VM stopped');
        }
      });
      ws.on('message', (data: RawData) => {
        const bytes = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
        // Typing faster than the guest reads: the page waits (TCP backpressure).
        if (!serial.write(bytes)) {
          ws.pause();
          serial.once('drain', () => ws.resume());
        }
      });
      ws.on('close', () => serial.destroy());
    })();
  }
}
