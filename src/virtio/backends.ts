// Virtio backends by device type, created on the I/O thread.
import type { DeviceOptions } from '../devices/device.js';
import { KilnError } from '../errors.js';
import { BlkBackend } from './blk.js';
import type { VirtioBackend, VirtioQueues } from './device.js';
import { BalloonBackend } from './balloon.js';
import { ConsoleBackend } from './console.js';
import { NetBackend } from './net.js';
import { RngBackend } from './rng.js';
import { VsockBackend } from './vsock.js';

const factories: Readonly<Record<string, (rt: VirtioQueues, options: DeviceOptions) => VirtioBackend>> = {
  blk: (rt, o) => new BlkBackend(rt, o),
  rng: (rt) => new RngBackend(rt),
  net: (rt, o) => new NetBackend(rt, o),
  console: (rt, o) => new ConsoleBackend(rt, o),
  balloon: (rt, o) => new BalloonBackend(rt, o),
  vsock: (rt, o) => new VsockBackend(rt, o),
};

export function createBackend(type: string, rt: VirtioQueues, options: DeviceOptions): VirtioBackend {
  const factory = factories[type];
  if (!factory) throw new KilnError(`no backend for virtio device type '${type}'`);
  return factory(rt, options);
}
