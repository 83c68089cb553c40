// The virtio-pci common configuration as a unit (virtio 1.2, 4.1.4.3), over a device's
// shared state with no VM: feature negotiation, status and reset, queue registers, MSI-X
// vector checks, and what DRIVER_OK and queue_enable do.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { COMMON_CFG } from '../../src/virtio/common-config.js';
import {
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VIRTIO_STATUS_DRIVER_OK,
  VIRTIO_STATUS_FEATURES_OK,
} from '../../src/virtio/device.js';
import { entropyCommonConfig } from './fake-driver.js';

/** An entropy device (one queue of up to 256) over fresh state; RAM is [0, 1 MiB). */
const device = entropyCommonConfig;

const VERSION_1_HI = 1; // bit 32: bit 0 of the high word

test('FEATURES_OK sticks only for a subset of the device features that includes VERSION_1', () => {
  const d = device();
  d.write(COMMON_CFG.deviceFeatureSelect, 1, 4);
  assert.equal(d.read(COMMON_CFG.deviceFeature, 4) & VERSION_1_HI, VERSION_1_HI, 'the device offers VERSION_1');
  d.write(COMMON_CFG.deviceFeatureSelect, 7, 4);
  assert.equal(d.read(COMMON_CFG.deviceFeature, 4), 0, 'feature words past the second read as zero');
  // Without VERSION_1: refused.
  d.write(COMMON_CFG.deviceStatus, VIRTIO_STATUS_FEATURES_OK | 3, 1);
  assert.equal(d.read(COMMON_CFG.deviceStatus, 1) & VIRTIO_STATUS_FEATURES_OK, 0);
  // An unknown bit: refused.
  d.write(COMMON_CFG.driverFeatureSelect, 1, 4);
  d.write(COMMON_CFG.driverFeature, VERSION_1_HI | 0x8000_0000, 4);
  d.write(COMMON_CFG.deviceStatus, VIRTIO_STATUS_FEATURES_OK | 3, 1);
  assert.equal(d.read(COMMON_CFG.deviceStatus, 1) & VIRTIO_STATUS_FEATURES_OK, 0);
  // VERSION_1 alone: accepted, and the driver features are frozen from then on.
  d.write(COMMON_CFG.driverFeature, VERSION_1_HI, 4);
  d.write(COMMON_CFG.deviceStatus, VIRTIO_STATUS_FEATURES_OK | 3, 1);
  assert.equal(d.read(COMMON_CFG.deviceStatus, 1), VIRTIO_STATUS_FEATURES_OK | 3);
  d.write(COMMON_CFG.driverFeature, 0, 4);
  assert.equal(d.read(COMMON_CFG.driverFeature, 4), VERSION_1_HI, 'no change after FEATURES_OK');
});

test('queue registers: the selected queue only, vectors checked, sizes and rings frozen once enabled', () => {
  const d = device();
  assert.equal(d.read(COMMON_CFG.numQueues, 2), 1);
  assert.equal(d.read(COMMON_CFG.queueSize, 2), d.s.type.maxQueueSize, 'the maximum after reset');
  assert.equal(d.read(COMMON_CFG.queueMsixVector, 2), VIRTIO_MSI_NO_VECTOR);
  d.write(COMMON_CFG.queueMsixVector, 1, 2);
  assert.equal(d.read(COMMON_CFG.queueMsixVector, 2), 1, 'vector 1 exists (one per queue plus config)');
  d.write(COMMON_CFG.queueMsixVector, 9, 2);
  assert.equal(
    d.read(COMMON_CFG.queueMsixVector, 2),
    VIRTIO_MSI_NO_VECTOR,
    'an out-of-range vector reads back as NO_VECTOR',
  );
  d.write(COMMON_CFG.queueSize, 8, 2);
  // The 64-bit ring addresses, as 32-bit halves.
  d.write(COMMON_CFG.queueDesc, 0x1000, 4);
  d.write(COMMON_CFG.queueDesc + 4, 0, 4);
  d.write(COMMON_CFG.queueDriver, 0x2000, 4);
  d.write(COMMON_CFG.queueDevice, 0x3000, 4);
  assert.equal(d.read(COMMON_CFG.queueDesc, 4), 0x1000);
  d.write(COMMON_CFG.queueEnable, 1, 2);
  assert.equal(d.read(COMMON_CFG.queueEnable, 2), 1);
  d.write(COMMON_CFG.queueSize, 16, 2);
  d.write(COMMON_CFG.queueDesc, 0x5000, 4);
  assert.equal(d.read(COMMON_CFG.queueSize, 2), 8, 'a live queue keeps its size');
  assert.equal(d.read(COMMON_CFG.queueDesc, 4), 0x1000, 'and its rings');
  // A queue that does not exist reads as absent and ignores writes.
  d.write(COMMON_CFG.queueSelect, 5, 2);
  assert.equal(d.read(COMMON_CFG.queueSize, 2), 0);
  assert.equal(d.read(COMMON_CFG.queueMsixVector, 2), VIRTIO_MSI_NO_VECTOR);
  d.write(COMMON_CFG.queueEnable, 1, 2);
  assert.equal(d.read(COMMON_CFG.queueEnable, 2), 0);
});

test('DRIVER_OK kicks the enabled queues; a ring outside RAM is NEEDS_RESET, not enabled; a reset clears it all', () => {
  const d = device();
  d.write(COMMON_CFG.queueSize, 8, 2);
  d.write(COMMON_CFG.queueDesc, 0x1000, 4);
  d.write(COMMON_CFG.queueDriver, 0x2000, 4);
  d.write(COMMON_CFG.queueDevice, 0x3000, 4);
  d.write(COMMON_CFG.queueEnable, 1, 2);
  d.write(COMMON_CFG.deviceStatus, VIRTIO_STATUS_DRIVER_OK | 3, 1);
  assert.deepEqual(d.kicked, [0], 'buffers made available before DRIVER_OK are serviced');

  d.write(COMMON_CFG.deviceStatus, 0, 1);
  assert.equal(d.read(COMMON_CFG.deviceStatus, 1), 0, 'reset');
  assert.equal(d.read(COMMON_CFG.queueEnable, 2), 0);
  assert.equal(d.read(COMMON_CFG.queueSize, 2), d.s.type.maxQueueSize);
  assert.equal(d.s.resets, 1, 'the I/O thread can tell a reset happened');

  d.write(COMMON_CFG.queueSize, 8, 2);
  d.write(COMMON_CFG.queueDesc, 0x20_0000, 4); // past the 1 MiB of RAM
  d.write(COMMON_CFG.queueEnable, 1, 2);
  assert.equal(d.read(COMMON_CFG.queueEnable, 2), 0, 'not enabled');
  assert.equal(d.read(COMMON_CFG.deviceStatus, 1) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, VIRTIO_STATUS_DEVICE_NEEDS_RESET);
  assert.match(d.logged[0] ?? '', /virtio-rng: queue 0: .*not in guest RAM; the device needs a reset/);
  d.write(COMMON_CFG.deviceStatus, 3, 1);
  assert.equal(
    d.read(COMMON_CFG.deviceStatus, 1) & VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    'only a reset clears NEEDS_RESET',
  );
});
