// Machine assembly for virtio: a VM configuration's devices become virtio-pci functions. disks are opened and
// checked before any VM exists (a missing or read-only file is a clear error, not a
// half-built VM), then every device gets a slot, a BAR, its queues' eventfds and INTx.
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { requireKind } from '../special-files.js';
import type { VmConfig } from '../config/vm-config.js';
import { MmdsStore } from '../mmds/store.js';
import { RateLimiterCells, type RateLimiterConfig } from '../virtio/rate-limiter.js';
import { BALLOON_COUNTERS, BLK_COUNTERS, DeviceCounters, NET_COUNTERS, VSOCK_COUNTERS } from '../virtio/counters.js';
import { KilnError } from '../errors.js';
import type { DeviceSpec } from '../devices/catalogue.js';
import * as libc from '../kvm/libc.js';
import { pciIntxGsi } from '../layout.js';
import type { PciBarAllocator, PciRoot } from '../pci/root.js';
import { BALLOON_PAGE_BYTES, BalloonControl } from '../virtio/balloon.js';
import { BlkControl, blkOptions, lockDisk, type BlkOptions } from '../virtio/blk.js';
import { describeVirtio, type VirtioDeviceConfig } from '../virtio/catalogue.js';
import { listenConsole } from '../virtio/console.js';
import type { VirtioState } from '../virtio/device.js';
import { connectPasst, defaultMac, openTap, parseMac, type NetOptions } from '../virtio/net.js';
import {
  VIRTIO_BAR,
  VIRTIO_PCI_MODERN_DEVICE_ID_BASE,
  VIRTIO_PCI_VENDOR_ID,
  virtioCapabilities,
  virtioState,
  type VirtioPciOptions,
} from '../virtio/pci.js';
import { listenVsock } from '../virtio/vsock.js';
import type { Vm } from '../vm.js';
import type { PciHost } from './pci.js';

/** A disk's host end: what openDisk needs of a VmConfig disk. */
export interface DiskHostEnd {
  readonly path: string;
  readonly readOnly?: boolean;
  /** Up to 20 bytes, what the guest sees as the disk's serial (VIRTIO_BLK_T_GET_ID). */
  readonly serial?: string | undefined;
}

/** A NIC's host end: a TAP interface (created if needed; CAP_NET_ADMIN) or passt's socket. */
export interface NetHostEnd {
  readonly tap?: string | undefined;
  readonly passt?: string | undefined;
  readonly mac?: string | undefined;
}

/** The virtio functions of a VM, found by what they are (never by position). */
export interface AttachedVirtio {
  /** In slot order: disks, NICs, rng, balloon, vsock, console. */
  readonly all: readonly VirtioPciDevice[];
  /** By the disk's ID (the API's drive_id). */
  readonly disks: ReadonlyMap<string, VirtioPciDevice>;
  readonly nets: ReadonlyMap<string, VirtioPciDevice>;
  readonly balloon: VirtioPciDevice | null;
  /**
   * Every rate limiter's shared cells, by what it limits: `drive:ID`, `net-rx:ID`,
   * `net-tx:ID`, `rng` (PATCH /drives and /network-interfaces change them live; the
   * metrics read their throttled counts).
   */
  readonly limiters: ReadonlyMap<string, RateLimiterCells>;
  /** Every disk's and NIC's metrics counters, by `drive:ID` and `net:ID`, and the vsock device's and the balloon's (`vsock`, `balloon`). */
  readonly counters: ReadonlyMap<string, DeviceCounters<string>>;
}

/** The host's handle on a disk added by attachVirtio. */
export function blkControl(device: VirtioPciDevice): BlkControl {
  return new BlkControl(device.state, device.spec.options.controlFd);
}

/**
 * Takes (`lock`) or lets go of the image locks of every disk of a built VM: a migration's
 * source lets go as it stops, its destination takes them before it runs (the same images
 * on shared storage). Throws, having taken none, when one is held elsewhere.
 */
export function setDiskLocks(virtio: AttachedVirtio, lock: boolean): void {
  const done: BlkOptions[] = [];
  for (const device of virtio.disks.values()) {
    const o = (device.spec.options as VirtioPciOptions).device.options as BlkOptions;
    if (!lock) libc.ofdLockWholeFile(o.fd, libc.F_UNLCK);
    else
      try {
        lockDisk(o.fd, o.path, o.readOnly);
        done.push(o);
      } catch (err) {
        for (const d of done) libc.ofdLockWholeFile(d.fd, libc.F_UNLCK);
        throw err;
      }
  }
}

/** A dotted IPv4 address as a number. */
export const ipv4Number = (address: string): number =>
  address.split('.').reduce((n, part) => n * 256 + Number(part), 0) >>> 0;

/** The host's handle on a balloon device added by attachVirtio. */
export function balloonControl(device: VirtioPciDevice): BalloonControl {
  return new BalloonControl(device.state, device.spec.options.controlFd);
}

/** Opens a NIC's host end (TAP or passt) and returns its device options; the caller owns the fd. */
export function openNet(net: NetHostEnd, index: number): OpenedDisk<NetOptions> {
  if (!net.tap === !net.passt)
    throw new KilnError(`network interface ${index}: give either a TAP name or a passt socket`);
  const mac = net.mac ?? defaultMac((process.pid << 8) + index);
  parseMac(mac);
  const fd = net.tap ? openTap(net.tap) : connectPasst(net.passt!);
  return { fd, options: { fd, mac, backend: net.tap ? 'tap' : 'passt' } };
}

/** A host end opened before the VM exists, and the device options it gives; the caller owns the fd. */
export interface OpenedDisk<O = BlkOptions> {
  readonly fd: number;
  readonly options: O;
}

/**
 * Opens, checks and locks one disk image; the caller owns the fd. `locked`: the VM
 * already holds the image's lock through another fd (a media change to the same file).
 */
export function openDisk(disk: DiskHostEnd, index: number, locked = false): OpenedDisk {
  let fd: number;
  try {
    // Non-blocking and no controlling tty: a FIFO or a terminal given as a disk must not
    // hang or change the VMM before it is refused (O_NONBLOCK changes nothing for files).
    fd = openSync(
      disk.path,
      (disk.readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR) | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY,
    );
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new KilnError(`disk '${disk.path}' does not exist`);
    if (code === 'EISDIR') throw new KilnError(`disk '${disk.path}' is a directory, not a disk image`);
    if ((code === 'EACCES' || code === 'EROFS' || code === 'EPERM') && !disk.readOnly)
      throw new KilnError(
        `disk '${disk.path}' cannot be opened for writing (${code}); attach it read-only (,ro) or fix its permissions`,
      );
    throw new KilnError(`cannot open disk '${disk.path}': ${code ?? (err as Error).message}`);
  }
  try {
    requireKind(fd, disk.path, 'disk', ['regular file', 'block device']);
    return {
      fd,
      options: blkOptions(fd, disk.path, disk.readOnly ?? false, disk.serial ?? `kiln-disk-${index}`, !locked),
    };
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/** Opens every disk and NIC host end, or none (closing what was opened if one fails). */
export function openHostEnds(
  config: {
    readonly disks?: readonly DiskHostEnd[];
    readonly nets?: readonly NetHostEnd[];
  },
  opts: { lockDisks?: boolean } = {},
): { disks: OpenedDisk<BlkOptions>[]; nets: OpenedDisk<NetOptions>[] } {
  const disks: OpenedDisk<BlkOptions>[] = [];
  const nets: OpenedDisk<NetOptions>[] = [];
  try {
    (config.disks ?? []).forEach((d, i) => disks.push(openDisk(d, i, opts.lockDisks === false)));
    (config.nets ?? []).forEach((n, i) => nets.push(openNet(n, i)));
    return { disks, nets };
  } catch (err) {
    [...disks, ...nets].forEach((d) => closeSync(d.fd));
    throw err;
  }
}

/**
 * Adds the opened disks and NICs (opened from `config.disks` and `config.nets`, in that
 * order) and the other devices to `vm`, which then owns the fds.
 */
export function attachVirtio(
  vm: Vm,
  pci: PciHost,
  config: VmConfig,
  disks: readonly OpenedDisk<BlkOptions>[],
  nets: readonly OpenedDisk<NetOptions>[],
  /** MMDS's data store (the VMM's; an empty one when the VMM has none and the config enables MMDS). */
  mmdsStore: SharedArrayBuffer | null = null,
): AttachedVirtio {
  const mmds = config.mmds;
  const store = mmds ? (mmdsStore ?? new MmdsStore().shared) : null;
  const all: VirtioPciDevice[] = [];
  const add = (id: string, device: VirtioDeviceConfig) => {
    const slot = pci.takeSlot();
    const added = addVirtioPciDevice(vm, pci.root, pci.bars, { id, slot, intxGsi: pciIntxGsi(slot), device });
    all.push(added);
    return added;
  };
  const limiters = new Map<string, RateLimiterCells>();
  const limiter = (key: string, config: RateLimiterConfig | undefined): SharedArrayBuffer => {
    const cells = new RateLimiterCells();
    cells.write(config);
    limiters.set(key, cells);
    return cells.shared;
  };
  const counters = new Map<string, DeviceCounters<string>>();
  const counted = (key: string, names: readonly string[]): SharedArrayBuffer => {
    const c = new DeviceCounters(names);
    counters.set(key, c);
    return c.shared;
  };
  const diskDevices = new Map<string, VirtioPciDevice>();
  const netDevices = new Map<string, VirtioPciDevice>();
  disks.forEach((d, i) => {
    vm.adoptFd(d.fd);
    const disk = config.disks[i]!;
    const options: BlkOptions = {
      ...d.options,
      limiter: limiter(`drive:${disk.id}`, disk.rateLimiter),
      counters: counted(`drive:${disk.id}`, BLK_COUNTERS),
    };
    diskDevices.set(disk.id, add(`disk${i}`, { kind: 'blk', options }));
  });
  nets.forEach((n, i) => {
    vm.adoptFd(n.fd);
    const net = config.nets[i]!;
    const id = net.id;
    const limited: NetOptions = {
      ...n.options,
      ...(net.mtu !== undefined ? { mtu: net.mtu } : {}),
      rxLimiter: limiter(`net-rx:${id}`, net.rxRateLimiter),
      txLimiter: limiter(`net-tx:${id}`, net.txRateLimiter),
      counters: counted(`net:${id}`, NET_COUNTERS),
    };
    const options: NetOptions =
      mmds && store && mmds.nets.includes(id)
        ? {
            ...limited,
            mmds: { store, ipv4: ipv4Number(mmds.ipv4), version: mmds.version, imdsCompat: mmds.imdsCompat },
          }
        : limited;
    netDevices.set(id, add(`net${i}`, { kind: 'net', options }));
  });
  if (config.rng) add('rng', { kind: 'rng', options: { limiter: limiter('rng', config.rngRateLimiter) } });
  const balloon = config.balloon
    ? add('balloon', {
        kind: 'balloon',
        options: {
          targetPages: Math.floor((config.balloon.targetMiB * 1024 * 1024) / BALLOON_PAGE_BYTES),
          deflateOnOom: config.balloon.deflateOnOom,
          freePageHinting: config.balloon.freePageHinting,
          counters: counted('balloon', BALLOON_COUNTERS),
        },
      })
    : null;
  if (config.vsock) {
    const { fd, options } = listenVsock(config.vsock.uds, config.vsock.guestCid);
    vm.adoptFd(fd);
    add('vsock', { kind: 'vsock', options: { ...options, counters: counted('vsock', VSOCK_COUNTERS) } });
  }
  if (config.consoleSocket) {
    const fd = listenConsole(config.consoleSocket);
    vm.adoptFd(fd);
    add('console', { kind: 'console', options: { listenFd: fd } });
  }
  return { all, disks: diskDevices, nets: netDevices, balloon, limiters, counters };
}

/** What addVirtioPciDevice returns: the spec, where it lives, and its shared state. */
export interface VirtioPciDevice {
  readonly spec: DeviceSpec<'virtio-pci'>;
  readonly slot: number;
  readonly barAddress: number;
  readonly state: VirtioState;
}

/**
 * Adds a virtio device as a PCI function: configuration space with the virtio and
 * MSI-X capabilities, BAR 0 placed in the window, one eventfd per queue (ioeventfd at
 * its notify address), its INTx line; the device model's init fills in its state.
 */
export function addVirtioPciDevice(
  vm: Vm,
  root: PciRoot,
  bars: PciBarAllocator,
  request: { id: string; slot: number; intxGsi: number; device: VirtioDeviceConfig },
): VirtioPciDevice {
  const info = describeVirtio(request.device);
  const eventfd = () => {
    const fd = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
    if (fd < 0) throw new KilnError(`eventfd failed: ${libc.errnoName(libc.errno())}`);
    vm.adoptFd(fd);
    return fd;
  };
  const notifyFds = Array.from({ length: info.numQueues }, eventfd);
  const barAddress = bars.allocate(VIRTIO_BAR.bytes);
  const options: VirtioPciOptions = {
    device: request.device,
    notifyFds,
    intxGsi: request.intxGsi,
    controlFd: info.controlChannel ? eventfd() : -1,
  };
  const spec = vm.addDevice({ id: request.id, kind: 'virtio-pci', bus: 'pci', base: request.slot, size: 1, options });
  const state = virtioState(spec.state, options);
  root.addFunction(request.slot, {
    vendorId: VIRTIO_PCI_VENDOR_ID,
    deviceId: VIRTIO_PCI_MODERN_DEVICE_ID_BASE + info.deviceId,
    classCode: info.deviceId === 1 ? 0x020000 : info.deviceId === 2 ? 0x018000 : 0xff0000,
    revision: 1, // 4.1.2.1: modern-only devices have revision 1 or more
    subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
    subsystemId: 0x40,
    interruptPin: 1,
    bars: [{ kind: 'memory32', size: VIRTIO_BAR.bytes, address: barAddress }],
    capabilities: virtioCapabilities(state.vectors, state.configBytes),
  });
  return { spec, slot: request.slot, barAddress, state };
}
