// MMDS's HTTP service, as a guest sees it at 169.254.169.254: requests parsed from the
// bytes of a TCP connection, answered from the data store. Firecracker's rules: V1 answers
// GETs without a session; V2 wants a session token (PUT /latest/api/token with its TTL
// header, then X-metadata-token on every GET) and answers 401 without one; any method but
// GET and PUT is 405 with an Allow header. A path is a JSON pointer into the store; the
// answer is JSON with "Accept: application/json" (unless imds_compat), else EC2's IMDS
// format: an object's keys one per line (objects with a trailing "/"), a string as it is,
// anything else 501.
import { randomBytes } from 'node:crypto';

export type MmdsVersion = 'V1' | 'V2';

export interface MmdsRequest {
  readonly method: string;
  readonly path: string;
  /** Header names in lower case. */
  readonly headers: ReadonlyMap<string, string>;
  /** HTTP/1.0, or "Connection: close": the connection ends after the answer. */
  readonly close: boolean;
}

export interface MmdsResponse {
  readonly status: number;
  readonly body: string;
  readonly contentType: string;
  readonly headers?: Readonly<Record<string, string>>;
}

const REASONS: Readonly<Record<number, string>> = {
  200: 'OK',
  400: 'Bad Request',
  401: 'Unauthorized',
  404: 'Not Found',
  405: 'Method Not Allowed',
  413: 'Payload Too Large',
  501: 'Not Implemented',
};

/** The most bytes one request's head and body may take (a larger one is refused and its connection closed). */
export const MAX_REQUEST_BYTES = 8 * 1024;
/** Session tokens' time to live: 1 second to 6 hours (Firecracker's and EC2's limits). */
export const MAX_TOKEN_TTL_S = 21600;
/** Live session tokens kept at once; the oldest is forgotten first. */
const MAX_TOKENS = 1024;
const TOKEN_PATH = '/latest/api/token';

const text = (status: number, body: string, headers?: Record<string, string>): MmdsResponse => ({
  status,
  body,
  contentType: 'text/plain',
  ...(headers ? { headers } : {}),
});

/** A complete HTTP/1.x response's bytes. */
export function encodeResponse(r: MmdsResponse, close: boolean): Buffer {
  const body = Buffer.from(r.body, 'utf8');
  let head = `HTTP/1.1 ${r.status} ${REASONS[r.status] ?? 'Error'}\r\nServer: Kiln MMDS\r\nContent-Type: ${r.contentType}\r\nContent-Length: ${body.length}\r\n`;
  for (const [name, value] of Object.entries(r.headers ?? {})) head += `${name}: ${value}\r\n`;
  if (close) head += 'Connection: close\r\n';
  return Buffer.concat([Buffer.from(`${head}\r\n`, 'latin1'), body]);
}

/**
 * The next whole request at the start of `bytes`: the request and how many bytes it
 * took; null while it is incomplete; a response (400/413) when it is malformed or too
 * large, after which the connection is closed.
 */
export function parseRequest(bytes: Buffer): { request: MmdsRequest; used: number } | { error: MmdsResponse } | null {
  const end = bytes.indexOf('\r\n\r\n');
  if (end < 0) return bytes.length > MAX_REQUEST_BYTES ? { error: text(413, 'Request too large.') } : null;
  const lines = bytes.toString('latin1', 0, end).split('\r\n');
  const m = /^([A-Z]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]!);
  if (!m) return { error: text(400, 'Malformed HTTP request.') };
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon <= 0) return { error: text(400, 'Malformed HTTP header.') };
    headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  const lengthText = headers.get('content-length') ?? '0';
  if (!/^\d{1,6}$/.test(lengthText)) return { error: text(400, 'Invalid Content-Length.') };
  if (headers.get('transfer-encoding') !== undefined)
    return { error: text(501, 'Transfer encodings are not supported.') };
  const used = end + 4 + Number(lengthText);
  if (used > MAX_REQUEST_BYTES) return { error: text(413, 'Request too large.') };
  if (bytes.length < used) return null;
  const connection = (headers.get('connection') ?? '').toLowerCase();
  return {
    request: {
      method: m[1]!,
      path: m[2]!,
      headers,
      close: connection === 'close' || (m[3] === '0' && connection !== 'keep-alive'),
    },
    used,
  };
}

/** One NIC's MMDS service: the data store's reader, its version and format, and its sessions. */
export class MmdsService {
  /** Live session tokens and when each expires (ms, this thread's clock). */
  private readonly tokens = new Map<string, number>();

  constructor(
    private readonly store: { get(): unknown },
    private readonly version: MmdsVersion,
    private readonly imdsCompat: boolean,
    private readonly now: () => number = () => performance.now(),
  ) {}

  answer(req: MmdsRequest): MmdsResponse {
    const rawPath = req.path.split('?')[0]!;
    if (!rawPath.startsWith('/')) return text(400, 'Invalid URI.');
    let path: string;
    try {
      path = decodeURIComponent(rawPath);
    } catch {
      return text(400, 'Invalid URI.');
    }
    if (req.method === 'PUT') return this.newToken(req, path);
    if (req.method !== 'GET') return text(405, 'Not allowed HTTP method.', { Allow: 'GET, PUT' });
    if (this.version === 'V2' && !this.validToken(req))
      return text(401, 'No MMDS token provided or the token is not valid. Use PUT /latest/api/token first.');
    const value = resolve(this.store.get(), path);
    if (value === undefined) return text(404, `Resource not found: ${path}.`);
    const json = !this.imdsCompat && (req.headers.get('accept') ?? '').includes('application/json');
    if (json) return { status: 200, body: JSON.stringify(value), contentType: 'application/json' };
    if (typeof value === 'string') return text(200, value);
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) {
      const keys = Object.keys(value).sort();
      const v = value as Record<string, unknown>;
      return text(
        200,
        keys.map((k) => (typeof v[k] === 'object' && v[k] !== null && !Array.isArray(v[k]) ? `${k}/` : k)).join('\n'),
      );
    }
    return text(501, 'Cannot retrieve value. The value has an unsupported type.');
  }

  private newToken(req: MmdsRequest, path: string): MmdsResponse {
    if (path.replace(/\/+$/, '') !== TOKEN_PATH) return text(404, `Resource not found: ${path}.`);
    if (req.headers.has('x-forwarded-for'))
      return text(400, 'Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For');
    const ttlText =
      req.headers.get('x-metadata-token-ttl-seconds') ?? req.headers.get('x-aws-ec2-metadata-token-ttl-seconds');
    if (ttlText === undefined)
      return text(400, 'Token time to live value not found. Use X-metadata-token-ttl-seconds.');
    const ttl = /^\d{1,6}$/.test(ttlText) ? Number(ttlText) : NaN;
    if (!(ttl >= 1 && ttl <= MAX_TOKEN_TTL_S))
      return text(
        400,
        `Invalid time to live value provided for token: ${ttlText}. Please provide a value between 1 and ${MAX_TOKEN_TTL_S}.`,
      );
    const now = this.now();
    for (const [t, expires] of this.tokens) if (expires <= now) this.tokens.delete(t);
    if (this.tokens.size >= MAX_TOKENS) this.tokens.delete(this.tokens.keys().next().value!);
    const token = randomBytes(32).toString('base64url');
    this.tokens.set(token, now + ttl * 1000);
    return text(200, token);
  }

  private validToken(req: MmdsRequest): boolean {
    const token = req.headers.get('x-metadata-token') ?? req.headers.get('x-aws-ec2-metadata-token');
    if (token === undefined) return false;
    const expires = this.tokens.get(token);
    return expires !== undefined && expires > this.now();
  }
}

/** The value at JSON pointer `path` ("/a/b", "a/b/", "/" for the whole), or undefined. */
export function resolve(root: unknown, path: string): unknown {
  let at: unknown = root;
  for (const raw of path.split('/')) {
    if (raw === '') continue;
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (Array.isArray(at)) {
      if (!/^(0|[1-9]\d*)$/.test(key) || Number(key) >= at.length) return undefined;
      at = at[Number(key)];
    } else if (typeof at === 'object' && at !== null && Object.hasOwn(at, key)) {
      at = (at as Record<string, unknown>)[key];
    } else return undefined;
  }
  return at;
}
