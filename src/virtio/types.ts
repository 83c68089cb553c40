// Virtio device types by name (pure descriptions, usable on any thread).
import { blkType } from './blk.js';
import type { VirtioDeviceType } from './device.js';
import { balloonType } from './balloon.js';
import { consoleType } from './console.js';
import { netType } from './net.js';
import { vsockType } from './vsock.js';
import { rngType } from './rng.js';

export const virtioTypes: Readonly<Record<string, VirtioDeviceType>> = {
  blk: blkType,
  rng: rngType,
  net: netType,
  console: consoleType,
  balloon: balloonType,
  vsock: vsockType,
};
