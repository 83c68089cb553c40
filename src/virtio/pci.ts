// The modern virtio-pci transport (virtio 1.2, 4.1): one 32 KiB memory BAR holding the
// common configuration, ISR, device configuration, notification area and the MSI-X
// table and PBA, announced by vendor-specific capabilities. Register accesses run on
// the vCPU thread that traps them; queue notifications do not: each queue's notify
// address has an ioeventfd, so a guest kick wakes the I/O thread (io-thread.ts) inside
// KVM without leaving the vCPU. A notify write that does reach Kiln (other widths) is
// forwarded to the same eventfd.
import type { BusDevice } from '../bus/bus.js';
import { accessValue, setAccessValue } from '../bus/bus.js';
import type { DeviceContext, PciFunctionModel } from '../devices/device.js';
import { KvmIoctlError } from '../kvm/errors.js';
import { VmFd } from '../kvm/kvm.js';
import * as libc from '../kvm/libc.js';
import { MsixTable, PCI_CAP_ID_MSIX, msixCapability } from '../pci/msix.js';
import { PCI_BASE_ADDRESS_0, PCI_CAPABILITY_LIST, type PciCapability } from '../pci/root.js';
import {
  VirtioInterrupts,
  VirtioState,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VIRTIO_STATUS_DRIVER_OK,
  VIRTIO_STATUS_FEATURES_OK,
} from './device.js';
import { checkQueueLayout, QUEUE_RECORD, resetQueueRecord } from './queue.js';
import { describeVirtio, type VirtioDeviceConfig } from './catalogue.js';

/** PCI vendor ID of virtio devices, and the modern device IDs (0x1040 + virtio device ID). */
export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
export const VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040;
const PCI_CAP_ID_VNDR = 0x09;

// Configuration structure types (4.1.4).
export const VIRTIO_PCI_CAP_COMMON_CFG = 1;
export const VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
export const VIRTIO_PCI_CAP_ISR_CFG = 3;
export const VIRTIO_PCI_CAP_DEVICE_CFG = 4;

/** Where each structure sits in BAR 0. */
export const VIRTIO_BAR = {
  common: 0x0000,
  isr: 0x1000,
  device: 0x2000,
  notify: 0x3000,
  msixTable: 0x4000,
  msixPba: 0x5000,
  bytes: 0x8000,
} as const;
const REGION_BYTES = 0x1000;
/** queue_notify_off = queue index; notify address = notify + index * multiplier. */
export const VIRTIO_NOTIFY_OFF_MULTIPLIER = 4;

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

const KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;

/** A virtio_pci_cap (4.1.4) body: cap_len, cfg_type, bar, id, padding, offset, length[, multiplier]. */
function virtioCap(cfgType: number, offset: number, length: number, extra: number[] = []): PciCapability {
  const body = new Uint8Array(14 + 4 * extra.length);
  const dv = new DataView(body.buffer);
  dv.setUint8(0, 2 + body.length); // cap_len counts the ID and next bytes too
  dv.setUint8(1, cfgType);
  dv.setUint8(2, 0); // BAR 0
  dv.setUint32(6, offset, true);
  dv.setUint32(10, length, true);
  extra.forEach((v, i) => dv.setUint32(14 + 4 * i, v, true));
  return { id: PCI_CAP_ID_VNDR, body, writeMask: new Uint8Array(body.length) };
}

/** The capability list of a virtio-pci function. */
export function virtioCapabilities(vectors: number, configBytes: number): PciCapability[] {
  return [
    virtioCap(VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_BAR.common, COMMON_CFG.bytes),
    virtioCap(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_BAR.isr, 1),
    virtioCap(VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_BAR.device, Math.max(configBytes, 1)),
    virtioCap(VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_BAR.notify, REGION_BYTES, [VIRTIO_NOTIFY_OFF_MULTIPLIER]),
    msixCapability({
      vectors,
      tableBar: 0,
      tableOffset: VIRTIO_BAR.msixTable,
      pbaBar: 0,
      pbaOffset: VIRTIO_BAR.msixPba,
    }),
  ];
}

/**
 * A virtio-pci function: the device (its kind and that kind's options) and the
 * transport's own fields: the queues' eventfds, the INTx line, the control eventfd.
 */
export interface VirtioPciOptions {
  readonly device: VirtioDeviceConfig;
  /** One eventfd per queue: the ioeventfd KVM signals on a kick, and the I/O thread waits on. */
  readonly notifyFds: readonly number[];
  /** The GSI of INTA#, or -1. */
  readonly intxGsi: number;
  /** The host's request channel to the backend (VirtioDeviceType.controlChannel), or -1. */
  readonly controlFd: number;
}

/** The device's state over its shared memory, on this thread. */
export function virtioState(state: SharedArrayBuffer, options: VirtioPciOptions): VirtioState {
  return new VirtioState(state, describeVirtio(options.device));
}

/** The state a device has before the driver first touches it, as after a reset. */
function powerOnReset(s: VirtioState): void {
  s.view.setUint16(VirtioState.fields.configMsixVector, VIRTIO_MSI_NO_VECTOR, true);
  for (let q = 0; q < s.numQueues; q++) resetQueueRecord(s.queueRecord(q), s.type.maxQueueSize, VIRTIO_MSI_NO_VECTOR);
}

/** Registers or moves the ioeventfd of every queue to follow BAR 0 (base -1: decoding off). */
function syncEventfds(
  s: VirtioState,
  vmFd: number,
  fds: readonly number[],
  barBase: number,
  log: (line: string) => void,
): void {
  const vm = new VmFd(vmFd);
  for (let q = 0; q < s.numQueues; q++) {
    const rec = s.queueRecord(q);
    const current = rec.getUint32(QUEUE_RECORD.eventfdAddr, true);
    const wanted = barBase < 0 ? 0 : barBase + VIRTIO_BAR.notify + q * VIRTIO_NOTIFY_OFF_MULTIPLIER;
    if (current === wanted) continue;
    try {
      // 2-byte writes: what Linux (vp_iowrite16) and the kit's drivers use; other widths trap and are forwarded.
      if (current !== 0)
        vm.ioeventfd({ fd: fds[q]!, addr: BigInt(current), len: 2, flags: KVM_IOEVENTFD_FLAG_DEASSIGN });
      if (wanted !== 0) vm.ioeventfd({ fd: fds[q]!, addr: BigInt(wanted), len: 2, flags: 0 });
      rec.setUint32(QUEUE_RECORD.eventfdAddr, wanted, true);
    } catch (err) {
      if (!(err instanceof KvmIoctlError)) throw err;
      // Notifications still work, through the trapped write below.
      rec.setUint32(QUEUE_RECORD.eventfdAddr, 0, true);
      log(`virtio-${s.type.name}: queue ${q}: ${err.message}; notifications will trap instead`);
    }
  }
}

/** Where capability `id` starts in a configuration space, or -1. */
function capabilityAt(space: DataView, id: number): number {
  for (
    let at = space.getUint8(PCI_CAPABILITY_LIST), hops = 0;
    at !== 0 && hops < 48;
    at = space.getUint8(at + 1), hops++
  ) {
    if (space.getUint8(at) === id) return at;
  }
  return -1;
}

export const virtioPciModel: PciFunctionModel<VirtioPciOptions> = {
  stateBytes: (options) => VirtioState.bytes(describeVirtio(options.device)),
  init(state, options) {
    const s = virtioState(state, options);
    s.type.initConfig(s.config());
    powerOnReset(s);
    MsixTable.initialise(state, s.msixAt, s.vectors);
  },
  create(state, options, ctx: DeviceContext) {
    const s = virtioState(state, options);
    const type = s.type;
    const v = s.view;
    const F = VirtioState.fields;
    const irq = new VirtioInterrupts(s, ctx.signalMsi, ctx.setIrq, options.intxGsi);
    const fds = options.notifyFds;
    const log = (line: string) => ctx.log(line);
    const mem = ctx.memory;
    const maxSize = type.maxQueueSize;

    const selected = (): DataView | null => {
      const q = v.getUint16(F.queueSelect, true);
      return q < s.numQueues ? s.queueRecord(q) : null;
    };

    const reset = () => {
      const resets = v.getUint32(F.resets, true);
      const msixControl = s.msixControl;
      for (let i = 0; i < F.fixedBytes; i++) v.setUint8(i, 0);
      v.setUint32(F.resets, resets + 1, true);
      s.msixControl = msixControl;
      v.setUint16(F.configMsixVector, VIRTIO_MSI_NO_VECTOR, true);
      for (let q = 0; q < s.numQueues; q++) resetQueueRecord(s.queueRecord(q), maxSize, VIRTIO_MSI_NO_VECTOR);
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
        for (let q = 0; q < s.numQueues; q++)
          if (s.queueRecord(q).getUint16(QUEUE_RECORD.enable, true)) libc.signalEventfd(fds[q]!);
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

    const readCommon = (offset: number, data: Uint8Array) => {
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
          value = rec ? rec.getUint16(QUEUE_RECORD.msixVector, true) : VIRTIO_MSI_NO_VECTOR;
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

    const writeCommon = (offset: number, data: Uint8Array) => {
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
          if (sel < 2 && !(s.status & VIRTIO_STATUS_FEATURES_OK))
            v.setUint32(F.driverFeaturesLo + 4 * sel, value, true);
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
          if (rec) rec.setUint16(QUEUE_RECORD.msixVector, vector(value), true);
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

    const config = s.config();
    const bar: BusDevice = {
      read(offset, data) {
        if (offset < VIRTIO_BAR.common + COMMON_CFG.bytes) readCommon(offset, data);
        else if (offset === VIRTIO_BAR.isr) setAccessValue(data, irq.readIsr());
        else if (offset >= VIRTIO_BAR.device && offset + data.length <= VIRTIO_BAR.device + s.configBytes) {
          for (let i = 0; i < data.length; i++) data[i] = config.getUint8(offset - VIRTIO_BAR.device + i);
        } else if (offset >= VIRTIO_BAR.msixTable && offset < VIRTIO_BAR.msixPba)
          irq.msix.readTable(offset - VIRTIO_BAR.msixTable, data);
        else if (offset >= VIRTIO_BAR.msixPba && offset < VIRTIO_BAR.msixPba + REGION_BYTES)
          irq.msix.readPba(offset - VIRTIO_BAR.msixPba, data);
        else data.fill(0);
      },
      write(offset, data) {
        if (offset < VIRTIO_BAR.common + COMMON_CFG.bytes) writeCommon(offset, data);
        else if (offset >= VIRTIO_BAR.device && offset + data.length <= VIRTIO_BAR.device + s.configBytes)
          type.configWrite(config, offset - VIRTIO_BAR.device, data);
        else if (offset >= VIRTIO_BAR.notify && offset < VIRTIO_BAR.notify + REGION_BYTES) {
          const q = (offset - VIRTIO_BAR.notify) / VIRTIO_NOTIFY_OFF_MULTIPLIER;
          if (Number.isInteger(q) && q < s.numQueues) libc.signalEventfd(fds[q]!);
        } else if (offset >= VIRTIO_BAR.msixTable && offset < VIRTIO_BAR.msixPba)
          irq.msix.writeTable(offset - VIRTIO_BAR.msixTable, data);
      },
    };

    return {
      bar,
      barBytes: VIRTIO_BAR.bytes,
      configWritten(space) {
        const cap = capabilityAt(space, PCI_CAP_ID_MSIX);
        const before = s.msixControl;
        if (cap >= 0) s.msixControl = space.getUint16(cap + 2, true);
        if (s.msixControl !== before) irq.msix.deliverPending();
        const command = space.getUint16(4, true);
        const bar0 = space.getUint32(PCI_BASE_ADDRESS_0, true);
        syncEventfds(s, ctx.vmFd, fds, command & 0x2 ? (bar0 & ~0xf) >>> 0 : -1, log);
      },
    };
  },
};
