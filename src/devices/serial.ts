// A 16550A UART at COM1, transmit side: the guest's bytes go to a host file descriptor
// (the terminal, a log file). Divisor latch, IER, LCR, MCR and scratch registers keep
// what the guest writes; LSR always reports an empty transmitter. Receive, FIFO and
// interrupts arrive with the Linux boot issue.
import type { BusDevice } from '../bus/bus.js';
import * as libc from '../kvm/libc.js';
import { numberOption, STATE_HEADER_BYTES, type DeviceModel } from './device.js';

// Register offsets (16550 data sheet), with DLAB (LCR bit 7) selecting the divisor latch.
export const UART_RBR_THR_DLL = 0;
export const UART_IER_DLM = 1;
export const UART_IIR_FCR = 2;
export const UART_LCR = 3;
export const UART_MCR = 4;
export const UART_LSR = 5;
export const UART_MSR = 6;
export const UART_SCR = 7;

export const UART_LCR_DLAB = 0x80;
export const UART_LSR_THRE = 0x20;
export const UART_LSR_TEMT = 0x40;
export const UART_IIR_NO_INT = 0x01;
export const UART_IIR_FIFO_ENABLED = 0xc0;
export const UART_FCR_ENABLE_FIFO = 0x01;
/** Carrier detect, data set ready and clear to send: a connected, idle line. */
export const UART_MSR_IDLE_LINE = 0xb0;

// Shared state: one byte per stored register.
const S_DLL = 0;
const S_DLM = 1;
const S_IER = 2;
const S_LCR = 3;
const S_MCR = 4;
const S_SCR = 5;
const S_FCR = 6;
const STATE_BYTES = 8;

export const serialModel: DeviceModel = {
  stateBytes: () => STATE_BYTES,
  create(state, options): BusDevice {
    const reg = new Uint8Array(state, STATE_HEADER_BYTES, STATE_BYTES);
    const outFd = numberOption(options, 'outFd', -1);
    const byte = Buffer.alloc(1);
    const dlab = () => (reg[S_LCR]! & UART_LCR_DLAB) !== 0;
    return {
      read(offset, data) {
        let value = 0;
        switch (offset) {
          case UART_RBR_THR_DLL:
            value = dlab() ? reg[S_DLL]! : 0;
            break;
          case UART_IER_DLM:
            value = dlab() ? reg[S_DLM]! : reg[S_IER]!;
            break;
          case UART_IIR_FCR:
            value = UART_IIR_NO_INT | (reg[S_FCR]! & UART_FCR_ENABLE_FIFO ? UART_IIR_FIFO_ENABLED : 0);
            break;
          case UART_LCR:
            value = reg[S_LCR]!;
            break;
          case UART_MCR:
            value = reg[S_MCR]!;
            break;
          case UART_LSR:
            value = UART_LSR_THRE | UART_LSR_TEMT;
            break;
          case UART_MSR:
            value = UART_MSR_IDLE_LINE;
            break;
          case UART_SCR:
            value = reg[S_SCR]!;
            break;
        }
        data.fill(0);
        data[0] = value;
      },
      write(offset, data) {
        const value = data[0]!;
        switch (offset) {
          case UART_RBR_THR_DLL:
            if (dlab()) reg[S_DLL] = value;
            else if (outFd >= 0) {
              byte[0] = value;
              // A full pipe or a closed terminal drops the byte, as a real line would.
              libc.write(outFd, byte, 1);
            }
            break;
          case UART_IER_DLM:
            if (dlab()) reg[S_DLM] = value;
            else reg[S_IER] = value & 0x0f;
            break;
          case UART_IIR_FCR:
            reg[S_FCR] = value;
            break;
          case UART_LCR:
            reg[S_LCR] = value;
            break;
          case UART_MCR:
            reg[S_MCR] = value & 0x1f;
            break;
          case UART_SCR:
            reg[S_SCR] = value;
            break;
        }
      },
    };
  },
};
