// Register-level behaviour of the legacy devices, driven through their bus interface.
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import type { BusDevice } from '../../src/bus/bus.js';
import { debugExitModel } from '../../src/devices/debug-exit.js';
import type { DeviceContext, DeviceModel } from '../../src/devices/device.js';
import { PROGRESS_HISTORY, progressModel, readProgress } from '../../src/devices/progress.js';
import {
  allocateDeviceState,
  BUS_DEVICE_MODELS,
  type BusDeviceKind,
  type BusDeviceOptionsByKind,
} from '../../src/devices/catalogue.js';
import * as uart from '../../src/devices/serial.js';
import { deviceContext, tempDir } from '../helpers.js';

const noExit: DeviceContext = deviceContext({
  requestExit: () => assert.fail('unexpected exit request'),
  setIrq: () => undefined,
  requestReset: () => assert.fail('unexpected reset'),
});

function make<K extends BusDeviceKind>(
  kind: K,
  options: BusDeviceOptionsByKind[K],
  ctx = noExit,
): { device: BusDevice; state: SharedArrayBuffer } {
  const state = allocateDeviceState(kind, options);
  const model: DeviceModel<BusDeviceOptionsByKind[K]> = BUS_DEVICE_MODELS[kind];
  return { device: model.create(state, options, ctx), state };
}

function readBytes(d: BusDevice, offset: number, width: number): number[] {
  const data = new Uint8Array(width);
  d.read(offset, data);
  return [...data];
}
const read = (d: BusDevice, offset: number): number => readBytes(d, offset, 1)[0]!;

test('16550: transmitted bytes reach the output descriptor in order', () => {
  const file = join(tempDir(), 'serial.out');
  const fd = openSync(file, 'w');
  try {
    const { device } = make('serial', { outFd: fd, irq: 4 });
    for (const c of Buffer.from('hello\n')) device.write(uart.UART_RBR_THR_DLL, Uint8Array.of(c));
  } finally {
    closeSync(fd);
  }
  assert.equal(readFileSync(file, 'utf8'), 'hello\n');
});

test('16550: divisor latch, scratch and line status behave as on the chip', () => {
  const { device } = make('serial', { outFd: -1, irq: 4 });
  assert.equal(read(device, uart.UART_LSR), uart.UART_LSR_THRE | uart.UART_LSR_TEMT, 'transmitter idle');
  assert.equal(read(device, uart.UART_IIR_FCR) & 0x0f, uart.UART_IIR_NO_INT);
  device.write(uart.UART_LCR, Uint8Array.of(uart.UART_LCR_DLAB | 0x03));
  device.write(uart.UART_RBR_THR_DLL, Uint8Array.of(0x01)); // 115200 baud
  device.write(uart.UART_IER_DLM, Uint8Array.of(0x00));
  assert.equal(read(device, uart.UART_RBR_THR_DLL), 0x01);
  device.write(uart.UART_LCR, Uint8Array.of(0x03));
  device.write(uart.UART_IER_DLM, Uint8Array.of(0x0f));
  assert.equal(read(device, uart.UART_IER_DLM), 0x0f, 'IER, not DLM, with DLAB clear');
  assert.equal(read(device, uart.UART_LCR), 0x03);
  device.write(uart.UART_SCR, Uint8Array.of(0x5a));
  assert.equal(read(device, uart.UART_SCR), 0x5a);
  device.write(uart.UART_IIR_FCR, Uint8Array.of(uart.UART_FCR_ENABLE_FIFO));
  assert.equal(read(device, uart.UART_IIR_FCR) & 0xc0, uart.UART_IIR_FIFO_ENABLED);
  assert.equal(read(device, uart.UART_MSR), uart.UART_MSR_IDLE_LINE);
});

test('16550: two devices built from one state (two vCPU threads) share registers', () => {
  const options = { outFd: -1, irq: 4 };
  const state = allocateDeviceState('serial', options);
  const a = BUS_DEVICE_MODELS.serial.create(state, options, noExit);
  const b = BUS_DEVICE_MODELS.serial.create(state, options, noExit);
  a.write(uart.UART_SCR, Uint8Array.of(0x33));
  assert.equal(read(b, uart.UART_SCR), 0x33);
});

test('progress port keeps the last value, the count and recent history', () => {
  const state = allocateDeviceState('progress', {});
  const device = progressModel.create(state, {}, noExit);
  for (let i = 1; i <= PROGRESS_HISTORY + 3; i++) device.write(0, Uint8Array.of(i & 0xff, 0, 0, 0));
  device.write(0, Uint8Array.of(0x34, 0x12));
  const snap = readProgress(state);
  assert.equal(snap.count, PROGRESS_HISTORY + 4);
  assert.equal(snap.last, 0x1234);
  assert.equal(snap.recent.length, PROGRESS_HISTORY);
  assert.equal(snap.recent[0], 5);
  assert.equal(snap.recent.at(-1), 0x1234);
  assert.deepEqual(readBytes(device, 0, 4), [0x34, 0x12, 0, 0]);
});

test('debug-exit asks for a VM exit with the written status', () => {
  const requests: number[] = [];
  const device = debugExitModel.create(
    new SharedArrayBuffer(8),
    {},
    deviceContext({
      requestExit: (code) => requests.push(code),
      setIrq: () => undefined,
      requestReset: () => assert.fail('unexpected reset'),
    }),
  );
  device.write(0, Uint8Array.of(3));
  device.write(0, Uint8Array.of(0x01, 0x01)); // 0x101: only the low byte is a status
  assert.deepEqual(requests, [3, 1]);
  assert.equal(read(device, 0), 0);
});

test('test device stores what is written and logs every access', () => {
  const { device } = make('test-device', { registerBytes: 8 });
  device.write(2, Uint8Array.of(0xaa, 0xbb));
  assert.deepEqual(readBytes(device, 2, 2), [0xaa, 0xbb]);
  assert.deepEqual(readBytes(device, 7, 2), [0, 0xff], 'bytes past the register file read as 0xff');
});

test('an unknown device kind is refused', () => {
  assert.throws(() => allocateDeviceState('floppy' as BusDeviceKind, {}), /unknown device kind 'floppy'/);
});
