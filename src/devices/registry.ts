// Device kinds by name, and the per-thread assembly of buses from device specs.
import { Bus } from '../bus/bus.js';
import { SharedLock } from '../bus/shared-lock.js';
import { KilnError } from '../errors.js';
import { acpiPmModel } from './acpi-pm.js';
import { debugExitModel } from './debug-exit.js';
import {
  LOCK_INDEX,
  STATE_HEADER_BYTES,
  type DeviceContext,
  type DeviceModel,
  type DeviceOptions,
  type DeviceSpec,
  type PciFunctionModel,
} from './device.js';
import type { PciFunctionHandle } from '../pci/root.js';
import { virtioPciModel } from '../virtio/pci.js';
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

/** PCI function kinds (specs with bus 'pci'). */
export const pciFunctionModels: Readonly<Record<string, PciFunctionModel>> = {
  'virtio-pci': virtioPciModel,
};

export function modelFor(kind: string): DeviceModel | PciFunctionModel {
  const model = deviceModels[kind] ?? pciFunctionModels[kind];
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

const lockOf = (spec: DeviceSpec) => new SharedLock(new Int32Array(spec.state, 0, 1), LOCK_INDEX);

/**
 * Builds this thread's buses: one BusDevice per spec, each behind its shared lock. PCI
 * functions come first, so the PCI root built after them can route to them.
 */
export function buildBuses(specs: readonly DeviceSpec[], base: Omit<DeviceContext, 'pciFunctions'>): Buses {
  const buses: Buses = { pio: new Bus('port I/O'), mmio: new Bus('MMIO') };
  const pciFunctions = new Map<number, PciFunctionHandle>();
  const ctx: DeviceContext = { ...base, pciFunctions };
  for (const spec of specs) {
    if (spec.bus !== 'pci') continue;
    const model = pciFunctionModels[spec.kind];
    if (!model) throw new KilnError(`'${spec.kind}' is not a PCI function kind`);
    pciFunctions.set(spec.base, { ...model.create(spec.state, spec.options, ctx), lock: lockOf(spec) });
  }
  for (const spec of specs) {
    if (spec.bus === 'pci') continue;
    const model = deviceModels[spec.kind];
    if (!model) throw new KilnError(`unknown device kind '${spec.kind}'`);
    buses[spec.bus].insert(spec.base, spec.size, model.create(spec.state, spec.options, ctx), lockOf(spec));
  }
  return buses;
}
