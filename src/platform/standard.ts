// The legacy devices every Kiln VM has, placed at their ports (src/layout.ts): COM1
// (IRQ 4), the boot-progress port and debug-exit; a Linux VM adds the ACPI power
// management block, the i8042 (its reset line) and the CMOS RTC.
import type { DeviceSpec } from '../devices/catalogue.js';
import { serialOutput } from '../devices/serial.js';
import * as layout from '../layout.js';
import type { Vm } from '../vm.js';

/** COM1, the progress port and debug-exit: what the demo and every test guest use. */
export function addStandardDevices(
  vm: Vm,
  serialOutFd: number,
): { com1: DeviceSpec<'serial'>; progress: DeviceSpec<'progress'> } {
  const com1 = vm.addDevice({
    id: 'com1',
    kind: 'serial',
    bus: 'pio',
    base: layout.PORT_COM1,
    size: layout.PORT_COM_SIZE,
    options: { outFd: serialOutput(serialOutFd), irq: layout.IRQ_COM1 },
  });
  const progress = vm.addDevice({
    id: 'progress',
    kind: 'progress',
    bus: 'pio',
    base: layout.PORT_PROGRESS,
    size: layout.PORT_PROGRESS_SIZE,
    options: {},
  });
  vm.addDevice({
    id: 'debug-exit',
    kind: 'debug-exit',
    bus: 'pio',
    base: layout.PORT_DEBUG_EXIT,
    size: layout.PORT_DEBUG_EXIT_SIZE,
    options: {},
  });
  return { com1, progress };
}

/** The PC devices an operating system expects besides COM1: ACPI PM, i8042, RTC. */
export function addPcDevices(vm: Vm): void {
  vm.addDevice({
    id: 'acpi-pm',
    kind: 'acpi-pm',
    bus: 'pio',
    base: layout.PORT_ACPI_SLEEP_CONTROL,
    size: layout.PORT_ACPI_PM_SIZE,
    options: {},
  });
  vm.addDevice({
    id: 'i8042',
    kind: 'i8042',
    bus: 'pio',
    base: layout.PORT_I8042_DATA,
    size: layout.PORT_I8042_COMMAND - layout.PORT_I8042_DATA + 1,
    options: {},
  });
  vm.addDevice({ id: 'rtc', kind: 'rtc', bus: 'pio', base: layout.PORT_RTC, size: layout.PORT_RTC_SIZE, options: {} });
}
