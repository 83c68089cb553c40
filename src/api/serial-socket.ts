// The serial console of a kiln-vmm as a Unix socket (a Kiln extension to Firecracker's
// flags, for `kiln console`): the UART writes into a pipe; Kiln copies what comes out
// to its stdout (the console log) and to every connected client, and feeds what
// clients type into the UART's receive FIFO, holding back what does not fit yet.
import { rmSync } from 'node:fs';
import { createServer, Socket, type Server } from 'node:net';
import { serialOutput, type SerialHost } from '../devices/serial.js';
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';

/** Output bytes a console client may have waiting before it misses some. */
const MAX_CLIENT_BACKLOG = 1 << 20;

/** Input bytes held back for the guest before the sources (clients, stdin) are paused. */
const MAX_INPUT_BACKLOG = 64 * 1024;

/**
 * What goes into the guest's serial port: the UART takes what fits in its receive FIFO,
 * the rest waits a little (typing pace). Bytes that come before the VM is built wait for
 * it. Past MAX_INPUT_BACKLOG, feed() says to pause the source until `onRoom` is called.
 */
export class SerialInput {
  private serial: SerialHost | null = null;
  private pending: Buffer = Buffer.alloc(0);
  private timer: NodeJS.Timeout | null = null;
  private full = false;
  /** Called once the backlog has room again after feed() returned false. */
  onRoom: (() => void) | null = null;

  attach(serial: SerialHost): void {
    this.serial = serial;
    this.drain();
  }

  /** Queues `data` for the guest; false: the source should pause until onRoom. */
  feed(data: Buffer): boolean {
    this.pending = this.pending.length === 0 ? data : Buffer.concat([this.pending, data]);
    this.drain();
    this.full = this.pending.length > MAX_INPUT_BACKLOG;
    return !this.full;
  }

  private drain(): void {
    if (!this.serial || this.pending.length === 0) return;
    const taken = this.serial.input(this.pending);
    this.pending = this.pending.subarray(taken);
    if (this.full && this.pending.length <= MAX_INPUT_BACKLOG / 2) {
      this.full = false;
      this.onRoom?.();
    }
    if (this.pending.length > 0 && !this.timer) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.drain();
      }, 5);
      this.timer.unref();
    }
  }

  close(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

export class SerialSocket {
  readonly writeFd: number;
  private readonly reader: Socket;
  private readonly clients = new Set<Socket>();
  private server: Server | null = null;
  private readonly input = new SerialInput();

  constructor(stdoutFd: number) {
    const fds = new Int32Array(2);
    // Non-blocking: the UART's writes (on vCPU threads) drop rather than wait when this
    // thread falls behind; and this thread never waits on stdout or a slow client.
    if (libc.pipe2(fds, libc.O_CLOEXEC | libc.O_NONBLOCK) < 0)
      throw new KilnError(`pipe2 failed: ${libc.errnoName(libc.errno())}`);
    this.writeFd = fds[1]!;
    this.reader = new Socket({ fd: fds[0]!, readable: true, writable: false });
    const out = serialOutput(stdoutFd);
    this.reader.on('data', (chunk: Buffer) => {
      libc.write(out, chunk, chunk.length);
      // A client that stops reading misses output rather than growing the VMM's heap.
      for (const c of this.clients) if (c.writableLength < MAX_CLIENT_BACKLOG) c.write(chunk);
    });
  }

  /** Starts accepting console clients on `path`; input goes to `serial` once attached. */
  async listen(path: string): Promise<void> {
    rmSync(path, { force: true });
    this.server = createServer((client) => {
      this.clients.add(client);
      client.on('data', (data: Buffer) => {
        if (!this.input.feed(data)) {
          // A client typing faster than the guest reads waits (its socket's buffer fills).
          client.pause();
          this.input.onRoom = () => this.clients.forEach((c) => c.resume());
        }
      });
      client.on('close', () => this.clients.delete(client));
      client.on('error', () => client.destroy());
    });
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(path, () => resolve());
    });
  }

  attach(serial: SerialHost): void {
    this.input.attach(serial);
  }

  close(): void {
    this.input.close();
    for (const c of this.clients) c.destroy();
    this.server?.close();
    this.reader.destroy();
    libc.close(this.writeFd);
  }
}
