// Kiln's live-migration protocol on the wire: framed messages over one stream (TCP, a
// Unix socket, or TLS over either), in Cloud Hypervisor's shape (configuration, memory
// in iterations, state, completion). Each frame is an 8-byte header (type, 3 reserved
// bytes, payload length as a little-endian u32) and its payload. Control frames carry
// JSON; PAGES frames carry guest pages; CONFIG and STATE are in the snapshot state
// file's framing (snapshot/format.ts: magic, version, checksum over all of it).
//
// The conversation (S: source, D: destination):
//   D HELLO {protocol, versions, nonce}     S AUTH {version, proof: HMAC-SHA256(token, nonce)}
//   D OK                                    S CONFIG {config, boot, compat, memoryBytes}
//   D OK (the VM is built, memory empty)    S PAGES ... (iteration 0: every non-zero page;
//                                             then the pages dirtied meanwhile, again and again;
//                                             with copy_disks, DISK frames the same way)
//   S STATE (vCPUs paused, last pages sent) D READY (state restored, disks locked)
//   S GO (the source ends)                  D runs the VM
// Either side may send ERROR {message} instead and close; the token itself never crosses.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { KilnError } from '../errors.js';

export const PROTOCOL = 'kiln-migration';
/** The protocol versions this Kiln speaks (a source picks the highest both speak). */
export const VERSIONS: readonly number[] = [1];

export const enum Frame {
  HELLO = 1,
  AUTH = 2,
  OK = 3,
  CONFIG = 4,
  PAGES = 5,
  STATE = 6,
  READY = 7,
  GO = 8,
  ERROR = 9,
  DISK = 10,
}

const HEADER = 8;
/** The largest payload either side accepts: a STATE (the state file's own cap) or a PAGES batch. */
export const MAX_PAYLOAD = 64 * 1024 * 1024;
/** Pages per PAGES frame (1 MiB of data). */
export const PAGES_PER_FRAME = 256;

export class MigrationError extends KilnError {}

export function frame(type: Frame, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const out = Buffer.allocUnsafe(HEADER + payload.length);
  out.writeUInt8(type, 0);
  out.writeUIntLE(0, 1, 3);
  out.writeUInt32LE(payload.length, 4);
  out.set(payload, HEADER);
  return out;
}

export const jsonFrame = (type: Frame, body: unknown): Buffer => frame(type, Buffer.from(JSON.stringify(body)));

/** The HMAC that proves a side knows the token without sending it. */
export function proof(token: string, nonce: Buffer): Buffer {
  return createHmac('sha256', token).update(nonce).digest();
}

/** Constant-time check of a proof. */
export function proofMatches(token: string, nonce: Buffer, given: unknown): boolean {
  if (typeof given !== 'string' || !/^[0-9a-f]{64}$/.test(given)) return false;
  return timingSafeEqual(proof(token, nonce), Buffer.from(given, 'hex'));
}

export const newNonce = (): Buffer => randomBytes(32);

export interface Message {
  readonly type: Frame;
  readonly payload: Buffer;
}

/**
 * Reads frames off a stream in order. `next()` resolves with the next whole frame, or
 * rejects when the stream ends, fails, goes quiet for `idleMs`, or sends a frame too large.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { resolve: (m: Message) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly stream: Duplex,
    private readonly peer: string,
    private readonly idleMs = 30_000,
  ) {
    stream.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      this.deliver();
    });
    stream.on('end', () => this.fail(new MigrationError(`${peer} closed the connection`)));
    stream.on('close', () => this.fail(new MigrationError(`${peer} closed the connection`)));
    stream.on('error', (err: NodeJS.ErrnoException) =>
      this.fail(new MigrationError(`the connection to ${peer} failed: ${err.code ?? err.message}`)),
    );
  }

  /** Ends waiting with `err` (the first failure wins); later next() calls reject with it too. */
  fail(err: Error): void {
    this.failure ??= err;
    this.clearTimer();
    const w = this.waiter;
    this.waiter = null;
    w?.reject(this.failure);
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private take(n: number): Buffer {
    // Only the chunks that hold the frame are joined (the rest stay as they came).
    let count = 0;
    let have = 0;
    while (have < n) have += this.chunks[count++]!.length;
    const whole = count === 1 ? this.chunks[0]! : Buffer.concat(this.chunks.slice(0, count), have);
    const rest = whole.subarray(n);
    this.chunks = rest.length > 0 ? [rest, ...this.chunks.slice(count)] : this.chunks.slice(count);
    this.buffered -= n;
    return whole.subarray(0, n);
  }

  private peekHeader(): { type: number; length: number } | null {
    if (this.buffered < HEADER) return null;
    if (this.chunks[0]!.length < HEADER) this.chunks = [Buffer.concat(this.chunks, this.buffered)];
    const head = this.chunks[0]!;
    return { type: head.readUInt8(0), length: head.readUInt32LE(4) };
  }

  private deliver(): void {
    if (!this.waiter) {
      // Nobody waits: stop reading until someone does (the memory stream is large).
      if (this.buffered > MAX_PAYLOAD + HEADER) this.stream.pause();
      return;
    }
    const head = this.peekHeader();
    if (!head) return;
    if (head.length > MAX_PAYLOAD) {
      this.fail(new MigrationError(`${this.peer} sent a frame of ${head.length} bytes (at most ${MAX_PAYLOAD})`));
      this.stream.destroy();
      return;
    }
    if (this.buffered < HEADER + head.length) return;
    const bytes = this.take(HEADER + head.length);
    const w = this.waiter;
    this.waiter = null;
    this.clearTimer();
    w.resolve({ type: head.type as Frame, payload: bytes.subarray(HEADER) });
  }

  next(): Promise<Message> {
    if (this.waiter) throw new MigrationError('one frame at a time');
    return new Promise<Message>((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.deliver();
      if (!this.waiter) return;
      if (this.failure) return this.fail(this.failure);
      this.stream.resume();
      this.timer = setTimeout(
        () => this.fail(new MigrationError(`${this.peer} sent nothing for ${this.idleMs / 1000} s`)),
        this.idleMs,
      );
    });
  }

  /** The next frame, which must be `type` (an ERROR frame becomes the peer's error). */
  async expect(type: Frame, what: string): Promise<Buffer> {
    const m = await this.next();
    if (m.type === Frame.ERROR) throw new MigrationError(`${this.peer}: ${errorText(m.payload)}`);
    if (m.type !== type) throw new MigrationError(`${this.peer} sent frame type ${m.type} where ${what} was due`);
    return m.payload;
  }
}

export function errorText(payload: Buffer): string {
  try {
    const m = (JSON.parse(payload.toString()) as { message?: unknown }).message;
    return typeof m === 'string' ? m : 'an error without a message';
  } catch {
    return 'an unreadable error';
  }
}

export function parseJson(payload: Buffer, what: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(payload.toString());
  } catch {
    throw new MigrationError(`${what} is not valid JSON`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new MigrationError(`${what} is not an object`);
  return v as Record<string, unknown>;
}

/** Writes `data`, resolving once the stream takes more (backpressure: at most one buffer queued). */
export function send(stream: Duplex, data: Uint8Array): Promise<void> {
  if (stream.destroyed) return Promise.reject(new MigrationError('the connection is closed'));
  if (stream.write(data)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (err?: Error) => {
      stream.off('drain', ok);
      stream.off('close', closed);
      if (err) reject(err);
      else resolve();
    };
    const ok = () => done();
    const closed = () => done(new MigrationError('the connection closed while sending'));
    stream.once('drain', ok);
    stream.once('close', closed);
  });
}

/** A migration address: `tcp:HOST:PORT` or `unix:PATH`. */
export type Address = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export function parseAddress(text: string, what: string): Address {
  if (text.startsWith('unix:') && text.length > 5) return { kind: 'unix', path: text.slice(5) };
  const m = /^tcp:(\[[0-9a-fA-F:.]+\]|[^:[\]]+):(\d{1,5})$/.exec(text);
  if (m && Number(m[2]) <= 65535) return { kind: 'tcp', host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
  throw new MigrationError(`${what} must be tcp:HOST:PORT or unix:PATH, not ${JSON.stringify(text)}`);
}

export const formatAddress = (a: Address): string =>
  a.kind === 'unix' ? `unix:${a.path}` : `tcp:${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
