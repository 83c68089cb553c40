// Saving a device's whole state mid-operation and restoring it into a fresh one: the
// restored device answers every register read exactly as the original does from there
// on (what snapshot/restore builds on), and a saved state only goes back into a device
// of the same kind, ID and layout.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { BusDevice } from '../../src/bus/bus.js';
import {
  allocateDeviceState,
  BUS_DEVICE_MODELS,
  PCI_FUNCTION_MODELS,
  restoreDevice,
  saveDevice,
  type DeviceSpec,
} from '../../src/devices/catalogue.js';
import type { DeviceContext } from '../../src/devices/device.js';
import * as uart from '../../src/devices/serial.js';
import type { GuestMemory } from '../../src/memory/guest-memory.js';
import { COMMON_CFG, VIRTIO_BAR, type VirtioPciOptions } from '../../src/virtio/pci.js';

const ctx: DeviceContext = {
  requestExit: () => assert.fail('unexpected exit'),
  requestReset: () => assert.fail('unexpected reset'),
  setIrq: () => undefined,
  signalMsi: () => undefined,
  log: (line) => assert.fail(`unexpected log line: ${line}`),
  // No queue is enabled and no BAR moves here, so neither guest memory nor the VM fd is touched.
  memory: {} as GuestMemory,
  vmFd: -1,
  pciFunctions: new Map(),
};

const read = (d: BusDevice, offset: number, width = 1): number => {
  const data = new Uint8Array(width);
  d.read(offset, data);
  return data.reduce((v, b, i) => v + b * 2 ** (8 * i), 0);
};
const write = (d: BusDevice, offset: number, value: number, width = 1): void => {
  const data = new Uint8Array(width);
  for (let i = 0; i < width; i++) data[i] = Math.floor(value / 2 ** (8 * i)) & 0xff;
  d.write(offset, data);
};

/** A fresh COM1: its spec and options. */
function com1(): { spec: DeviceSpec<'serial'>; options: { outFd: number; irq: number } } {
  const options = { outFd: -1, irq: 4 };
  return {
    spec: {
      id: 'com1',
      kind: 'serial',
      bus: 'pio',
      base: 0x3f8,
      size: 8,
      state: allocateDeviceState('serial', options),
      options,
    },
    options,
  };
}

test('16550 mid-transfer: the restored UART reads back the same registers and the rest of the FIFO', () => {
  const { spec, options } = com1();
  const original = BUS_DEVICE_MODELS.serial.create(spec.state, options, ctx);
  write(original, uart.UART_LCR, uart.UART_LCR_DLAB);
  write(original, uart.UART_RBR_THR_DLL, 0x0c); // 9600 baud
  write(original, uart.UART_LCR, 0x03); // 8N1, DLAB off
  write(original, uart.UART_IER_DLM, uart.UART_IER_RDI | uart.UART_IER_THRI);
  write(original, uart.UART_IIR_FCR, uart.UART_FCR_ENABLE_FIFO);
  write(original, uart.UART_MCR, uart.UART_MCR_DTR | uart.UART_MCR_OUT2);
  write(original, uart.UART_SCR, 0x5a);
  new uart.SerialHost(spec.state, options, () => undefined).input(Buffer.from('hello'));
  assert.equal(read(original, uart.UART_RBR_THR_DLL), 'h'.charCodeAt(0), 'the guest has read one byte');

  const saved = saveDevice(spec);
  const fresh: DeviceSpec<'serial'> = { ...spec, state: allocateDeviceState('serial', options) };
  restoreDevice(fresh, saved);
  const restored = BUS_DEVICE_MODELS.serial.create(fresh.state, options, ctx);

  const script = [
    uart.UART_LSR,
    uart.UART_IIR_FCR,
    uart.UART_IER_DLM,
    uart.UART_LCR,
    uart.UART_MCR,
    uart.UART_MSR,
    uart.UART_SCR,
    ...Array<number>(4).fill(uart.UART_RBR_THR_DLL),
    uart.UART_LSR,
    uart.UART_IIR_FCR,
  ];
  const before = script.map((r) => read(original, r));
  const after = script.map((r) => read(restored, r));
  assert.deepEqual(after, before);
  assert.equal(Buffer.from(after.slice(7, 11)).toString(), 'ello', 'the FIFO went on where it was');
  assert.equal(after[6], 0x5a);
  // The divisor latch too.
  write(original, uart.UART_LCR, uart.UART_LCR_DLAB | 0x03);
  write(restored, uart.UART_LCR, uart.UART_LCR_DLAB | 0x03);
  assert.equal(read(restored, uart.UART_RBR_THR_DLL), read(original, uart.UART_RBR_THR_DLL));
  assert.equal(read(restored, uart.UART_RBR_THR_DLL), 0x0c);
});

test('virtio-pci mid-negotiation: common configuration, device configuration and MSI-X table read back the same', () => {
  const options: VirtioPciOptions = {
    device: { kind: 'balloon', options: { targetPages: 42, deflateOnOom: true } },
    notifyFds: [-1, -1, -1, -1],
    intxGsi: -1,
    controlFd: -1,
  };
  const spec: DeviceSpec<'virtio-pci'> = {
    id: 'balloon',
    kind: 'virtio-pci',
    bus: 'pci',
    base: 3,
    size: 1,
    state: allocateDeviceState('virtio-pci', options),
    options,
  };
  const original = PCI_FUNCTION_MODELS['virtio-pci'].create(spec.state, options, ctx).bar;
  const C = VIRTIO_BAR.common;
  write(original, C + COMMON_CFG.deviceStatus, 1 | 2); // ACKNOWLEDGE | DRIVER
  write(original, C + COMMON_CFG.driverFeatureSelect, 1, 4);
  write(original, C + COMMON_CFG.driverFeature, 1, 4); // VIRTIO_F_VERSION_1
  write(original, C + COMMON_CFG.configMsixVector, 0, 2);
  write(original, C + COMMON_CFG.queueSelect, 2, 2);
  write(original, C + COMMON_CFG.queueSize, 64, 2);
  write(original, C + COMMON_CFG.queueMsixVector, 3, 2);
  write(original, C + COMMON_CFG.queueDesc, 0x10_0000, 4);
  write(original, C + COMMON_CFG.queueDriver, 0x10_1000, 4);
  // MSI-X vector 3: an address, data, unmasked.
  write(original, VIRTIO_BAR.msixTable + 3 * 16, 0xfee0_0000, 4);
  write(original, VIRTIO_BAR.msixTable + 3 * 16 + 8, 0x41, 4);
  write(original, VIRTIO_BAR.msixTable + 3 * 16 + 12, 0, 4);

  const saved = saveDevice(spec);
  const fresh: DeviceSpec<'virtio-pci'> = { ...spec, state: allocateDeviceState('virtio-pci', options) };
  restoreDevice(fresh, saved);
  const restored = PCI_FUNCTION_MODELS['virtio-pci'].create(fresh.state, options, ctx).bar;

  const reads: Array<[number, number]> = [
    [C + COMMON_CFG.deviceFeatureSelect, 4],
    [C + COMMON_CFG.deviceFeature, 4],
    [C + COMMON_CFG.driverFeatureSelect, 4],
    [C + COMMON_CFG.driverFeature, 4],
    [C + COMMON_CFG.configMsixVector, 2],
    [C + COMMON_CFG.numQueues, 2],
    [C + COMMON_CFG.deviceStatus, 1],
    [C + COMMON_CFG.configGeneration, 1],
    [C + COMMON_CFG.queueSelect, 2],
    [C + COMMON_CFG.queueSize, 2],
    [C + COMMON_CFG.queueMsixVector, 2],
    [C + COMMON_CFG.queueEnable, 2],
    [C + COMMON_CFG.queueNotifyOff, 2],
    [C + COMMON_CFG.queueDesc, 4],
    [C + COMMON_CFG.queueDriver, 4],
    [VIRTIO_BAR.device, 4], // num_pages
    [VIRTIO_BAR.device + 4, 4], // actual
    ...Array.from({ length: 5 * 4 }, (_, i): [number, number] => [VIRTIO_BAR.msixTable + 4 * i, 4]),
    [VIRTIO_BAR.msixPba, 4],
    [VIRTIO_BAR.isr, 1],
  ];
  const before = reads.map(([offset, width]) => read(original, offset, width));
  const after = reads.map(([offset, width]) => read(restored, offset, width));
  assert.deepEqual(after, before);
  assert.equal(after[9], 64, 'queue 2 keeps the size the driver chose');
  assert.equal(after[15], 42, 'the balloon target is in the device configuration');
  assert.equal(after[6], 3, 'status ACKNOWLEDGE | DRIVER');
});

test('a saved state goes back only into the same kind, ID and layout', () => {
  const { spec } = com1();
  const saved = saveDevice(spec);
  assert.throws(() => restoreDevice({ ...spec, id: 'com2' }, saved), /does not match device com2/);
  const rtc: DeviceSpec<'rtc'> = {
    id: 'com1',
    kind: 'rtc',
    bus: 'pio',
    base: 0x70,
    size: 2,
    state: allocateDeviceState('rtc', {}),
    options: {},
  };
  assert.throws(() => restoreDevice(rtc, saved), /saved device com1 \(serial\) does not match device com1 \(rtc\)/);
  assert.throws(
    () => restoreDevice(spec, { ...saved, state: saved.state.subarray(1) }),
    /bytes of state, the device has/,
  );
});
