// The daemon-to-daemon channel migrations use: HTTP over TCP between two hosts' kiln
// daemons (`kiln daemon --listen ADDR:PORT --token-file FILE`). Every request is signed
// with the shared token (HMAC-SHA256 over a timestamp, a nonce, the method, the path and
// the body; checked in constant time, within two minutes, each nonce once), so the token
// never crosses the network. The migration stream itself is an HTTP upgrade of one such
// request, piped by each daemon to its VMM's Unix socket: VMMs, jailed, never open
// network sockets of their own.
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { request, type IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import { KilnError } from '../errors.js';

export const AUTH_HEADER = 'x-kiln-auth';
const WINDOW_MS = 120_000;

export interface Peer {
  readonly host: string;
  readonly port: number;
}

/** ADDR:PORT (an IPv6 address in brackets); port 0 (any free port) only with `anyPort`. */
export function parsePeer(text: string, what = 'the address', anyPort = false): Peer {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]\s]+):(\d{1,5})$/.exec(text);
  if (!m || Number(m[2]) > 65535 || (Number(m[2]) === 0 && !anyPort))
    throw new KilnError(`${what} must be ADDR:PORT (e.g. 192.0.2.7:7077), not '${text}'`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

/** Reads a token file: its first line, at least 16 characters. */
export function readToken(text: string, file: string): string {
  const token = text.split('\n')[0]!.trim();
  if (token.length < 16) throw new KilnError(`the token in ${file} is too short (at least 16 characters)`);
  return token;
}

function mac(token: string, parts: readonly string[]): Buffer {
  return createHmac('sha256', token).update(parts.join('\n')).digest();
}

const bodyDigest = (body: string) => createHash('sha256').update(body).digest('hex');

export function sign(token: string, method: string, path: string, body: string): string {
  const ts = String(Date.now());
  const nonce = randomBytes(16).toString('hex');
  return `${ts}.${nonce}.${mac(token, [ts, nonce, method, path, bodyDigest(body)]).toString('hex')}`;
}

/** Checks signed requests; remembers nonces for the window so none is accepted twice. */
export class Verifier {
  private readonly seen = new Map<string, number>();

  constructor(private readonly token: string) {}

  check(header: string | undefined, method: string, path: string, body: string): boolean {
    const now = Date.now();
    for (const [n, t] of this.seen) if (t < now - WINDOW_MS) this.seen.delete(n);
    const m = /^(\d{1,16})\.([0-9a-f]{32})\.([0-9a-f]{64})$/.exec(header ?? '');
    if (!m) return false;
    const ts = Number(m[1]);
    if (Math.abs(now - ts) > WINDOW_MS || this.seen.has(m[2]!)) return false;
    const ok = timingSafeEqual(
      mac(this.token, [m[1]!, m[2]!, method, path, bodyDigest(body)]),
      Buffer.from(m[3]!, 'hex'),
    );
    if (ok) this.seen.set(m[2]!, ts);
    return ok;
  }
}

/** One signed JSON call to the peer daemon; its error answers become KilnErrors. */
export function peerCall<T>(peer: Peer, token: string, method: string, path: string, body?: unknown): Promise<T> {
  const text = body === undefined ? '' : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: peer.host,
        port: peer.port,
        method,
        path,
        headers: {
          [AUTH_HEADER]: sign(token, method, path, text),
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(text),
        },
        timeout: 5 * 60_000,
      },
      (res: IncomingMessage) => {
        let data = '';
        res.setEncoding('utf8').on('data', (c: string) => (data += c));
        res.on('end', () => {
          let parsed: unknown = null;
          try {
            parsed = data ? JSON.parse(data) : null;
          } catch {
            // said below
          }
          if (res.statusCode === 200) return resolve(parsed as T);
          const error = (parsed as { error?: unknown } | null)?.error;
          reject(
            new KilnError(
              `the kiln daemon at ${peer.host}:${peer.port}: ${typeof error === 'string' ? error : `answered ${res.statusCode}`}`,
            ),
          );
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('ETIMEDOUT')));
    req.on('error', (err: NodeJS.ErrnoException) =>
      reject(new KilnError(`cannot reach the kiln daemon at ${peer.host}:${peer.port}: ${err.code ?? err.message}`)),
    );
    req.end(text);
  });
}

/** Opens the migration stream of `path` on the peer daemon (an HTTP upgrade); resolves with the raw socket. */
export function peerStream(peer: Peer, token: string, path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const req = request({
      host: peer.host,
      port: peer.port,
      method: 'POST',
      path,
      headers: { [AUTH_HEADER]: sign(token, 'POST', path, ''), connection: 'Upgrade', upgrade: 'kiln-migration' },
    });
    req.on('upgrade', (_res, socket: Socket, head: Buffer) => {
      if (head.length > 0) socket.unshift(head);
      resolve(socket);
    });
    req.on('response', (res: IncomingMessage) => {
      res.resume();
      reject(
        new KilnError(`the kiln daemon at ${peer.host}:${peer.port} refused the migration stream (${res.statusCode})`),
      );
    });
    req.on('error', (err: NodeJS.ErrnoException) =>
      reject(new KilnError(`cannot reach the kiln daemon at ${peer.host}:${peer.port}: ${err.code ?? err.message}`)),
    );
    req.end();
  });
}

/** Pipes two sockets into each other; either ending or failing ends both. */
export function splice(a: Socket, b: Socket): void {
  a.pipe(b);
  b.pipe(a);
  const end = () => {
    a.destroy();
    b.destroy();
  };
  a.on('error', end).on('close', end);
  b.on('error', end).on('close', end);
}
