// The i8042 keyboard controller, as far as a VM needs it: enough of the command set
// for a driver to probe it, and the reset line (command 0xFE, or output-port bit 0
// cleared through command 0xD1), which ends the VM as a reset. No keyboard is attached.
// Ports: data at offset 0 (0x60), status/command at offset 4 (0x64).
import type { BusDevice } from '../bus/bus.js';
import { STATE_HEADER_BYTES, type DeviceModel, type NoOptions } from './device.js';

const DATA = 0;
const COMMAND = 4;
export const I8042_CMD_READ_CTR = 0x20;
export const I8042_CMD_WRITE_CTR = 0x60;
export const I8042_CMD_SELF_TEST = 0xaa;
export const I8042_CMD_KBD_TEST = 0xab;
export const I8042_CMD_WRITE_OUTPUT_PORT = 0xd1;
export const I8042_CMD_PULSE_RESET = 0xfe;
export const I8042_STATUS_OBF = 0x01;
export const I8042_STATUS_SYSTEM = 0x04;
export const I8042_STATUS_CMD = 0x08;
const SELF_TEST_OK = 0x55;
const OUTPUT_PORT_RESET_HIGH = 0x01;

// Shared state bytes.
const S_OUTPUT = 0;
const S_OBF = 1;
const S_CTR = 2;
const S_PENDING = 3; // command awaiting a data byte
const S_LAST_WAS_CMD = 4;

export const i8042Model: DeviceModel<NoOptions> = {
  stateBytes: () => 8,
  create(state, _options, ctx): BusDevice {
    const s = new Uint8Array(state, STATE_HEADER_BYTES, 8);
    const output = (value: number) => {
      s[S_OUTPUT] = value;
      s[S_OBF] = 1;
    };
    return {
      read(offset, data) {
        data.fill(0);
        if (offset === COMMAND) {
          data[0] =
            I8042_STATUS_SYSTEM | (s[S_LAST_WAS_CMD] ? I8042_STATUS_CMD : 0) | (s[S_OBF] ? I8042_STATUS_OBF : 0);
        } else if (offset === DATA) {
          data[0] = s[S_OUTPUT]!;
          s[S_OBF] = 0;
        }
      },
      write(offset, data) {
        const value = data[0]!;
        if (offset === COMMAND) {
          s[S_LAST_WAS_CMD] = 1;
          switch (value) {
            case I8042_CMD_PULSE_RESET:
              ctx.requestReset('the guest reset the machine (i8042 reset line)');
              break;
            case I8042_CMD_READ_CTR:
              output(s[S_CTR]!);
              break;
            case I8042_CMD_WRITE_CTR:
            case I8042_CMD_WRITE_OUTPUT_PORT:
              s[S_PENDING] = value;
              break;
            case I8042_CMD_SELF_TEST:
              output(SELF_TEST_OK);
              break;
            case I8042_CMD_KBD_TEST:
              output(0);
              break;
          }
        } else if (offset === DATA) {
          s[S_LAST_WAS_CMD] = 0;
          const pending = s[S_PENDING];
          s[S_PENDING] = 0;
          if (pending === I8042_CMD_WRITE_CTR) s[S_CTR] = value;
          else if (pending === I8042_CMD_WRITE_OUTPUT_PORT && !(value & OUTPUT_PORT_RESET_HIGH)) {
            ctx.requestReset('the guest reset the machine (i8042 output port)');
          }
        }
      },
    };
  },
};
