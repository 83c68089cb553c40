// The modern virtio-pci transport (virtio 1.2, 4.1): one 32 KiB memory BAR holding the
// common configuration, ISR, device configuration, notification area and the MSI-X
// table and PBA, announced by vendor-specific capabilities. Register accesses run on
// the vCPU thread that traps them; queue notifications do not: each queue's notify
// address has an ioeventfd, so a guest kick wakes the I/O thread (io-thread.ts) inside
// KVM without leaving the vCPU. A notify write that does reach Kiln (other widths) is
// forwarded to the same eventfd.
import type { BusDevice } from '../bus/bus.js';
import { setAccessValue } from '../bus/bus.js';
import type { DeviceContext, PciFunctionModel } from '../devices/device.js';
import { KvmIoctlError } from '../kvm/errors.js';
import { VmFd } from '../kvm/kvm.js';
import * as libc from '../kvm/libc.js';
import { array, struct } from '../kvm/struct.js';
import { MsixTable, PCI_CAP_ID_MSIX, msixCapability } from '../pci/msix.js';
import { PCI_BASE_ADDRESS_0, PCI_CAPABILITY_LIST, type PciCapability } from '../pci/root.js';
import { QUEUE_TRANSPORT, VirtioInterrupts, VirtioState, VIRTIO_MSI_NO_VECTOR } from './device.js';
import { describeVirtio, type VirtioDeviceConfig } from './catalogue.js';
import { COMMON_CFG, commonConfig, resetQueue } from './common-config.js';

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

export { COMMON_CFG } from './common-config.js';

const KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;

/** <linux/virtio_pci.h>'s struct virtio_pci_cap (virtio 1.2, 4.1.4). */
export const virtio_pci_cap = struct('virtio_pci_cap', [
  ['cap_vndr', 'u8'],
  ['cap_next', 'u8'],
  ['cap_len', 'u8'],
  ['cfg_type', 'u8'],
  ['bar', 'u8'],
  ['id', 'u8'],
  ['padding', array('u8', 2)],
  ['offset', 'u32'],
  ['length', 'u32'],
]);
/** struct virtio_pci_notify_cap: the capability, then notify_off_multiplier. */
export const virtio_pci_notify_cap = struct('virtio_pci_notify_cap', [
  ['cap', virtio_pci_cap],
  ['notify_off_multiplier', 'u32'],
]);

/** A virtio_pci_cap as a PciCapability: its body is everything after cap_vndr and cap_next. */
function virtioCap(cfgType: number, offset: number, length: number, multiplier?: number): PciCapability {
  const layout = multiplier === undefined ? virtio_pci_cap : virtio_pci_notify_cap;
  const bytes = new Uint8Array(layout.size);
  const dv = new DataView(bytes.buffer);
  const at = (field: string) =>
    multiplier === undefined ? virtio_pci_cap.offsetOf(field) : virtio_pci_notify_cap.offsetOf(`cap.${field}`);
  dv.setUint8(at('cap_vndr'), PCI_CAP_ID_VNDR);
  dv.setUint8(at('cap_len'), layout.size); // counts cap_vndr and cap_next too
  dv.setUint8(at('cfg_type'), cfgType);
  dv.setUint8(at('bar'), 0); // BAR 0
  dv.setUint32(at('offset'), offset, true);
  dv.setUint32(at('length'), length, true);
  if (multiplier !== undefined) dv.setUint32(virtio_pci_notify_cap.offsetOf('notify_off_multiplier'), multiplier, true);
  const body = bytes.subarray(at('cap_len'));
  return { id: PCI_CAP_ID_VNDR, body, writeMask: new Uint8Array(body.length) };
}

/** The capability list of a virtio-pci function. */
export function virtioCapabilities(vectors: number, configBytes: number): PciCapability[] {
  return [
    virtioCap(VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_BAR.common, COMMON_CFG.bytes),
    virtioCap(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_BAR.isr, 1),
    virtioCap(VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_BAR.device, Math.max(configBytes, 1)),
    virtioCap(VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_BAR.notify, REGION_BYTES, VIRTIO_NOTIFY_OFF_MULTIPLIER),
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
  for (let q = 0; q < s.numQueues; q++) resetQueue(s, q);
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
    const rec = s.transportRecord(q);
    const current = rec.getUint32(QUEUE_TRANSPORT.eventfdAddr, true);
    const wanted = barBase < 0 ? 0 : barBase + VIRTIO_BAR.notify + q * VIRTIO_NOTIFY_OFF_MULTIPLIER;
    if (current === wanted) continue;
    try {
      // 2-byte writes: what Linux (vp_iowrite16) and the kit's drivers use; other widths trap and are forwarded.
      if (current !== 0)
        vm.ioeventfd({ fd: fds[q]!, addr: BigInt(current), len: 2, flags: KVM_IOEVENTFD_FLAG_DEASSIGN });
      if (wanted !== 0) vm.ioeventfd({ fd: fds[q]!, addr: BigInt(wanted), len: 2, flags: 0 });
      rec.setUint32(QUEUE_TRANSPORT.eventfdAddr, wanted, true);
    } catch (err) {
      if (!(err instanceof KvmIoctlError)) throw err;
      // Notifications still work, through the trapped write below.
      rec.setUint32(QUEUE_TRANSPORT.eventfdAddr, 0, true);
      log(`virtio-${s.type.name}: queue ${q}: ${err.message}; notifications will trap instead`);
    }
  }
}

/**
 * After a restore into a new VM: what this VM's configuration decides written over the
 * snapshot's configuration space (VirtioDeviceType.restoredConfig), and, since KVM has
 * none of the old VM's ioeventfds, each queue registered afresh where the restored BAR 0
 * puts it.
 */
export function reattachEventfds(
  state: SharedArrayBuffer,
  options: VirtioPciOptions,
  space: DataView,
  vmFd: number,
  log: (line: string) => void,
): void {
  const s = virtioState(state, options);
  s.type.restoredConfig(s.config());
  for (let q = 0; q < s.numQueues; q++) s.transportRecord(q).setUint32(QUEUE_TRANSPORT.eventfdAddr, 0, true);
  const command = space.getUint16(4, true);
  const bar0 = space.getUint32(PCI_BASE_ADDRESS_0, true);
  syncEventfds(s, vmFd, options.notifyFds, command & 0x2 ? (bar0 & ~0xf) >>> 0 : -1, log);
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
    const irq = new VirtioInterrupts(s, ctx.signalMsi, ctx.setIrq, options.intxGsi);
    const fds = options.notifyFds;
    const log = (line: string) => ctx.log(line);
    const common = commonConfig(s, irq, { memory: ctx.memory, log, kick: (q) => libc.signalEventfd(fds[q]!) });
    const config = s.config();
    const bar: BusDevice = {
      read(offset, data) {
        if (offset < VIRTIO_BAR.common + COMMON_CFG.bytes) common.read(offset - VIRTIO_BAR.common, data);
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
        if (offset < VIRTIO_BAR.common + COMMON_CFG.bytes) common.write(offset - VIRTIO_BAR.common, data);
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
