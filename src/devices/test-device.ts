// The guest kit's test device, on either bus: a register file the guest reads and
// writes at any offset and width, and a log of every access (offset, width,
// direction, value) that tests read from the host side.
import { accessValue, type BusDevice } from '../bus/bus.js';
import { STATE_HEADER_BYTES, type DeviceModel } from './device.js';

/** How many register bytes the test device has (default 16). */
export interface TestDeviceOptions {
  readonly registerBytes?: number;
}

export const TEST_LOG_ENTRIES = 256;
// Each log entry: offset (u32), width | direction << 8 (u32), value as two u32 halves.
const ENTRY_WORDS = 4;
const LOG_COUNT_WORDS = 2;

function regions(state: SharedArrayBuffer, options: TestDeviceOptions) {
  const registerBytes = options.registerBytes ?? 16;
  const logWords = LOG_COUNT_WORDS + TEST_LOG_ENTRIES * ENTRY_WORDS;
  return {
    registerBytes,
    log: new Uint32Array(state, STATE_HEADER_BYTES, logWords),
    registers: new Uint8Array(state, STATE_HEADER_BYTES + logWords * 4, registerBytes),
  };
}

export const testDeviceModel: DeviceModel<TestDeviceOptions> = {
  stateBytes: (options) => (LOG_COUNT_WORDS + TEST_LOG_ENTRIES * ENTRY_WORDS) * 4 + (options.registerBytes ?? 16),
  create(state, options): BusDevice {
    const { registerBytes, log, registers } = regions(state, options);
    const record = (offset: number, data: Uint8Array, isWrite: boolean) => {
      const n = Atomics.load(log, 0);
      const at = LOG_COUNT_WORDS + (n % TEST_LOG_ENTRIES) * ENTRY_WORDS;
      const value = accessValue(data);
      log[at] = offset;
      log[at + 1] = data.length | (isWrite ? 1 << 8 : 0);
      log[at + 2] = value % 2 ** 32;
      log[at + 3] = Math.floor(value / 2 ** 32);
      Atomics.store(log, 0, n + 1);
    };
    return {
      read(offset, data) {
        for (let i = 0; i < data.length; i++) data[i] = offset + i < registerBytes ? registers[offset + i]! : 0xff;
        record(offset, data, false);
      },
      write(offset, data) {
        for (let i = 0; i < data.length && offset + i < registerBytes; i++) registers[offset + i] = data[i]!;
        record(offset, data, true);
      },
    };
  },
};

export interface TestAccess {
  readonly offset: number;
  readonly width: number;
  readonly write: boolean;
  readonly value: number;
}

/** Host-side view of a test device's state: its registers and its access log. */
export class TestDeviceState {
  private readonly log: Uint32Array;
  readonly registers: Uint8Array;

  constructor(state: SharedArrayBuffer, options: TestDeviceOptions) {
    const r = regions(state, options);
    this.log = r.log;
    this.registers = r.registers;
  }

  accesses(): TestAccess[] {
    const n = Atomics.load(this.log, 0);
    const out: TestAccess[] = [];
    for (let i = Math.max(0, n - TEST_LOG_ENTRIES); i < n; i++) {
      const at = LOG_COUNT_WORDS + (i % TEST_LOG_ENTRIES) * ENTRY_WORDS;
      const meta = this.log[at + 1]!;
      out.push({
        offset: this.log[at]!,
        width: meta & 0xff,
        write: meta >> 8 === 1,
        value: this.log[at + 2]! + this.log[at + 3]! * 2 ** 32,
      });
    }
    return out;
  }
}
