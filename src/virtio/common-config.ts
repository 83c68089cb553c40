// The virtio-pci common configuration structure (virtio 1.2, 4.1.4.3): feature
// negotiation, device status and reset, and the selected queue's registers. One unit,
// over a device's shared state (VirtioState); the transport (pci.ts) maps it at the
// start of BAR 0 and hands it the hooks it needs: guest memory (to check a queue's rings
// when the driver enables it), the log, and how to kick a queue's backend.
import { accessValue, setAccessValue } from '../bus/bus.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  QUEUE_TRANSPORT,
  VirtioState,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VIRTIO_STATUS_DRIVER_OK,
  VIRTIO_STATUS_FEATURES_OK,
  type VirtioInterrupts,
} from './device.js';
import { checkQueueLayout, QUEUE_RECORD, resetQueueRecord } from './queue.js';

/** struct virtio_pci_common_cfg (4.1.4.3), offsets from the common region. */
export const COMMON_CFG = {
  deviceFeatureSelect: 0x00,
  deviceFeature: 0x04,
  driverFeatureSelect: 0x08,
  driverFeature: 0x0c,
  configMsixVector: 0x10,
  numQueues: 0x12,
  deviceStatus: 0x14,
  configGeneration: 0x15,
  queueSelect: 0x16,
  queueSize: 0x18,
  queueMsixVector: 0x1a,
  queueEnable: 0x1c,
  queueNotifyOff: 0x1e,
  queueDesc: 0x20,
  queueDriver: 0x28,
  queueDevice: 0x30,
  queueNotifyData: 0x38,
  queueReset: 0x3a,
  bytes: 0x3c,
} as const;

export interface CommonConfigHooks {
  /** Guest RAM: a queue's rings are checked against it on queue_enable. */
  readonly memory: GuestMemory;
  log(line: string): void;
  /** Wakes queue `q`'s backend (its eventfd), for buffers made available before DRIVER_OK. */
  kick(q: number): void;
}

/** A queue after a device reset: its ring record cleared, no MSI-X vector; its ioeventfd stays where it is. */
export function resetQueue(s: VirtioState, q: number): void {
  resetQueueRecord(s.queueRecord(q), s.type.maxQueueSize);
  s.transportRecord(q).setUint16(QUEUE_TRANSPORT.msixVector, VIRTIO_MSI_NO_VECTOR, true);
}

/** Register reads and writes at offsets from the structure's start; the caller holds the device lock. */
export interface CommonConfig {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

export function commonConfig(s: VirtioState, irq: VirtioInterrupts, hooks: CommonConfigHooks): CommonConfig {
  const v = s.view;
  const F = VirtioState.fields;
  const log = (line: string) => hooks.log(line);
  const mem = hooks.memory;
  const maxSize = s.type.maxQueueSize;

  const selected = (): DataView | null => {
    const q = v.getUint16(F.queueSelect, true);
    return q < s.numQueues ? s.queueRecord(q) : null;
  };
  const selectedTransport = (): DataView | null => {
    const q = v.getUint16(F.queueSelect, true);
    return q < s.numQueues ? s.transportRecord(q) : null;
  };

  const reset = () => {
    const resets = v.getUint32(F.resets, true);
    const msixControl = s.msixControl;
    for (let i = 0; i < F.fixedBytes; i++) v.setUint8(i, 0);
    v.setUint32(F.resets, resets + 1, true);
    s.msixControl = msixControl;
    v.setUint16(F.configMsixVector, VIRTIO_MSI_NO_VECTOR, true);
    for (let q = 0; q < s.numQueues; q++) resetQueue(s, q);
    irq.readIsr();
  };

  const writeStatus = (value: number) => {
    if (value === 0) return reset();
    let status = value & 0xff;
    if (status & VIRTIO_STATUS_FEATURES_OK && !(s.status & VIRTIO_STATUS_FEATURES_OK)) {
      // 3.1.1: FEATURES_OK only sticks if the device accepts the driver's subset.
      const driver = s.driverFeatures;
      if ((driver & ~s.deviceFeatures) !== 0n || !(driver & (1n << VIRTIO_F_VERSION_1)))
        status &= ~VIRTIO_STATUS_FEATURES_OK;
    }
    // The driver cannot clear NEEDS_RESET except by a reset.
    s.status = status | (s.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
    if (status & VIRTIO_STATUS_DRIVER_OK) {
      // Buffers made available before DRIVER_OK are serviced now.
      for (let q = 0; q < s.numQueues; q++) if (s.queueRecord(q).getUint16(QUEUE_RECORD.enable, true)) hooks.kick(q);
    }
  };

  const enableQueue = (rec: DataView) => {
    const problem = checkQueueLayout(mem, rec, maxSize);
    if (problem) {
      irq.needsReset(`queue ${v.getUint16(F.queueSelect, true)}: ${problem}`, log);
      return;
    }
    rec.setUint16(QUEUE_RECORD.enable, 1, true);
  };

  const vector = (value: number) =>
    value === VIRTIO_MSI_NO_VECTOR || value < s.vectors ? value : VIRTIO_MSI_NO_VECTOR;

  const read = (offset: number, data: Uint8Array) => {
    const rec = selected();
    let value: number;
    switch (offset) {
      case COMMON_CFG.deviceFeatureSelect:
        value = v.getUint32(F.deviceFeatureSelect, true);
        break;
      case COMMON_CFG.deviceFeature: {
        const sel = v.getUint32(F.deviceFeatureSelect, true);
        value = sel < 2 ? Number((s.deviceFeatures >> BigInt(32 * sel)) & 0xffff_ffffn) : 0;
        break;
      }
      case COMMON_CFG.driverFeatureSelect:
        value = v.getUint32(F.driverFeatureSelect, true);
        break;
      case COMMON_CFG.driverFeature: {
        const sel = v.getUint32(F.driverFeatureSelect, true);
        value = sel < 2 ? v.getUint32(F.driverFeaturesLo + 4 * sel, true) : 0;
        break;
      }
      case COMMON_CFG.configMsixVector:
        value = s.configMsixVector;
        break;
      case COMMON_CFG.numQueues:
        value = s.numQueues;
        break;
      case COMMON_CFG.deviceStatus:
        value = s.status;
        break;
      case COMMON_CFG.configGeneration:
        value = v.getUint8(F.configGeneration);
        break;
      case COMMON_CFG.queueSelect:
        value = v.getUint16(F.queueSelect, true);
        break;
      case COMMON_CFG.queueSize:
        value = rec ? rec.getUint16(QUEUE_RECORD.size, true) : 0;
        break;
      case COMMON_CFG.queueMsixVector:
        value = rec ? selectedTransport()!.getUint16(QUEUE_TRANSPORT.msixVector, true) : VIRTIO_MSI_NO_VECTOR;
        break;
      case COMMON_CFG.queueEnable:
        value = rec ? rec.getUint16(QUEUE_RECORD.enable, true) : 0;
        break;
      case COMMON_CFG.queueNotifyOff:
        value = rec ? v.getUint16(F.queueSelect, true) : 0;
        break;
      default: {
        // The 64-bit ring addresses, read whole or as 32-bit halves.
        const field =
          offset >= COMMON_CFG.queueDesc && offset < COMMON_CFG.queueNotifyData ? offset - COMMON_CFG.queueDesc : -1;
        if (rec && field >= 0 && field + data.length <= 24) {
          for (let i = 0; i < data.length; i++) data[i] = rec.getUint8(QUEUE_RECORD.desc + field + i);
          return;
        }
        value = 0;
      }
    }
    setAccessValue(data, value);
  };

  const write = (offset: number, data: Uint8Array) => {
    const rec = selected();
    const value = accessValue(data);
    const queueLive = rec !== null && rec.getUint16(QUEUE_RECORD.enable, true) === 1;
    switch (offset) {
      case COMMON_CFG.deviceFeatureSelect:
        v.setUint32(F.deviceFeatureSelect, value, true);
        return;
      case COMMON_CFG.driverFeatureSelect:
        v.setUint32(F.driverFeatureSelect, value, true);
        return;
      case COMMON_CFG.driverFeature: {
        const sel = v.getUint32(F.driverFeatureSelect, true);
        if (sel < 2 && !(s.status & VIRTIO_STATUS_FEATURES_OK)) v.setUint32(F.driverFeaturesLo + 4 * sel, value, true);
        return;
      }
      case COMMON_CFG.configMsixVector:
        v.setUint16(F.configMsixVector, vector(value), true);
        return;
      case COMMON_CFG.deviceStatus:
        writeStatus(value);
        return;
      case COMMON_CFG.queueSelect:
        v.setUint16(F.queueSelect, value, true);
        return;
      case COMMON_CFG.queueSize:
        if (rec && !queueLive) rec.setUint16(QUEUE_RECORD.size, value, true);
        return;
      case COMMON_CFG.queueMsixVector:
        if (rec) selectedTransport()!.setUint16(QUEUE_TRANSPORT.msixVector, vector(value), true);
        return;
      case COMMON_CFG.queueEnable:
        if (rec && value === 1 && !queueLive) enableQueue(rec);
        return;
      default: {
        const field =
          offset >= COMMON_CFG.queueDesc && offset < COMMON_CFG.queueNotifyData ? offset - COMMON_CFG.queueDesc : -1;
        if (rec && !queueLive && field >= 0 && field + data.length <= 24) {
          for (let i = 0; i < data.length; i++) rec.setUint8(QUEUE_RECORD.desc + field + i, data[i]!);
        }
      }
    }
  };

  return { read, write };
}
