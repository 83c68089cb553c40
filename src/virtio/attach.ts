// Turning a VM definition's devices into virtio-pci functions: disks are opened and
// checked before any VM exists (a missing or read-only file is a clear error, not a
// half-built VM), then every device gets a slot, a BAR, its queues' eventfds and INTx.
import { closeSync, openSync } from 'node:fs';
import type { VmConfig } from '../config/vm-config.js';
import { KilnError } from '../errors.js';
import type { DeviceOptions } from '../devices/device.js';
import { pciIntxGsi, type PciHost } from '../pci/host.js';
import type { Vm } from '../vm.js';
import { BALLOON_PAGE_BYTES, BalloonControl } from './balloon.js';
import { BlkControl, blkOptions } from './blk.js';
import { listenConsole } from './console.js';
import { listenVsock } from './vsock.js';
import { connectPasst, defaultMac, openTap, parseMac } from './net.js';
import { addVirtioPciDevice, type VirtioPciDevice } from './pci.js';

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
}

/** The host's handle on a disk added by attachVirtio. */
export function blkControl(device: VirtioPciDevice): BlkControl {
  return new BlkControl(device.state, Number(device.spec.options.controlFd));
}

/** The host's handle on a balloon device added by attachVirtio. */
export function balloonControl(device: VirtioPciDevice): BalloonControl {
  return new BalloonControl(device.state, Number(device.spec.options.controlFd));
}

/** Opens a NIC's host end (TAP or passt) and returns its device options; the caller owns the fd. */
export function openNet(net: NetHostEnd, index: number): OpenedDisk {
  if (!net.tap === !net.passt) throw new KilnError(`network interface ${index}: give either a TAP name or a passt socket`);
  const mac = net.mac ?? defaultMac((process.pid << 8) + index);
  parseMac(mac);
  const fd = net.tap ? openTap(net.tap) : connectPasst(net.passt!);
  return { fd, options: { fd, mac, backend: net.tap ? 'tap' : 'passt' } };
}

export interface OpenedDisk {
  readonly fd: number;
  readonly options: DeviceOptions;
}

/** Opens and checks one disk image; the caller owns the fd. */
export function openDisk(disk: DiskHostEnd, index: number): OpenedDisk {
  let fd: number;
  try {
    fd = openSync(disk.path, disk.readOnly ? 'r' : 'r+');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new KilnError(`disk '${disk.path}' does not exist`);
    if (code === 'EISDIR') throw new KilnError(`disk '${disk.path}' is a directory, not a disk image`);
    if ((code === 'EACCES' || code === 'EROFS' || code === 'EPERM') && !disk.readOnly) throw new KilnError(`disk '${disk.path}' cannot be opened for writing (${code}); attach it read-only (,ro) or fix its permissions`);
    throw new KilnError(`cannot open disk '${disk.path}': ${code ?? (err as Error).message}`);
  }
  try {
    return { fd, options: blkOptions(fd, disk.path, disk.readOnly ?? false, disk.serial ?? `kiln-disk-${index}`) };
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/** Opens every disk and NIC host end, or none (closing what was opened if one fails). */
export function openHostEnds(config: { readonly disks?: readonly DiskHostEnd[]; readonly nets?: readonly NetHostEnd[] }): { disks: OpenedDisk[]; nets: OpenedDisk[] } {
  const disks: OpenedDisk[] = [];
  const nets: OpenedDisk[] = [];
  try {
    (config.disks ?? []).forEach((d, i) => disks.push(openDisk(d, i)));
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
export function attachVirtio(vm: Vm, pci: PciHost, config: VmConfig, disks: readonly OpenedDisk[], nets: readonly OpenedDisk[]): AttachedVirtio {
  const all: VirtioPciDevice[] = [];
  const add = (id: string, type: string, options?: DeviceOptions) => {
    const slot = pci.takeSlot();
    const device = addVirtioPciDevice(vm, pci.root, pci.bars, { id, slot, type, intxGsi: pciIntxGsi(slot), ...(options ? { options } : {}) });
    all.push(device);
    return device;
  };
  const diskDevices = new Map<string, VirtioPciDevice>();
  const netDevices = new Map<string, VirtioPciDevice>();
  disks.forEach((d, i) => {
    vm.adoptFd(d.fd);
    diskDevices.set(config.disks[i]!.id, add(`disk${i}`, 'blk', d.options));
  });
  nets.forEach((n, i) => {
    vm.adoptFd(n.fd);
    netDevices.set(config.nets[i]!.id, add(`net${i}`, 'net', n.options));
  });
  if (config.rng) add('rng', 'rng');
  const balloon = config.balloon ? add('balloon', 'balloon', { targetPages: Math.floor((config.balloon.targetMiB * 1024 * 1024) / BALLOON_PAGE_BYTES), deflateOnOom: config.balloon.deflateOnOom }) : null;
  if (config.vsock) {
    const { fd, options } = listenVsock(config.vsock.uds, config.vsock.guestCid);
    vm.adoptFd(fd);
    add('vsock', 'vsock', options);
  }
  if (config.consoleSocket) {
    const fd = listenConsole(config.consoleSocket);
    vm.adoptFd(fd);
    add('console', 'console', { listenFd: fd });
  }
  return { all, disks: diskDevices, nets: netDevices, balloon };
}
