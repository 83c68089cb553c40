// A 16550A UART (COM1): transmit to a host file descriptor, receive from the host
// (terminal or socket) through a FIFO, interrupts on IRQ 4 for received data and for
// an empty transmitter (Linux's tty layer needs THRE interrupts to write), the FIFO
// control and identification bits, and loopback mode (Linux's autoconfig tests it).
//
// The state lives in shared memory: vCPU threads reach it through the bus (which holds
// the device lock), the main thread through SerialHost (which takes the lock itself).
import { fstatSync } from 'node:fs';
import type { BusDevice } from '../bus/bus.js';
import { SharedLock } from '../bus/shared-lock.js';
import * as libc from '../kvm/libc.js';
import { LOCK_INDEX, STATE_HEADER_BYTES, type DeviceModel } from './device.js';

// Register offsets (PC16550D data sheet), DLAB = LCR bit 7 selecting the divisor latch.
export const UART_RBR_THR_DLL = 0;
export const UART_IER_DLM = 1;
export const UART_IIR_FCR = 2;
export const UART_LCR = 3;
export const UART_MCR = 4;
export const UART_LSR = 5;
export const UART_MSR = 6;
export const UART_SCR = 7;

export const UART_LCR_DLAB = 0x80;
export const UART_IER_RDI = 0x01;
export const UART_IER_THRI = 0x02;
export const UART_IIR_NO_INT = 0x01;
export const UART_IIR_THRI = 0x02;
export const UART_IIR_RDI = 0x04;
export const UART_IIR_FIFO_ENABLED = 0xc0;
export const UART_FCR_ENABLE_FIFO = 0x01;
export const UART_FCR_CLEAR_RCVR = 0x02;
export const UART_LSR_DR = 0x01;
export const UART_LSR_THRE = 0x20;
export const UART_LSR_TEMT = 0x40;
export const UART_MCR_DTR = 0x01;
export const UART_MCR_RTS = 0x02;
export const UART_MCR_OUT1 = 0x04;
export const UART_MCR_OUT2 = 0x08;
export const UART_MCR_LOOP = 0x10;
export const UART_MSR_CTS = 0x10;
export const UART_MSR_DSR = 0x20;
export const UART_MSR_RI = 0x40;
export const UART_MSR_DCD = 0x80;
/** Carrier detect, data set ready and clear to send: a connected, idle line. */
export const UART_MSR_IDLE_LINE = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS;

/** Receive buffer: larger than the chip's 16 bytes so pasted input is not dropped. */
export const RX_BUFFER_BYTES = 4096;

// Shared state: register bytes, then the receive ring's head/tail, then the ring.
const S_DLL = 0;
const S_DLM = 1;
const S_IER = 2;
const S_LCR = 3;
const S_MCR = 4;
const S_SCR = 5;
const S_FCR = 6;
const S_THRE_PENDING = 7;
const S_IRQ_LEVEL = 8;
const REG_BYTES = 16;
const RING_WORDS_AT = STATE_HEADER_BYTES + REG_BYTES;
const RING_AT = RING_WORDS_AT + 8;
const STATE_BYTES = REG_BYTES + 8 + RX_BUFFER_BYTES;

/** The UART's behaviour over its shared state; the caller holds the device lock. */
class Uart16550 implements BusDevice {
  private readonly reg: Uint8Array;
  private readonly ring: Uint32Array;
  private readonly rx: Uint8Array;
  private readonly byte = Buffer.alloc(1);
  /** Output bytes dropped on this thread because nobody read them (the line does not wait). */
  dropped = 0;

  constructor(
    state: SharedArrayBuffer,
    private readonly outFd: number,
    private readonly irq: number,
    private readonly setIrq: (irq: number, level: 0 | 1) => void,
    private readonly log: (line: string) => void = () => undefined,
  ) {
    this.reg = new Uint8Array(state, STATE_HEADER_BYTES, REG_BYTES);
    this.ring = new Uint32Array(state, RING_WORDS_AT, 2);
    this.rx = new Uint8Array(state, RING_AT, RX_BUFFER_BYTES);
  }

  private get rxCount(): number {
    return this.ring[1]! - this.ring[0]!;
  }

  /** Appends received bytes; returns how many fit. */
  receive(data: Uint8Array): number {
    let n = 0;
    for (; n < data.length && this.rxCount < RX_BUFFER_BYTES; n++) {
      this.rx[this.ring[1]! % RX_BUFFER_BYTES] = data[n]!;
      this.ring[1] = this.ring[1]! + 1;
    }
    this.updateIrq();
    return n;
  }

  private pop(): number {
    if (this.rxCount === 0) return 0;
    const value = this.rx[this.ring[0]! % RX_BUFFER_BYTES]!;
    this.ring[0] = this.ring[0]! + 1;
    return value;
  }

  private dlab(): boolean {
    return (this.reg[S_LCR]! & UART_LCR_DLAB) !== 0;
  }

  /** The highest-priority pending interrupt, as IIR bits 3:0. */
  private pendingInterrupt(): number {
    const ier = this.reg[S_IER]!;
    if (ier & UART_IER_RDI && this.rxCount > 0) return UART_IIR_RDI;
    if (ier & UART_IER_THRI && this.reg[S_THRE_PENDING]) return UART_IIR_THRI;
    return UART_IIR_NO_INT;
  }

  private updateIrq(): void {
    const level = this.pendingInterrupt() === UART_IIR_NO_INT ? 0 : 1;
    if (level !== this.reg[S_IRQ_LEVEL]) {
      this.reg[S_IRQ_LEVEL] = level;
      this.setIrq(this.irq, level);
    }
  }

  private modemStatus(): number {
    const mcr = this.reg[S_MCR]!;
    if (!(mcr & UART_MCR_LOOP)) return UART_MSR_IDLE_LINE;
    // Loopback: the modem outputs come back as the modem inputs.
    return (
      (mcr & UART_MCR_RTS ? UART_MSR_CTS : 0) |
      (mcr & UART_MCR_DTR ? UART_MSR_DSR : 0) |
      (mcr & UART_MCR_OUT1 ? UART_MSR_RI : 0) |
      (mcr & UART_MCR_OUT2 ? UART_MSR_DCD : 0)
    );
  }

  read(offset: number, data: Uint8Array): void {
    let value = 0;
    switch (offset) {
      case UART_RBR_THR_DLL:
        value = this.dlab() ? this.reg[S_DLL]! : this.pop();
        break;
      case UART_IER_DLM:
        value = this.dlab() ? this.reg[S_DLM]! : this.reg[S_IER]!;
        break;
      case UART_IIR_FCR: {
        const pending = this.pendingInterrupt();
        // Reading IIR acknowledges a transmitter-empty interrupt.
        if (pending === UART_IIR_THRI) this.reg[S_THRE_PENDING] = 0;
        value = pending | (this.reg[S_FCR]! & UART_FCR_ENABLE_FIFO ? UART_IIR_FIFO_ENABLED : 0);
        break;
      }
      case UART_LCR:
        value = this.reg[S_LCR]!;
        break;
      case UART_MCR:
        value = this.reg[S_MCR]!;
        break;
      case UART_LSR:
        value = UART_LSR_THRE | UART_LSR_TEMT | (this.rxCount > 0 ? UART_LSR_DR : 0);
        break;
      case UART_MSR:
        value = this.modemStatus();
        break;
      case UART_SCR:
        value = this.reg[S_SCR]!;
        break;
    }
    data.fill(0);
    data[0] = value;
    this.updateIrq();
  }

  write(offset: number, data: Uint8Array): void {
    const value = data[0]!;
    switch (offset) {
      case UART_RBR_THR_DLL:
        if (this.dlab()) {
          this.reg[S_DLL] = value;
          break;
        }
        if (this.reg[S_MCR]! & UART_MCR_LOOP) {
          this.byte[0] = value;
          this.receive(this.byte);
        } else if (this.outFd >= 0) {
          this.byte[0] = value;
          // A full pipe or a closed terminal drops the byte, as a real line would: the fd is
          // non-blocking (serialModel.init), so a reader that stops never stops this vCPU.
          if (libc.write(this.outFd, this.byte, 1) !== 1 && this.dropped++ === 0)
            this.log(`serial output is not being read (${libc.errnoName(libc.errno())}); output bytes are dropped`);
        }
        // Transmission is instant: the holding register is empty again.
        this.reg[S_THRE_PENDING] = 1;
        break;
      case UART_IER_DLM:
        if (this.dlab()) this.reg[S_DLM] = value;
        else {
          const enabling = value & UART_IER_THRI && !(this.reg[S_IER]! & UART_IER_THRI);
          this.reg[S_IER] = value & 0x0f;
          if (enabling) this.reg[S_THRE_PENDING] = 1;
        }
        break;
      case UART_IIR_FCR:
        if (value & UART_FCR_CLEAR_RCVR) this.ring[0] = this.ring[1]!;
        this.reg[S_FCR] = value;
        break;
      case UART_LCR:
        this.reg[S_LCR] = value;
        break;
      case UART_MCR:
        this.reg[S_MCR] = value & 0x1f;
        break;
      case UART_SCR:
        this.reg[S_SCR] = value;
        break;
    }
    this.updateIrq();
  }
}

/** Where the UART's output goes (-1: nowhere) and its interrupt line. */
export interface SerialOptions {
  readonly outFd: number;
  readonly irq: number;
}

export const serialModel: DeviceModel<SerialOptions> = {
  stateBytes: () => STATE_BYTES,
  create(state, options, ctx): BusDevice {
    return new Uart16550(state, options.outFd, options.irq, ctx.setIrq, (line) => ctx.log(line));
  },
};

/** The UART's output fd as the vCPU threads must use it: one whose writes never wait. */
export function serialOutput(fd: number): number {
  let regular = false;
  try {
    regular = fd >= 0 && fstatSync(fd).isFile();
  } catch {
    // a closed fd: writes to it fail and drop, which is all a line without a reader can do
  }
  return libc.nonBlockingOutput(fd, regular);
}

/** The host's side of a UART: input from the terminal or a socket. Any thread. */
export class SerialHost {
  private readonly uart: Uart16550;
  private readonly lock: SharedLock;

  constructor(state: SharedArrayBuffer, options: SerialOptions, setIrq: (irq: number, level: 0 | 1) => void) {
    this.uart = new Uart16550(state, -1, options.irq, setIrq);
    this.lock = new SharedLock(new Int32Array(state, 0, 1), LOCK_INDEX);
  }

  /** Queues bytes for the guest to read; returns how many fit in the receive buffer. */
  input(data: Uint8Array): number {
    this.lock.lock();
    try {
      return this.uart.receive(data);
    } finally {
      this.lock.unlock();
    }
  }
}
