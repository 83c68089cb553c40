// Device kinds by name, and the per-thread assembly of buses from device specs.
import { Bus } from '../bus/bus.js';
import { SharedLock } from '../bus/shared-lock.js';
import { KilnError } from '../errors.js';
import { acpiPmModel } from './acpi-pm.js';
import { debugExitModel } from './debug-exit.js';
import { LOCK_INDEX, STATE_HEADER_BYTES, type DeviceContext, type DeviceModel, type DeviceOptions, type DeviceSpec } from './device.js';
import { i8042Model } from './i8042.js';
import { pciRootModel } from '../pci/root.js';
import { progressModel } from './progress.js';
import { rtcModel } from './rtc.js';
import { serialModel } from './serial.js';
import { testDeviceModel } from './test-device.js';

export const deviceModels: Readonly<Record<string, DeviceModel>> = {
  serial: serialModel,
  progress: progressModel,
  'debug-exit': debugExitModel,
  'test-device': testDeviceModel,
  'acpi-pm': acpiPmModel,
  i8042: i8042Model,
  rtc: rtcModel,
  'pci-root': pciRootModel,
};

export function modelFor(kind: string): DeviceModel {
  const model = deviceModels[kind];
  if (!model) throw new KilnError(`unknown device kind '${kind}'`);
  return model;
}

/** Allocates the shared state for a new device of `kind`. */
export function allocateDeviceState(kind: string, options: DeviceOptions): SharedArrayBuffer {
  return new SharedArrayBuffer(STATE_HEADER_BYTES + modelFor(kind).stateBytes(options));
}

export interface Buses {
  readonly pio: Bus;
  readonly mmio: Bus;
}

/** Builds this thread's buses: one BusDevice per spec, each behind its shared lock. */
export function buildBuses(specs: readonly DeviceSpec[], ctx: DeviceContext): Buses {
  const buses: Buses = { pio: new Bus('port I/O'), mmio: new Bus('MMIO') };
  for (const spec of specs) {
    const device = modelFor(spec.kind).create(spec.state, spec.options, ctx);
    const lock = new SharedLock(new Int32Array(spec.state, 0, 1), LOCK_INDEX);
    buses[spec.bus].insert(spec.base, spec.size, device, lock);
  }
  return buses;
}
