// Every virtio device type Kiln has, in one place: its typed options, its description
// (queues, features, configuration space) and its I/O-thread backend. The mapped types
// below make the compiler refuse a device kind without an entry, or an entry whose
// backend does not take that kind's options. Adding a device type: its own file (type,
// options, backend), one line in VirtioOptionsByKind, one entry in VIRTIO_DEVICES,
// and the VM configuration's field (src/config/vm-config.ts) with its attach step
// (src/platform/virtio.ts).
import { BalloonBackend, balloonType, type BalloonOptions } from './balloon.js';
import { BlkBackend, blkType, type BlkOptions } from './blk.js';
import { ConsoleBackend, consoleType, type ConsoleOptions } from './console.js';
import {
  bindType,
  type VirtioBackend,
  type VirtioDeviceInfo,
  type VirtioDeviceType,
  type VirtioQueues,
} from './device.js';
import { NetBackend, netType, type NetOptions } from './net.js';
import { RngBackend, rngType, type RngOptions } from './rng.js';
import { VsockBackend, vsockType, type VsockOptions } from './vsock.js';

export interface VirtioOptionsByKind {
  blk: BlkOptions;
  net: NetOptions;
  console: ConsoleOptions;
  rng: RngOptions;
  balloon: BalloonOptions;
  vsock: VsockOptions;
}
export type VirtioKind = keyof VirtioOptionsByKind;

/** The transport's fds a backend may need: the control channel's eventfd (-1: none). */
export interface VirtioTransportFds {
  readonly controlFd: number;
}

interface VirtioEntry<K extends VirtioKind> {
  readonly type: VirtioDeviceType<VirtioOptionsByKind[K]>;
  backend(rt: VirtioQueues, options: VirtioOptionsByKind[K], transport: VirtioTransportFds): VirtioBackend;
}

export const VIRTIO_DEVICES: { readonly [K in VirtioKind]: VirtioEntry<K> } = {
  blk: { type: blkType, backend: (rt, o, t) => new BlkBackend(rt, o, t.controlFd) },
  net: { type: netType, backend: (rt, o) => new NetBackend(rt, o) },
  console: { type: consoleType, backend: (rt, o) => new ConsoleBackend(rt, o) },
  rng: { type: rngType, backend: (rt, o) => new RngBackend(rt, o) },
  balloon: { type: balloonType, backend: (rt, o, t) => new BalloonBackend(rt, t.controlFd, o) },
  vsock: { type: vsockType, backend: (rt, o) => new VsockBackend(rt, o) },
};

/** One virtio device: its kind and that kind's options (plain data: it crosses to the worker threads). */
export type VirtioDeviceConfig = {
  [K in VirtioKind]: { readonly kind: K; readonly options: VirtioOptionsByKind[K] };
}[VirtioKind];

/** A device's description, bound to its options. */
export function describeVirtio<K extends VirtioKind>(device: {
  readonly kind: K;
  readonly options: VirtioOptionsByKind[K];
}): VirtioDeviceInfo {
  const entry: VirtioEntry<K> = VIRTIO_DEVICES[device.kind];
  return bindType(entry.type, device.options);
}

/** A device's backend, on the I/O thread. */
export function createBackend<K extends VirtioKind>(
  device: { readonly kind: K; readonly options: VirtioOptionsByKind[K] },
  rt: VirtioQueues,
  transport: VirtioTransportFds,
): VirtioBackend {
  const entry: VirtioEntry<K> = VIRTIO_DEVICES[device.kind];
  return entry.backend(rt, device.options, transport);
}
