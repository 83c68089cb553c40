// The Firecracker API over HTTP/1.1 on a Unix socket: find-my-way routes each method
// and path to one handler; a handler parses the body with its resource's parser
// (resources.ts) and applies it to the Vmm. Success is 204 (or 200 with JSON for GETs);
// every failure is 400 with {"fault_message": ...}; bodies over 51200 bytes are refused
// before they are parsed.
import { existsSync, unlinkSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import FindMyWay from 'find-my-way';
import * as r from './resources.js';
import { ApiError } from './resources.js';
import { DEFAULT_MAX_PAYLOAD_BYTES, type Vmm } from './vmm.js';

/** Firecracker's default limit on a request body (kiln-vmm --http-api-max-payload-size changes a Vmm's). */
export const MAX_BODY_BYTES = DEFAULT_MAX_PAYLOAD_BYTES;
/** The Firecracker API version Kiln speaks (its spec is test/fixtures/firecracker-api.yaml). */
export const FIRECRACKER_API_VERSION = '1.7.0';
export { KILN_VERSION } from '../version.js';
import { KILN_VERSION } from '../version.js';

type Handler = (vmm: Vmm, body: unknown, params: Record<string, string | undefined>) => Promise<unknown> | unknown;

function send(res: ServerResponse, status: number, body?: unknown): void {
  if (body === undefined) {
    res.writeHead(status);
    res.end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

const fault = (res: ServerResponse, message: string) => send(res, 400, { fault_message: message });

function readBody(req: IncomingMessage, limit: number): Promise<string | null> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > limit) {
      req.resume();
      resolve(null);
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size <= limit) chunks.push(c);
    });
    req.on('end', () => resolve(size > limit ? null : Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** Kiln has no such feature yet: a 400 that says so. */
const notYet =
  (what: string): Handler =>
  () => {
    throw new ApiError(`${what} is not supported by Kiln yet`);
  };

/** A pre-boot-only change (answered 204): refused after InstanceStart, as Firecracker refuses it. */
const preBoot =
  (apply: (vmm: Vmm, body: unknown, params: Record<string, string | undefined>) => unknown): Handler =>
  (vmm, body, params) => {
    vmm.preBoot();
    apply(vmm, body, params);
  };

/** Every route; PUT and PATCH take a JSON body, GET none. */
const ROUTES: Array<[method: 'GET' | 'PUT' | 'PATCH', path: string, handler: Handler]> = [
  [
    'GET',
    '/',
    (vmm) => ({
      app_name: 'Firecracker',
      id: vmm.id,
      state: vmm.state,
      vmm_version: `${FIRECRACKER_API_VERSION}-kiln.${KILN_VERSION}`,
    }),
  ],
  ['GET', '/version', () => ({ firecracker_version: FIRECRACKER_API_VERSION })],
  ['GET', '/vm/config', (vmm) => r.exportDefinition(vmm.config, vmm.settings)],
  ['GET', '/machine-config', (vmm) => r.exportMachineConfig(vmm.config)],
  ['PUT', '/boot-source', preBoot((vmm, body) => vmm.setBootSource(r.parseBootSource(body)))],
  ['PUT', '/machine-config', preBoot((vmm, body) => vmm.setMachineConfig(r.parseMachineConfig(body)))],
  ['PATCH', '/machine-config', preBoot((vmm, body) => vmm.setMachineConfig(r.parseMachineConfig(body, true)))],
  [
    'PUT',
    '/drives/:drive_id',
    preBoot((vmm, body, p) => vmm.setDrive(r.parseDrive(p.drive_id ?? '', body), p.drive_id ?? '')),
  ],
  [
    'PATCH',
    '/drives/:drive_id',
    (vmm, body, p) => {
      const patch = r.parsePartialDrive(p.drive_id ?? '', body);
      if (!vmm.config.disks.some((d) => d.id === patch.drive_id))
        throw new ApiError(`Invalid block device ID: ${patch.drive_id}`);
      const path = patch.path_on_host;
      const change: r.ConfigChange = (input) => {
        input.disks = (input.disks as Array<Record<string, unknown>>).map((d) =>
          d.id === patch.drive_id
            ? {
                ...d,
                ...(path !== undefined ? { path } : {}),
                ...(patch.rateLimiter ? { rateLimiter: patch.rateLimiter } : {}),
              }
            : d,
        );
      };
      // Checked before the running guest sees anything; applied after the swap succeeded.
      const next = vmm.check(change);
      if (vmm.started && path !== undefined) vmm.patchDrive(patch.drive_id, path);
      if (vmm.started && patch.rateLimiter)
        vmm.setLimiter(`drive:${patch.drive_id}`, next.disks.find((d) => d.id === patch.drive_id)!.rateLimiter);
      vmm.apply(change);
    },
  ],
  [
    'PUT',
    '/network-interfaces/:iface_id',
    preBoot((vmm, body, p) =>
      vmm.setNetworkInterface(r.parseNetworkInterface(p.iface_id ?? '', body), p.iface_id ?? ''),
    ),
  ],
  [
    'PATCH',
    '/network-interfaces/:iface_id',
    (vmm, body, p) => {
      const patch = r.parsePartialNetworkInterface(p.iface_id ?? '', body);
      if (!vmm.config.nets.some((n) => n.id === patch.iface_id))
        throw new ApiError(`Invalid network interface ID: ${patch.iface_id}`);
      const change: r.ConfigChange = (input) => {
        input.nets = (input.nets as Array<Record<string, unknown>>).map((n) =>
          n.id === patch.iface_id
            ? {
                ...n,
                ...(patch.rxRateLimiter ? { rxRateLimiter: patch.rxRateLimiter } : {}),
                ...(patch.txRateLimiter ? { txRateLimiter: patch.txRateLimiter } : {}),
              }
            : n,
        );
      };
      const next = vmm.check(change).nets.find((n) => n.id === patch.iface_id)!;
      if (vmm.started) {
        if (patch.rxRateLimiter) vmm.setLimiter(`net-rx:${patch.iface_id}`, next.rxRateLimiter);
        if (patch.txRateLimiter) vmm.setLimiter(`net-tx:${patch.iface_id}`, next.txRateLimiter);
      }
      vmm.apply(change);
    },
  ],
  ['PUT', '/vsock', preBoot((vmm, body) => vmm.setVsock(r.parseVsock(body)))],
  // Kiln's own: the whole VM as one VmConfig (what --kiln-config reads; the daemon's pool hands it in).
  ['PUT', '/kiln/vm-config', preBoot((vmm, body) => vmm.setVmConfig(body))],
  ['PUT', '/entropy', preBoot((vmm, body) => vmm.apply(r.parseEntropy(body)))],
  ['PUT', '/balloon', preBoot((vmm, body) => vmm.apply(r.parseBalloon(body)))],
  [
    'PATCH',
    '/balloon',
    (vmm, body) => {
      const update = r.parseBalloonUpdate(body);
      if (!vmm.config.balloon) throw new ApiError('The balloon device is not configured.');
      vmm.check(update);
      if (vmm.started) vmm.setBalloonTarget(update.mib as number);
      vmm.apply(update);
    },
  ],
  [
    'GET',
    '/balloon',
    (vmm) => {
      if (!vmm.config.balloon) throw new ApiError('The balloon device is not configured.');
      return r.exportBalloon(vmm.config.balloon);
    },
  ],
  ['GET', '/balloon/statistics', (vmm) => vmm.balloonStats()],
  [
    'PATCH',
    '/balloon/statistics',
    (vmm, body) => {
      const update = r.parseBalloonStatsUpdate(body);
      const was = vmm.config.balloon?.statsIntervalS;
      if (was === undefined) throw new ApiError('The balloon device is not configured.');
      // The statistics queue is offered to the guest at the start or not at all.
      if (vmm.started && (was === 0) !== (update.seconds === 0))
        throw new ApiError(
          'Cannot enable or disable balloon statistics after the microVM started: set stats_polling_interval_s before InstanceStart.',
        );
      vmm.apply(update);
    },
  ],
  ['PUT', '/logger', preBoot((vmm, body) => vmm.setLogger(r.parseLogger(body)))],
  ['PUT', '/metrics', preBoot((vmm, body) => vmm.setMetrics(r.parseMetrics(body)))],
  [
    'PUT',
    '/actions',
    async (vmm, body) => {
      const action = r.parseAction(body);
      if (action === 'InstanceStart') await vmm.start();
      else if (action === 'SendCtrlAltDel') vmm.ctrlAltDel();
      else vmm.flushMetrics();
    },
  ],
  [
    'PATCH',
    '/vm',
    async (vmm, body) => {
      if (r.parseVmState(body) === 'Paused') await vmm.pause();
      else vmm.resume();
    },
  ],
  ['PUT', '/cpu-config', preBoot((vmm, body) => vmm.apply(r.parseCpuConfig(body)))],
  ['PUT', '/mmds', (vmm, body) => vmm.mmdsWrite(() => vmm.mmds.put(body))],
  ['PATCH', '/mmds', (vmm, body) => vmm.mmdsWrite(() => vmm.mmds.patch(body))],
  ['GET', '/mmds', (vmm) => vmm.mmds.get()],
  ['PUT', '/mmds/config', preBoot((vmm, body) => vmm.apply(r.parseMmdsConfig(body)))],
  ['PUT', '/snapshot/create', (vmm, body) => vmm.createSnapshot(r.parseSnapshotCreate(body))],
  ['PUT', '/snapshot/load', (vmm, body) => vmm.loadSnapshot(r.parseSnapshotLoad(body))],
  ['PUT', '/migration/send', (vmm, body) => vmm.sendMigration(r.parseMigrationSend(body))],
  ['PUT', '/migration/receive', (vmm, body) => vmm.receiveMigration(r.parseMigrationReceive(body))],
  ['GET', '/migration', (vmm) => vmm.migrationProgress()],
  ['GET', '/kiln/counters', (vmm) => vmm.counterTotals()],
  ['PUT', '/pmem/:id', notYet('Persistent memory devices (/pmem)')],
  ['PATCH', '/pmem/:id', notYet('Persistent memory devices (/pmem)')],
  ['PUT', '/serial', preBoot((vmm, body) => vmm.setSerial(r.parseSerial(body).serial_out_path))],
  ['PUT', '/hotplug/memory', notYet('Memory hot-plug (/hotplug/memory)')],
  ['PATCH', '/hotplug/memory', notYet('Memory hot-plug (/hotplug/memory)')],
  ['GET', '/hotplug/memory', notYet('Memory hot-plug (/hotplug/memory)')],
  ['PATCH', '/balloon/hinting/start', (vmm, body) => vmm.startHinting(r.parseHintingStart(body))],
  ['GET', '/balloon/hinting/status', (vmm) => vmm.hintingStatus()],
  ['PATCH', '/balloon/hinting/stop', (vmm) => vmm.stopHinting()],
];

/** A request handler; `prepare` builds its router now instead of at the first request. */
export interface ApiHandler {
  (req: IncomingMessage, res: ServerResponse): void;
  prepare(): void;
}

/**
 * The request handler for `vmm` (usable with any node:http server). Its router is built at
 * the first request or `prepare()`, not before the API listens: find-my-way compiles a
 * function for each static part of a path (`new Function`, which no code cache holds),
 * ~10 ms of every start here, which a VMM started with `--config-file` would otherwise
 * pay before its guest runs.
 */
export function apiHandler(vmm: Vmm): ApiHandler {
  let router: ReturnType<typeof buildRouter> | null = null;
  const handler = ((req: IncomingMessage, res: ServerResponse) =>
    (router ??= buildRouter(vmm)).lookup(req, res)) as ApiHandler;
  handler.prepare = () => void (router ??= buildRouter(vmm));
  return handler;
}

function buildRouter(vmm: Vmm) {
  const router = FindMyWay({
    ignoreTrailingSlash: true,
    defaultRoute: (req: IncomingMessage, res: ServerResponse) =>
      fault(res, `Invalid request method and/or path: ${req.method} ${req.url}.`),
  });
  for (const [method, path, handler] of ROUTES) {
    const takesBody = method !== 'GET';
    // Firecracker takes these with no body at all.
    const bodyOptional = path.startsWith('/balloon/hinting/');
    router.on(method, path, (req, res, params) => {
      void (async () => {
        try {
          const text = await readBody(req, vmm.maxPayloadBytes);
          if (text === null)
            return fault(
              res,
              `Request payload with size larger than the limit of ${vmm.maxPayloadBytes} bytes allowed by server.`,
            );
          let body: unknown;
          if (takesBody && !(bodyOptional && text.trim() === '')) {
            if (text.trim() === '') return fault(res, 'The request body is empty; this request needs a JSON body.');
            try {
              body = JSON.parse(text);
            } catch (err) {
              return fault(res, `The request body is not valid JSON: ${(err as Error).message}`);
            }
          }
          const result = await handler(vmm, body, params as Record<string, string | undefined>);
          vmm.counters.request(method, req.url ?? '', true);
          if (result === undefined) send(res, 204);
          else send(res, 200, result);
        } catch (err) {
          vmm.counters.request(method, req.url ?? '', false);
          if (err instanceof ApiError) return fault(res, err.message);
          fault(res, `Internal error: ${err instanceof Error ? err.message : String(err)}`);
        }
      })();
    });
  }
  return router;
}

const MAX_HEADER_BYTES = 8 * 1024;
const HEADERS_TIMEOUT_MS = 5_000;
const REQUEST_TIMEOUT_MS = 10_000;
/** More API clients than any orchestrator opens at once; the rest wait in the listen backlog. */
export const MAX_CONNECTIONS = 32;

function clientErrorReason(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'HPE_INVALID_METHOD':
      return 'unknown method';
    case 'HPE_HEADER_OVERFLOW':
      return `headers larger than ${MAX_HEADER_BYTES} bytes`;
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return 'the request did not arrive in time';
    default:
      return `malformed request (${err.code ?? err.message})`;
  }
}

/**
 * Serves `vmm`'s API on the Unix socket `path` (refusing one that exists, as Firecracker
 * does). Its router is built just after the socket
 * listens (`prepare: 'soon'`, for a VMM that waits for its API: the first request finds it
 * ready), or at the first request (`'at-first-request'`, for a VMM started with its
 * configuration, whose start must not wait for it).
 */
export async function listenApi(
  path: string,
  vmm: Vmm,
  opts: { prepare?: 'soon' | 'at-first-request' } = {},
): Promise<Server> {
  if (existsSync(path))
    throw new ApiError(`the API socket ${path} already exists (another VMM, or a stale one: remove it first)`);
  const handler = apiHandler(vmm);
  const server = createServer(
    {
      // Small and quick: an API client sends short requests at once; one that dawdles or
      // floods holds a connection no longer than this.
      maxHeaderSize: MAX_HEADER_BYTES,
      headersTimeout: HEADERS_TIMEOUT_MS,
      requestTimeout: REQUEST_TIMEOUT_MS,
      keepAliveTimeout: 5_000,
    },
    handler,
  );
  server.maxConnections = MAX_CONNECTIONS;
  // A request Node's parser refuses (an unknown method, a malformed request line, headers
  // too large, too slow) gets the same 400 + fault_message as every other API error.
  server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
    if (!socket.writable) return socket.destroy();
    const text = JSON.stringify({ fault_message: `Invalid HTTP request: ${clientErrorReason(err)}.` });
    socket.end(
      `HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(text)}\r\nConnection: close\r\n\r\n${text}`,
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  if ((opts.prepare ?? 'soon') === 'soon') setImmediate(() => handler.prepare());
  server.on('close', () => {
    if (existsSync(path)) unlinkSync(path);
  });
  return server;
}
