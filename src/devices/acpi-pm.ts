// The hardware-reduced ACPI registers the FADT points at: sleep control (a write of
// SLP_TYP=5 with SLP_EN is poweroff), sleep status, and the reset register. Offsets
// are from PORT_ACPI_SLEEP_CONTROL.
import type { BusDevice } from '../bus/bus.js';
import { ACPI_RESET_VALUE, PORT_ACPI_RESET, PORT_ACPI_SLEEP_CONTROL, SLEEP_CONTROL_S5, SLP_EN } from '../layout.js';
import type { DeviceModel, NoOptions } from './device.js';

const SLEEP_CONTROL = 0;
const RESET = PORT_ACPI_RESET - PORT_ACPI_SLEEP_CONTROL;
const SLP_TYP_MASK = 0x7 << 2;

export const acpiPmModel: DeviceModel<NoOptions> = {
  stateBytes: () => 0,
  create(_state, _options, ctx): BusDevice {
    return {
      read(_offset, data) {
        // No wake events and no sleep in progress: status and control read as zero.
        data.fill(0);
      },
      write(offset, data) {
        const value = data[0]!;
        if (
          offset === SLEEP_CONTROL &&
          value & SLP_EN &&
          (value & SLP_TYP_MASK) === (SLEEP_CONTROL_S5 & SLP_TYP_MASK)
        ) {
          ctx.requestExit(0, 'the guest powered off (ACPI S5)');
        } else if (offset === RESET && value === ACPI_RESET_VALUE) {
          ctx.requestReset('the guest reset the machine (ACPI reset register)');
        }
      },
    };
  },
};
