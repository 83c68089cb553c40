// virtio-console (virtio 1.2, 5.3), one port: queue 0 carries host input to the guest,
// queue 1 the guest's output. The host end is either a pair of fds (the terminal) or a
// Unix socket Kiln listens on, one client at a time (later clients wait their turn);
// output with no client attached is dropped, as on a serial line nobody listens to.
import { KilnError } from '../errors.js';
import * as libc from '../kvm/libc.js';
import type { VirtioBackend, VirtioDeviceType, VirtioQueues } from './device.js';

export const CONSOLE_CONFIG = { cols: 0, rows: 2, maxNrPorts: 4, emergWr: 8, bytes: 12 } as const;
const RX = 0;
const TX = 1;

/** A console's host end: a listening Unix socket, or a pair of fds (tests). */
export interface ConsoleOptions {
  readonly listenFd?: number;
  readonly inFd?: number;
  readonly outFd?: number;
}

export const consoleType: VirtioDeviceType<ConsoleOptions> = {
  deviceId: 3,
  name: 'console',
  maxQueueSize: 256,
  queues: () => 2,
  features: () => 0n,
  configBytes: () => CONSOLE_CONFIG.bytes,
  initConfig: (config) => config.setUint32(CONSOLE_CONFIG.maxNrPorts, 1, true),
};

/** Listens on a Unix socket for the console's client (main thread; the caller owns the fd). */
export function listenConsole(path: string): number {
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK, 0);
  if (fd < 0) throw new KilnError(`socket failed: ${libc.errnoName(libc.errno())}`);
  if (libc.bind(fd, libc.sockaddrUn(path), 110) < 0 || libc.listen(fd, 4) < 0) {
    const e = libc.errno();
    libc.close(fd);
    throw new KilnError(
      `cannot listen on '${path}' for the virtio console: ${libc.errnoName(e)} (${libc.strerror(e)})`,
    );
  }
  return fd;
}

export class ConsoleBackend implements VirtioBackend {
  private readonly listenFd: number;
  private inFd: number;
  private outFd: number;
  private readonly buf = Buffer.alloc(64 * 1024);
  /** Output bytes a client that stopped reading missed. */
  droppedBytes = 0;
  readonly pollFds: Array<{ fd: number; ready(): void }>;

  constructor(
    private readonly rt: VirtioQueues,
    options: ConsoleOptions,
  ) {
    this.listenFd = options.listenFd ?? -1;
    this.inFd = options.inFd ?? -1;
    this.outFd = options.outFd ?? -1;
    this.pollFds =
      this.listenFd >= 0
        ? [{ fd: this.listenFd, ready: () => this.accept() }]
        : this.inFd >= 0
          ? [{ fd: this.inFd, ready: () => this.receive() }]
          : [];
  }

  private accept(): void {
    if (this.inFd >= 0) {
      // One client at a time: the next one waits in the backlog.
      this.rt.setPollable(this.listenFd, false);
      return;
    }
    const fd = libc.accept4(this.listenFd, null, null, libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
    if (fd < 0) return;
    this.inFd = fd;
    this.outFd = fd;
    this.rt.setPollable(this.listenFd, false);
    this.rt.watchFd(fd, () => this.receive());
  }

  private dropClient(): void {
    if (this.listenFd < 0) return;
    this.rt.unwatchFd(this.inFd);
    libc.close(this.inFd);
    this.inFd = -1;
    this.outFd = -1;
    this.rt.setPollable(this.listenFd, true);
  }

  /** The VM is stopping: hang up on the client (the listening socket is the VM's). */
  close(): void {
    if (this.listenFd >= 0 && this.inFd >= 0) libc.close(this.inFd);
  }

  queueNotified(q: number): void {
    if (q === TX) this.transmit();
    else if (this.inFd >= 0) {
      this.rt.setPollable(this.inFd, true);
      this.receive();
    }
  }

  private transmit(): void {
    const queue = this.rt.queue(TX);
    const chain = this.rt.chain;
    let done = 0;
    while (queue.pop(chain)) {
      for (let i = 0; i < chain.count; i++) {
        if (chain.writable[i] || this.outFd < 0) continue;
        const bytes = this.rt.mem.regionBytes(chain.region[i]!);
        for (let off = 0; off < chain.length[i]!;) {
          const n = libc.write(
            this.outFd,
            bytes.subarray(chain.offset[i]! + off, chain.offset[i]! + chain.length[i]!),
            chain.length[i]! - off,
          );
          if (n < 0) {
            const e = libc.errno();
            if (e === libc.EINTR) continue;
            // A client that stopped reading misses output, as on a serial line; the guest never waits.
            if (e === libc.EAGAIN) {
              if (this.droppedBytes === 0) this.rt.log('virtio-console: the client is not reading; output is dropped');
              this.droppedBytes += chain.length[i]! - off;
              break;
            }
            this.dropClient();
            break;
          }
          off += n;
        }
      }
      queue.push(chain.head, 0);
      done++;
    }
    if (done > 0) this.rt.notifyUsed(TX);
  }

  private receive(): void {
    const queue = this.rt.queue(RX);
    const chain = this.rt.chain;
    let done = 0;
    while (this.inFd >= 0) {
      if (!queue.enabled || queue.pending() === 0) {
        this.rt.setPollable(this.inFd, false);
        break;
      }
      // Read no more than the next buffer holds, so nothing read is lost.
      queue.peek(chain);
      const n = libc.read(this.inFd, this.buf, Math.min(this.buf.length, chain.writableBytes));
      if (n === 0 || (n < 0 && libc.errno() !== libc.EAGAIN && libc.errno() !== libc.EINTR)) {
        this.dropClient();
        break;
      }
      if (n < 0) break;
      queue.pop(chain);
      queue.push(chain.head, chain.writeFrom(this.rt.mem, 0, this.buf, n));
      done++;
    }
    if (done > 0) this.rt.notifyUsed(RX);
  }
}
