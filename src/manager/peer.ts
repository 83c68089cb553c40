// The daemon-to-daemon channel migrations use: HTTP over TCP between two hosts' kiln
// daemons (`kiln daemon --listen ADDR:PORT --token-file FILE`). Every request is signed
// with the shared token (HMAC-SHA256 over a timestamp, a nonce, the method, the path and
// the body; checked in constant time, within two minutes, each nonce once), so the token
// never crosses the network. The migration stream itself is an HTTP upgrade of one such
// request, piped by each daemon to its VMM's Unix socket: VMMs, jailed, never open
// network sockets of their own.
//
// With `kiln daemon --tls-cert/--tls-key` the channel is HTTPS, and `kiln migrate
// --tls-ca` checks the destination's certificate against that CA (its name or address
// must be the one in `--to`): the migration stream, the guest's memory among it, is then
// encrypted, and the source knows whom it sends to. Without them it crosses in the clear
// (signed requests, but readable): the daemon says so when it listens beyond loopback.
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { request as httpRequest, type ClientRequest, type IncomingMessage, type RequestOptions } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { isIP } from 'node:net';
import type { Socket } from 'node:net';
import { KilnError } from '../errors.js';

export const AUTH_HEADER = 'x-kiln-auth';
const WINDOW_MS = 120_000;

export interface Peer {
  readonly host: string;
  readonly port: number;
  /** PEM CA certificate(s): the channel is TLS and the peer's certificate must chain to one of them. */
  readonly ca?: string;
}

/** A request to `peer`: HTTPS, checking its certificate, when it has a CA. */
function peerRequest(peer: Peer, options: RequestOptions, onResponse?: (res: IncomingMessage) => void): ClientRequest {
  const base = { host: peer.host, port: peer.port, ...options };
  if (peer.ca === undefined) return httpRequest(base, onResponse);
  // The certificate must name the host as given: an address (its IP SAN) or a DNS name.
  return httpsRequest({ ...base, ca: peer.ca, ...(isIP(peer.host) ? {} : { servername: peer.host }) }, onResponse);
}

const TLS_CODE = /^(ERR_SSL_|ERR_TLS_|CERT_|DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT|UNABLE_TO_|EPROTO$)/;

/** Why `peer` could not be reached, with what to check when TLS is involved (or missing). */
function unreachable(peer: Peer, err: NodeJS.ErrnoException): KilnError {
  const code = err.code ?? err.message;
  const where = `the kiln daemon at ${peer.host}:${peer.port}`;
  if (peer.ca !== undefined && TLS_CODE.test(code))
    return new KilnError(
      `cannot reach ${where} over TLS: ${code} (${err.message}); its certificate must chain to --tls-ca and name ${peer.host}, and it must listen with --tls-cert`,
    );
  if (peer.ca === undefined && (code === 'ECONNRESET' || code === 'HPE_INVALID_CONSTANT'))
    return new KilnError(
      `cannot reach ${where}: ${code} (if it listens with --tls-cert, give --tls-ca with the CA that signed its certificate)`,
    );
  return new KilnError(`cannot reach ${where}: ${code}`);
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
    const req = peerRequest(
      peer,
      {
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
    req.on('error', (err: NodeJS.ErrnoException) => reject(unreachable(peer, err)));
    req.end(text);
  });
}

/** Opens the migration stream of `path` on the peer daemon (an HTTP upgrade); resolves with the raw socket. */
export function peerStream(peer: Peer, token: string, path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const req = peerRequest(peer, {
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
    req.on('error', (err: NodeJS.ErrnoException) => reject(unreachable(peer, err)));
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
