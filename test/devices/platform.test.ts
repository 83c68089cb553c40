// The 16550's interrupt logic, the ACPI PM registers, the i8042 and the RTC, through
// their bus interface with a recording context.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { BusDevice } from '../../src/bus/bus.js';
import type { DeviceContext, DeviceModel } from '../../src/devices/device.js';
import {
  allocateDeviceState,
  BUS_DEVICE_MODELS,
  type BusDeviceKind,
  type BusDeviceOptionsByKind,
} from '../../src/devices/catalogue.js';
import * as rtc from '../../src/devices/rtc.js';
import * as uart from '../../src/devices/serial.js';
import { deviceContext } from '../helpers.js';

interface Recorder extends DeviceContext {
  readonly irqs: string[];
  readonly exits: number[];
  readonly resets: string[];
}

function recorder(): Recorder {
  const irqs: string[] = [];
  const exits: number[] = [];
  const resets: string[] = [];
  return {
    irqs,
    exits,
    resets,
    ...deviceContext({
      setIrq: (irq, level) => irqs.push(`${irq}:${level}`),
      requestExit: (code) => exits.push(code),
      requestReset: (cause) => resets.push(cause),
    }),
  };
}

function make<K extends BusDeviceKind>(
  kind: K,
  ctx: DeviceContext,
  options: BusDeviceOptionsByKind[K],
): { device: BusDevice; state: SharedArrayBuffer } {
  const state = allocateDeviceState(kind, options);
  const model: DeviceModel<BusDeviceOptionsByKind[K]> = BUS_DEVICE_MODELS[kind];
  return { device: model.create(state, options, ctx), state };
}
const rd = (d: BusDevice, offset: number) => {
  const data = new Uint8Array(1);
  d.read(offset, data);
  return data[0]!;
};
const wr = (d: BusDevice, offset: number, value: number) => d.write(offset, Uint8Array.of(value));

test('16550: enabling THRI raises IRQ 4; reading IIR acknowledges it; each write raises it again', () => {
  const ctx = recorder();
  const { device } = make('serial', ctx, { outFd: -1, irq: 4 });
  assert.equal(rd(device, uart.UART_IIR_FCR) & 0x0f, uart.UART_IIR_NO_INT);
  wr(device, uart.UART_IER_DLM, uart.UART_IER_THRI);
  assert.deepEqual(ctx.irqs, ['4:1']);
  assert.equal(rd(device, uart.UART_IIR_FCR) & 0x0f, uart.UART_IIR_THRI);
  assert.deepEqual(ctx.irqs, ['4:1', '4:0'], 'acknowledged by the IIR read');
  wr(device, uart.UART_RBR_THR_DLL, 0x41);
  assert.deepEqual(ctx.irqs, ['4:1', '4:0', '4:1'], 'transmitter empty again after a write');
});

test('16550: host input sets DR and raises the receive interrupt, which outranks THRE', () => {
  const ctx = recorder();
  const { device, state } = make('serial', ctx, { outFd: -1, irq: 4 });
  const host = new uart.SerialHost(state, { outFd: -1, irq: 4 }, ctx.setIrq);
  wr(device, uart.UART_IER_DLM, uart.UART_IER_RDI | uart.UART_IER_THRI);
  assert.equal(host.input(Uint8Array.of(0x68, 0x69)), 2);
  assert.equal(rd(device, uart.UART_LSR) & uart.UART_LSR_DR, uart.UART_LSR_DR);
  assert.equal(rd(device, uart.UART_IIR_FCR) & 0x0f, uart.UART_IIR_RDI);
  assert.equal(rd(device, uart.UART_RBR_THR_DLL), 0x68);
  assert.equal(rd(device, uart.UART_RBR_THR_DLL), 0x69);
  assert.equal(rd(device, uart.UART_LSR) & uart.UART_LSR_DR, 0);
  assert.equal(rd(device, uart.UART_IIR_FCR) & 0x0f, uart.UART_IIR_THRI, 'then the pending THRE');
  assert.equal(ctx.irqs.at(-1), '4:0');
  assert.equal(
    host.input(new Uint8Array(uart.RX_BUFFER_BYTES + 10)),
    uart.RX_BUFFER_BYTES,
    'a full buffer drops the rest',
  );
});

test('16550: loopback returns transmitted bytes and mirrors modem control in MSR; FIFO clear', () => {
  const { device } = make('serial', recorder(), { outFd: -1, irq: 4 });
  wr(device, uart.UART_MCR, uart.UART_MCR_LOOP | uart.UART_MCR_OUT2 | uart.UART_MCR_RTS);
  assert.equal(
    rd(device, uart.UART_MSR) & 0xf0,
    uart.UART_MSR_DCD | uart.UART_MSR_CTS,
    'Linux autoconfig expects 0x90',
  );
  wr(device, uart.UART_RBR_THR_DLL, 0x5a);
  assert.equal(rd(device, uart.UART_RBR_THR_DLL), 0x5a);
  wr(device, uart.UART_RBR_THR_DLL, 0x11);
  wr(device, uart.UART_IIR_FCR, uart.UART_FCR_ENABLE_FIFO | uart.UART_FCR_CLEAR_RCVR);
  assert.equal(rd(device, uart.UART_LSR) & uart.UART_LSR_DR, 0, 'receive FIFO cleared');
  assert.equal(rd(device, uart.UART_IIR_FCR) & 0xc0, uart.UART_IIR_FIFO_ENABLED);
});

test('ACPI PM: SLP_TYP 5 with SLP_EN powers off with status 0; the reset value resets', () => {
  const ctx = recorder();
  const { device } = make('acpi-pm', ctx, {});
  wr(device, 0, 5 << 2); // SLP_TYP without SLP_EN: nothing
  wr(device, 0, (3 << 2) | 0x20); // another sleep state: nothing
  assert.deepEqual(ctx.exits, []);
  wr(device, 0, 0x34);
  assert.deepEqual(ctx.exits, [0]);
  wr(device, 2, 0x02);
  assert.deepEqual(ctx.resets, []);
  wr(device, 2, 0x01);
  assert.equal(ctx.resets.length, 1);
});

test('i8042: self test, controller configuration, and the reset line', () => {
  const ctx = recorder();
  const { device } = make('i8042', ctx, {});
  wr(device, 4, 0xaa);
  assert.equal(rd(device, 4) & 1, 1, 'output buffer full');
  assert.equal(rd(device, 0), 0x55);
  assert.equal(rd(device, 4) & 1, 0);
  wr(device, 4, 0x60);
  wr(device, 0, 0x47);
  wr(device, 4, 0x20);
  assert.equal(rd(device, 0), 0x47);
  wr(device, 4, 0xd1);
  wr(device, 0, 0x03); // reset line kept high
  assert.deepEqual(ctx.resets, []);
  wr(device, 4, 0xfe);
  assert.equal(ctx.resets.length, 1);
});

test("RTC: the host's UTC time in BCD or binary, 24- or 12-hour, and CMOS RAM", () => {
  const fixed = Date.UTC(2026, 10, 24, 21, 7, 9); // Tue 24 Nov 2026 21:07:09
  const { device } = make('rtc', recorder(), { fixedTimeMs: fixed });
  const reg = (index: number) => {
    wr(device, 0, index);
    return rd(device, 1);
  };
  assert.deepEqual([reg(rtc.RTC_SECONDS), reg(rtc.RTC_MINUTES), reg(rtc.RTC_HOURS)], [0x09, 0x07, 0x21]);
  assert.deepEqual(
    [reg(rtc.RTC_DAY_OF_MONTH), reg(rtc.RTC_MONTH), reg(rtc.RTC_YEAR), reg(rtc.RTC_CENTURY)],
    [0x24, 0x11, 0x26, 0x20],
  );
  assert.equal(reg(rtc.RTC_DAY_OF_WEEK), 3);
  assert.equal(reg(rtc.RTC_REG_D) & 0x80, 0x80, 'valid RAM and time');
  wr(device, 0, rtc.RTC_REG_B);
  wr(device, 1, rtc.RTC_B_BINARY); // binary, 12-hour
  assert.equal(reg(rtc.RTC_HOURS), 0x80 | 9, "PM flag with 9 o'clock");
  assert.equal(reg(rtc.RTC_SECONDS), 9);
  wr(device, 0, 0x40);
  wr(device, 1, 0x99);
  assert.equal(reg(0x40), 0x99);
  assert.equal(reg(0x80 | 0x40), 0x99, 'bit 7 of the index (NMI disable) is not part of it');
});
