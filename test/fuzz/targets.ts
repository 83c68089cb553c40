// Fuzz targets: every guest-facing parser and backend, and the API fed raw HTTP, each
// under fast-check with two oracles besides "nothing throws that should not":
// - time: every input finishes within a bound (a hang or a spin is a finding);
// - memory: heap and RSS stay within a bound over the whole run (growth is a finding).
// `npm run fuzz` runs them all for a million inputs (test/fuzz/run.ts); CI runs a short
// seeded slice (test/fuzz/fuzz.test.ts).
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import type { Server } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { listenApi } from '../../src/api/server.js';
import { Vmm } from '../../src/api/vmm.js';
import { loadKernel } from '../../src/boot/loader.js';
import { allocateDeviceState } from '../../src/devices/catalogue.js';
import { KilnError } from '../../src/errors.js';
import * as libc from '../../src/kvm/libc.js';
import { GuestMemory, ramRanges } from '../../src/memory/guest-memory.js';
import { msixCapability } from '../../src/pci/msix.js';
import { PciRoot } from '../../src/pci/root.js';
import { openDisk } from '../../src/platform/virtio.js';
import { BalloonControl } from '../../src/virtio/balloon.js';
import type { VirtioDeviceConfig } from '../../src/virtio/catalogue.js';
import { COMMON_CFG } from '../../src/virtio/common-config.js';
import { DescriptorChain, QUEUE_RECORD, SplitQueue, VirtqueueError } from '../../src/virtio/queue.js';
import { listenConsole } from '../../src/virtio/console.js';
import { listenVsock, VSOCK_HDR, VSOCK_HOST_CID } from '../../src/virtio/vsock.js';
import { entropyCommonConfig, FakeDevice } from '../virtio/fake-driver.js';
import { MmdsService } from '../../src/mmds/service.js';
import { MAX_CONNECTIONS as MMDS_MAX_CONNECTIONS, MAX_QUEUED_FRAMES, MmdsStack } from '../../src/mmds/stack.js';

export interface FuzzTarget<T = unknown> {
  readonly name: string;
  /** Its share of a full run's inputs. */
  readonly weight: number;
  readonly arbitrary: fc.Arbitrary<T>;
  setup(): void;
  /** One input; throws on a finding. */
  run(input: T): void | Promise<void>;
  teardown(): void | Promise<void>;
}

/** A finding: what failed, on which input. */
export class Finding extends Error {}

// ---- the virtqueue walker and chain copies ----
function virtqueueTarget(): FuzzTarget<{ descs: number[][]; avail: number[]; idx: number; eventIdx: boolean }> {
  const RAM = 1 << 20;
  const SIZE = 16;
  let addr = 0n;
  let mem: GuestMemory;
  const chain = new DescriptorChain();
  const u32 = fc.oneof(fc.integer({ min: 0, max: RAM * 2 }), fc.integer({ min: 0, max: 0xffffffff }));
  return {
    name: 'virtqueue',
    weight: 25,
    arbitrary: fc.record({
      descs: fc.array(
        fc.tuple(
          u32,
          fc.oneof(fc.integer({ min: 0, max: 8192 }), u32),
          fc.integer({ min: 0, max: 7 }),
          fc.integer({ min: 0, max: 40 }),
        ),
        { minLength: SIZE + 8, maxLength: SIZE + 8 },
      ),
      avail: fc.array(fc.oneof(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 0, max: 0xffff })), {
        minLength: SIZE,
        maxLength: SIZE,
      }),
      idx: fc.oneof(fc.integer({ min: 0, max: SIZE }), fc.integer({ min: 0, max: 0xffff })),
      eventIdx: fc.boolean(),
    }),
    setup() {
      addr = libc.mmap(null, RAM, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0);
      mem = GuestMemory.attach({ regions: [{ slot: 0, guestPhysAddr: 0, size: RAM, hostAddr: addr }] });
    },
    run({ descs, avail, idx, eventIdx }) {
      mem.fill(0, 0x10000, 0);
      descs.forEach(([a, len, flags, next], i) => {
        // The first SIZE are the ring's table; the rest an indirect table at 0x8000.
        const at = i < SIZE ? 0x1000 + 16 * i : 0x8000 + 16 * (i - SIZE);
        mem.writeU32(at, a! >>> 0);
        mem.writeU32(at + 4, 0);
        mem.writeU32(at + 8, len! >>> 0);
        mem.writeU16(at + 12, flags!);
        mem.writeU16(at + 14, next!);
      });
      avail.forEach((h, i) => mem.writeU16(0x2000 + 4 + 2 * i, h));
      mem.writeU16(0x2000 + 2, idx);
      const rec = new DataView(new SharedArrayBuffer(QUEUE_RECORD.bytes));
      rec.setUint16(QUEUE_RECORD.size, SIZE, true);
      rec.setUint32(QUEUE_RECORD.desc, 0x1000, true);
      rec.setUint32(QUEUE_RECORD.driver, 0x2000, true);
      rec.setUint32(QUEUE_RECORD.device, 0x3000, true);
      rec.setUint16(QUEUE_RECORD.enable, 1, true);
      const q = new SplitQueue(mem, rec, () => eventIdx);
      q.load();
      const out = Buffer.alloc(64 * 1024);
      try {
        for (let n = 0; n < 4 * SIZE && q.pop(chain); n++) {
          for (let s = 0; s < chain.count; s++)
            if (chain.region[s] !== 0 || chain.offset[s]! + chain.length[s]! > RAM)
              throw new Finding(`a chain segment outside RAM: offset ${chain.offset[s]} length ${chain.length[s]}`);
          chain.readInto(mem, 0, out, out.length);
          chain.writeFrom(mem, 0, out, Math.min(out.length, chain.writableBytes));
          q.push(chain.head, 0);
        }
      } catch (err) {
        if (!(err instanceof VirtqueueError)) throw err;
      }
    },
    teardown() {
      libc.munmap(addr, RAM);
    },
  };
}

// ---- the virtio-pci common configuration (the register file a driver writes) ----
function commonConfigTarget(): FuzzTarget<
  Array<{ offset: number; width: 1 | 2 | 4 | 8; value: bigint; write: boolean }>
> {
  return {
    name: 'virtio-pci-common-config',
    weight: 20,
    arbitrary: fc.array(
      fc.record({
        offset: fc.integer({ min: 0, max: COMMON_CFG.bytes + 4 }),
        width: fc.constantFrom(1 as const, 2 as const, 4 as const, 8 as const),
        value: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        write: fc.boolean(),
      }),
      { maxLength: 40 },
    ),
    setup() {},
    run(ops) {
      const { cfg: c } = entropyCommonConfig();
      for (const op of ops) {
        const data = new Uint8Array(op.width);
        let v = op.value;
        for (let i = 0; i < op.width; i++, v >>= 8n) data[i] = Number(v & 0xffn);
        if (op.write) c.write(op.offset, data);
        else c.read(op.offset, data);
      }
    },
    teardown() {},
  };
}

// ---- PCI configuration space and the MSI-X capability ----
function pciConfigTarget(): FuzzTarget<Array<{ offset: number; bytes: Uint8Array; write: boolean }>> {
  return {
    name: 'pci-config-msix',
    weight: 10,
    arbitrary: fc.array(
      fc.record({
        offset: fc.integer({ min: 0, max: 4095 }),
        bytes: fc.uint8Array({ minLength: 1, maxLength: 4 }),
        write: fc.boolean(),
      }),
      { maxLength: 40 },
    ),
    setup() {},
    run(ops) {
      const root = new PciRoot(allocateDeviceState('pci-root', { role: 'cf8' }));
      root.addFunction(1, {
        vendorId: 0x1af4,
        deviceId: 0x1041,
        classCode: 0x020000,
        bars: [
          { kind: 'memory32', size: 0x4000, address: 0xc0000000 },
          { kind: 'io', size: 0x20, address: 0xc000 },
        ],
        capabilities: [msixCapability({ vectors: 4, tableBar: 0, tableOffset: 0x2000, pbaBar: 0, pbaOffset: 0x3000 })],
      });
      for (const op of ops) {
        // Accesses stay naturally aligned and inside the 4 KiB space, as the ECAM/CF8 decoders deliver them.
        const width = op.bytes.length === 3 ? 2 : op.bytes.length;
        const at = Math.min(op.offset - (op.offset % width), 4096 - width);
        root.access(1, at, op.bytes.subarray(0, width), op.write);
      }
    },
    teardown() {},
  };
}

// ---- the kernel loaders (ELF, bzImage) ----
function loaderTarget(): FuzzTarget<Uint8Array> {
  const elfish = fc.uint8Array({ minLength: 64, maxLength: 4096 }).map((b) => {
    b.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0);
    return b;
  });
  const bzish = fc.uint8Array({ minLength: 0x280, maxLength: 8192 }).map((b) => {
    const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    dv.setUint16(0x1fe, 0xaa55, true);
    dv.setUint32(0x202, 0x53726448, true);
    return b;
  });
  return {
    name: 'kernel-loaders',
    weight: 10,
    arbitrary: fc.oneof(elfish, bzish, fc.uint8Array({ maxLength: 2048 })),
    setup() {},
    run(kernel) {
      try {
        loadKernel({ kernel, cmdline: 'console=ttyS0', ram: ramRanges(64 << 20), rsdp: 0xe0000 });
      } catch (err) {
        if (!(err instanceof KilnError)) throw new Finding(`not a KilnError: ${(err as Error).stack}`);
      }
    },
    teardown() {},
  };
}

// ---- virtio backends over a fake driver ----
type Chains = Array<{ queue: number; buffers: Array<{ read?: Uint8Array; write?: number }> }>;

/** A device for a backend target, and what to close with it (the fds a VM would own). */
interface Made {
  readonly device: VirtioDeviceConfig;
  readonly fds?: readonly number[];
  /** The device takes host commands (a control eventfd); `opened` then gives it some. */
  readonly control?: boolean;
  readonly opened?: (dev: FakeDevice) => void;
}

function backendTarget(
  name: string,
  weight: number,
  make: () => Made,
  chains: fc.Arbitrary<Chains>,
  cleanup = () => {},
): FuzzTarget<Chains> {
  let dev: FakeDevice | null = null;
  let made: Made | null = null;
  const open = () => {
    made = make();
    dev = new FakeDevice(made.device, { control: made.control ?? false });
    made.opened?.(dev);
  };
  const close = () => {
    dev?.close();
    for (const fd of made?.fds ?? []) libc.close(fd);
    dev = null;
    made = null;
  };
  return {
    name,
    weight,
    arbitrary: chains,
    setup: open,
    run(input) {
      const d = dev!;
      for (const c of input) {
        const q = c.queue % d.queues;
        d.offer(q, c.buffers);
        d.notify(q);
        d.used(q);
        d.poll(0);
      }
      for (let q = 0; q < d.queues; q++) d.used(q);
      if (d.needsReset !== null) {
        // A hostile request is the guest's fault and ends in NEEDS_RESET; an internal error is Kiln's.
        if (d.needsReset.startsWith('internal error')) throw new Finding(`${name}: ${d.needsReset}`);
        close();
        open();
      }
    },
    teardown() {
      close();
      cleanup();
    },
  };
}

const bytes = (max: number) => fc.uint8Array({ maxLength: max });
const chainOf = (queues: number, readable: fc.Arbitrary<Uint8Array>, maxWrite: number): fc.Arbitrary<Chains> =>
  fc.array(
    fc.record({
      queue: fc.integer({ min: 0, max: queues - 1 }),
      buffers: fc.array(
        fc.oneof(
          readable.map((read) => ({ read })),
          fc.integer({ min: 0, max: maxWrite }).map((write) => ({ write })),
        ),
        { minLength: 1, maxLength: 4 },
      ),
    }),
    { maxLength: 8 },
  );

function blkRequest(): fc.Arbitrary<Uint8Array> {
  return fc
    .record({
      type: fc.constantFrom(0, 1, 4, 8, 11, 13, 99),
      sector: fc.oneof(fc.bigInt({ min: 0n, max: 64n }), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })),
    })
    .map(({ type, sector }) => {
      const h = Buffer.alloc(16);
      h.writeUInt32LE(type, 0);
      h.writeBigUInt64LE(sector, 8);
      return new Uint8Array(h);
    });
}

function vsockPacket(): fc.Arbitrary<Uint8Array> {
  return fc
    .record({
      op: fc.integer({ min: 0, max: 8 }),
      dstPort: fc.constantFrom(1234, 1235, 9999),
      srcPort: fc.integer({ min: 1000, max: 1003 }),
      len: fc.oneof(fc.integer({ min: 0, max: 64 }), fc.integer({ min: 0, max: 0xffffffff })),
      bufAlloc: fc.oneof(fc.constant(1 << 20), fc.integer({ min: 0, max: 0xffffffff })),
      fwdCnt: fc.integer({ min: 0, max: 0xffffffff }),
      payload: bytes(64),
    })
    .map((p) => {
      const h = Buffer.alloc(VSOCK_HDR.bytes);
      h.writeBigUInt64LE(3n, VSOCK_HDR.srcCid);
      h.writeBigUInt64LE(BigInt(VSOCK_HOST_CID), VSOCK_HDR.dstCid);
      h.writeUInt32LE(p.srcPort, VSOCK_HDR.srcPort);
      h.writeUInt32LE(p.dstPort, VSOCK_HDR.dstPort);
      h.writeUInt32LE(p.len, VSOCK_HDR.len);
      h.writeUInt16LE(1, VSOCK_HDR.type);
      h.writeUInt16LE(p.op, VSOCK_HDR.op);
      h.writeUInt32LE(p.bufAlloc, VSOCK_HDR.bufAlloc);
      h.writeUInt32LE(p.fwdCnt, VSOCK_HDR.fwdCnt);
      return new Uint8Array(Buffer.concat([h, p.payload]));
    });
}

function pfnArray(): fc.Arbitrary<Uint8Array> {
  return fc
    .array(fc.oneof(fc.integer({ min: 0, max: 2047 }), fc.integer({ min: 0, max: 0xffffffff })), { maxLength: 300 })
    .map((pfns) => new Uint8Array(Uint32Array.from(pfns).buffer));
}

function backendTargets(): FuzzTarget<Chains>[] {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-fuzz-'));
  const image = join(dir, 'disk.img');
  writeFileSync(image, Buffer.alloc(64 * 512));
  // vsock's host side: one port with a listener that never accepts (a peer that does not read), one with none.
  const stalled = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
  libc.bind(stalled, libc.sockaddrUn(join(dir, 'v.sock_1234')), libc.sockaddr_un.size);
  libc.listen(stalled, 2);
  let vsockIndex = 0;
  // passt's side: a socket pair whose far end is never read.
  const pair = new Int32Array(2);
  libc.socketpair(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC, 0, pair);
  const cleanup = () => {
    libc.close(stalled);
    rmSync(dir, { recursive: true, force: true });
  };
  return [
    backendTarget('virtio-rng', 4, () => ({ device: { kind: 'rng', options: {} } }), chainOf(1, bytes(16), 1 << 20)),
    backendTarget(
      'virtio-blk',
      8,
      () => {
        const { fd, options } = openDisk({ path: image, readOnly: false }, 0, true);
        return { device: { kind: 'blk', options }, fds: [fd] };
      },
      chainOf(1, fc.oneof(blkRequest(), bytes(1024)), 4096),
    ),
    backendTarget(
      'virtio-vsock',
      8,
      () => {
        const path = join(dir, `v${vsockIndex++ % 2}.sock`);
        rmSync(path, { force: true });
        const { fd, options } = listenVsock(path, 3);
        return { device: { kind: 'vsock', options: { ...options, udsPath: join(dir, 'v.sock') } }, fds: [fd] };
      },
      chainOf(3, vsockPacket(), 4096),
    ),
    backendTarget(
      'virtio-net-passt',
      6,
      () => ({ device: { kind: 'net', options: { fd: pair[0]!, mac: '06:00:00:00:00:01', backend: 'passt' } } }),
      chainOf(2, bytes(2000), 2048),
    ),
    backendTarget(
      'virtio-console',
      4,
      () => {
        // A client that connects and never reads: output must be dropped, never waited on.
        const path = join(dir, 'console.sock');
        rmSync(path, { force: true });
        const listenFd = listenConsole(path);
        const client = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC | libc.SOCK_NONBLOCK, 0);
        libc.connect(client, libc.sockaddrUn(path), libc.sockaddr_un.size);
        return { device: { kind: 'console', options: { listenFd } }, fds: [listenFd, client] };
      },
      chainOf(2, bytes(65536), 4096),
    ),
    backendTarget(
      'virtio-balloon',
      5,
      () => ({ device: { kind: 'balloon', options: { targetPages: 64, deflateOnOom: false } } }),
      chainOf(4, pfnArray(), 256),
    ),
    backendTarget(
      'virtio-balloon-hinting',
      3,
      () => ({
        device: { kind: 'balloon', options: { targetPages: 0, deflateOnOom: false, freePageHinting: true } },
        control: true,
        // A run the driver's hints belong to (ID 2), so hinted buffers are freed.
        opened: (dev) => {
          new BalloonControl(dev.state, dev.controlFd).startHinting(true);
          dev.poll(0);
        },
      }),
      // Queue 3 is hinting's: command IDs (STOP, DONE, the run's, others) and buffers to free.
      chainOf(
        5,
        fc.oneof(
          fc.constantFrom(0, 1, 2, 3, 0xffffffff).map((id) => new Uint8Array(Uint32Array.of(id).buffer)),
          bytes(8),
        ),
        3 * 4096,
      ).map((chains) => chains.map((c) => ({ ...c, queue: c.queue % 2 === 0 ? 3 : c.queue }))),
    ),
  ].map((t, i, all) => (i === all.length - 1 ? { ...t, teardown: () => (t.teardown(), cleanup()) } : t));
}

// ---- the API, fed raw HTTP ----
function apiTarget(): FuzzTarget<Uint8Array> {
  let dir = '';
  let server: Server | null = null;
  let sock = '';
  const request = fc
    .record({
      method: fc.constantFrom('GET', 'PUT', 'PATCH', 'DELETE', 'BREW', 'G\u0000T', ''),
      path: fc.constantFrom(
        '/',
        '/machine-config',
        '/drives/x',
        '/actions',
        '/vm',
        '/cpu-config',
        '/balloon/hinting/start',
        '/%%',
        '/' + 'a'.repeat(300),
      ),
      headers: fc.array(fc.string({ maxLength: 40 }), { maxLength: 4 }),
      body: fc.oneof(fc.string({ maxLength: 200 }), fc.json({ maxDepth: 3 })),
    })
    .map(
      ({ method, path, headers, body }) =>
        new Uint8Array(
          Buffer.from(
            `${method} ${path} HTTP/1.1\r\nHost: x\r\n${headers.join('\r\n')}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
          ),
        ),
    );
  return {
    name: 'api-raw-http',
    weight: 6,
    arbitrary: fc.oneof(request, fc.uint8Array({ maxLength: 512 })),
    async setup() {
      dir = mkdtempSync(join(tmpdir(), 'kiln-fuzz-api-'));
      sock = join(dir, 'api.sock');
      server = await listenApi(sock, new Vmm('fuzz', -1, () => undefined));
    },
    async run(input) {
      // Every connection gets an answer or is closed; none is left hanging.
      await new Promise<void>((resolve, reject) => {
        const s = createConnection(sock);
        const timer = setTimeout(() => {
          s.destroy();
          reject(
            new Finding(
              `no answer within 5 s to ${JSON.stringify(Buffer.from(input).toString('latin1').slice(0, 200))}`,
            ),
          );
        }, 5_000);
        s.on('data', () => undefined);
        s.on('error', () => undefined);
        s.on('close', () => {
          clearTimeout(timer);
          resolve();
        });
        s.end(input);
      });
    },
    async teardown() {
      await new Promise((resolve) => server!.close(resolve));
      rmSync(dir, { recursive: true, force: true });
    },
  } as FuzzTarget<Uint8Array>;
}

// ---- MMDS's network stack and HTTP service, fed the guest's frames ----
function mmdsTarget(): FuzzTarget<Uint8Array> {
  const MMDS_IP = 0xa9fea9fe;
  let stack: MmdsStack;
  // Mostly well-formed IPv4 TCP to MMDS (so the TCP and HTTP code is reached), with any
  // flags, numbers, options and payload; sometimes raw bytes.
  const tcp = fc
    .record({
      port: fc.integer({ min: 1, max: 40 }),
      dstPort: fc.oneof(fc.constant(80), fc.integer({ min: 0, max: 0xffff })),
      seq: fc.integer({ min: 0, max: 0xffffffff }),
      ack: fc.integer({ min: 0, max: 0xffffffff }),
      flags: fc.integer({ min: 0, max: 0xff }),
      offsetWords: fc.integer({ min: 0, max: 15 }),
      window: fc.integer({ min: 0, max: 0xffff }),
      payload: fc.oneof(
        fc.uint8Array({ maxLength: 300 }),
        fc
          .constantFrom(
            'GET / HTTP/1.1\r\n\r\n',
            'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n',
            'GET /%zz HTTP/1.0\r\n\r\n',
          )
          .map((t) => Buffer.from(t)),
      ),
      totalDelta: fc.integer({ min: -30, max: 30 }),
    })
    .map((r) => {
      const data = Buffer.from(r.payload);
      const f = Buffer.alloc(14 + 40 + data.length);
      f.writeUInt16BE(0x0800, 12);
      const ip = f.subarray(14);
      ip[0] = 0x45;
      ip.writeUInt16BE(Math.max(0, Math.min(0xffff, 40 + data.length + r.totalDelta)), 2);
      ip[9] = 6;
      ip.writeUInt32BE(0x0a000002, 12);
      ip.writeUInt32BE(MMDS_IP, 16);
      let sum = 0;
      for (let i = 0; i < 20; i += 2) sum += ip.readUInt16BE(i);
      while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
      ip.writeUInt16BE(~sum & 0xffff, 10);
      const t = ip.subarray(20);
      t.writeUInt16BE(r.port, 0);
      t.writeUInt16BE(r.dstPort, 2);
      t.writeUInt32BE(r.seq, 4);
      t.writeUInt32BE(r.ack, 8);
      t[12] = r.offsetWords << 4;
      t[13] = r.flags;
      t.writeUInt16BE(r.window, 14);
      data.copy(t, 20);
      return new Uint8Array(f);
    });
  return {
    name: 'mmds-stack',
    weight: 4,
    arbitrary: fc.oneof({ arbitrary: tcp, weight: 4 }, { arbitrary: fc.uint8Array({ maxLength: 200 }), weight: 1 }),
    setup() {
      const service = new MmdsService({ get: () => ({ latest: { a: 'b', n: 1 } }) }, 'V2', false);
      stack = new MmdsStack(MMDS_IP, (req) => service.answer(req));
    },
    run(input) {
      stack.handleFrame(Buffer.from(input));
      if (stack.connectionCount > MMDS_MAX_CONNECTIONS) throw new Finding(`${stack.connectionCount} connections kept`);
      if (stack.out.length > MAX_QUEUED_FRAMES) throw new Finding(`${stack.out.length} frames queued`);
      // The guest's receive ring takes what is queued now and then.
      if (stack.out.length > 64) stack.out.length = 0;
    },
    teardown() {
      stack.out.length = 0;
    },
  };
}

export function allTargets(): FuzzTarget[] {
  return [
    virtqueueTarget(),
    commonConfigTarget(),
    pciConfigTarget(),
    loaderTarget(),
    ...backendTargets(),
    apiTarget(),
    mmdsTarget(),
  ] as FuzzTarget[];
}

export interface TargetResult {
  readonly name: string;
  readonly runs: number;
  readonly seconds: number;
  readonly slowestMs: number;
  readonly heapGrowthMiB: number;
  readonly rssGrowthMiB: number;
  readonly finding: string | null;
}

/** Runs one target for `runs` inputs from `seed`, with the time and memory oracles. */
export async function fuzzTarget(
  target: FuzzTarget,
  opts: { runs: number; seed: number; timeBoundMs: number; memoryBoundMiB: number },
): Promise<TargetResult> {
  await target.setup();
  const started = performance.now();
  let slowest = 0;
  global.gc?.();
  const fds0 = readdirSync('/proc/self/fd').length;
  const heap0 = process.memoryUsage().heapUsed;
  const rss0 = process.memoryUsage().rss;
  let finding: string | null = null;
  try {
    await fc.assert(
      fc.asyncProperty(target.arbitrary, async (input) => {
        const t0 = performance.now();
        await target.run(input);
        const ms = performance.now() - t0;
        slowest = Math.max(slowest, ms);
        if (ms > opts.timeBoundMs)
          throw new Finding(`${target.name}: one input took ${ms.toFixed(0)} ms (bound ${opts.timeBoundMs} ms)`);
      }),
      { numRuns: opts.runs, seed: opts.seed, endOnFailure: true },
    );
  } catch (err) {
    finding = (err as Error).message.split('\n').slice(0, 12).join('\n');
  } finally {
    await target.teardown();
  }
  global.gc?.();
  const heapGrowthMiB = (process.memoryUsage().heapUsed - heap0) / 2 ** 20;
  const rssGrowthMiB = (process.memoryUsage().rss - rss0) / 2 ** 20;
  const fdGrowth = readdirSync('/proc/self/fd').length - fds0;
  if (finding === null && fdGrowth > 16) finding = `${target.name}: ${fdGrowth} file descriptors leaked`;
  if (finding === null && (heapGrowthMiB > opts.memoryBoundMiB || rssGrowthMiB > 4 * opts.memoryBoundMiB))
    finding = `${target.name}: memory grew by ${heapGrowthMiB.toFixed(1)} MiB heap, ${rssGrowthMiB.toFixed(1)} MiB RSS (bound ${opts.memoryBoundMiB} MiB heap)`;
  return {
    name: target.name,
    runs: opts.runs,
    seconds: (performance.now() - started) / 1000,
    slowestMs: slowest,
    heapGrowthMiB,
    rssGrowthMiB,
    finding,
  };
}
