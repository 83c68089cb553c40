// Every device kind a VM can have, in one place: the kind's options and its model
// (devices/device.ts). A DeviceSpec is one member of the union below, so the compiler
// checks a device's options against its kind everywhere a spec is made or read. Here
// too: the per-thread assembly of buses from specs, and save/restore of a device's
// whole state (the snapshot work builds on these).
import { Bus } from '../bus/bus.js';
import { SharedLock } from '../bus/shared-lock.js';
import { KilnError } from '../errors.js';
import { pciRootModel, type PciRootOptions } from '../pci/root.js';
import { virtioPciModel, type VirtioPciOptions } from '../virtio/pci.js';
import { acpiPmModel } from './acpi-pm.js';
import { debugExitModel } from './debug-exit.js';
import { bootTimerModel, type BootTimerOptions } from './boot-timer.js';
import {
  LOCK_INDEX,
  STATE_HEADER_BYTES,
  type DeviceContext,
  type DeviceModel,
  type NoOptions,
  type PciFunctionHandle,
  type PciFunctionModel,
} from './device.js';
import { i8042Model } from './i8042.js';
import { progressModel } from './progress.js';
import { rtcModel, type RtcOptions } from './rtc.js';
import { serialModel, type SerialOptions } from './serial.js';
import { testDeviceModel, type TestDeviceOptions } from './test-device.js';

/** Bus devices (port I/O or MMIO) by kind, with their options. */
export interface BusDeviceOptionsByKind {
  serial: SerialOptions;
  progress: NoOptions;
  'debug-exit': NoOptions;
  'boot-timer': BootTimerOptions;
  'test-device': TestDeviceOptions;
  'acpi-pm': NoOptions;
  i8042: NoOptions;
  rtc: RtcOptions;
  'pci-root': PciRootOptions;
}
/** PCI functions (reached through the PCI root) by kind, with their options. */
export interface PciFunctionOptionsByKind {
  'virtio-pci': VirtioPciOptions;
}
export type BusDeviceKind = keyof BusDeviceOptionsByKind;
export type PciFunctionKind = keyof PciFunctionOptionsByKind;
export type DeviceKind = BusDeviceKind | PciFunctionKind;
export type OptionsOf<K extends DeviceKind> = K extends BusDeviceKind
  ? BusDeviceOptionsByKind[K]
  : K extends PciFunctionKind
    ? PciFunctionOptionsByKind[K]
    : never;

export const BUS_DEVICE_MODELS: { readonly [K in BusDeviceKind]: DeviceModel<BusDeviceOptionsByKind[K]> } = {
  serial: serialModel,
  progress: progressModel,
  'debug-exit': debugExitModel,
  'boot-timer': bootTimerModel,
  'test-device': testDeviceModel,
  'acpi-pm': acpiPmModel,
  i8042: i8042Model,
  rtc: rtcModel,
  'pci-root': pciRootModel,
};

export const PCI_FUNCTION_MODELS: { readonly [K in PciFunctionKind]: PciFunctionModel<PciFunctionOptionsByKind[K]> } = {
  'virtio-pci': virtioPciModel,
};

interface SpecOf<K extends DeviceKind> {
  /** Unique within a VM, e.g. "com1". */
  readonly id: string;
  readonly kind: K;
  /** 'pci': a PCI function at slot `base` on bus 0, reached through the PCI root. */
  readonly bus: K extends PciFunctionKind ? 'pci' : 'pio' | 'mmio';
  readonly base: number;
  readonly size: number;
  /** The device's whole state; the first Int32 is its lock. */
  readonly state: SharedArrayBuffer;
  readonly options: OptionsOf<K>;
}

/** One device of a VM: plain, cloneable data (it is structured-cloned to every thread). */
export type DeviceSpec<K extends DeviceKind = DeviceKind> = { [P in K]: SpecOf<P> }[K];
/**
 * What Vm.addDevice takes: a spec without its state (allocated and initialised there);
 * `options` may be left out where the kind needs none.
 */
export type DeviceRequest<K extends DeviceKind = DeviceKind> = {
  [P in K]: Omit<SpecOf<P>, 'state' | 'options'> &
    (Record<string, never> extends OptionsOf<P>
      ? { readonly options?: OptionsOf<P> }
      : { readonly options: OptionsOf<P> });
}[K];

type AnyModel = {
  stateBytes(options: unknown): number;
  init?(state: SharedArrayBuffer, options: unknown): void;
};

function modelOf(kind: DeviceKind): AnyModel {
  const model = Object.hasOwn(BUS_DEVICE_MODELS, kind)
    ? BUS_DEVICE_MODELS[kind as BusDeviceKind]
    : Object.hasOwn(PCI_FUNCTION_MODELS, kind)
      ? PCI_FUNCTION_MODELS[kind as PciFunctionKind]
      : undefined;
  if (!model) throw new KilnError(`unknown device kind '${String(kind)}'`);
  return model as unknown as AnyModel;
}

/**
 * A new device's shared state, initialised: run once, on the main thread, before any
 * vCPU runs. The one place device state is initialised.
 */
export function createDeviceState(kind: DeviceKind, options: unknown): SharedArrayBuffer {
  const model = modelOf(kind);
  const state = new SharedArrayBuffer(STATE_HEADER_BYTES + model.stateBytes(options));
  model.init?.(state, options);
  return state;
}

/** The shared state of a new device of `kind`, initialised (as Vm.addDevice makes it, without a VM). */
export function allocateDeviceState<K extends BusDeviceKind>(
  kind: K,
  options: BusDeviceOptionsByKind[K],
): SharedArrayBuffer;
export function allocateDeviceState<K extends PciFunctionKind>(
  kind: K,
  options: PciFunctionOptionsByKind[K],
): SharedArrayBuffer;
export function allocateDeviceState(kind: DeviceKind, options: unknown): SharedArrayBuffer {
  return createDeviceState(kind, options);
}

export interface Buses {
  readonly pio: Bus;
  readonly mmio: Bus;
}

const lockOf = (spec: DeviceSpec) => new SharedLock(new Int32Array(spec.state, 0, 1), LOCK_INDEX);

function createPciFunction<K extends PciFunctionKind>(
  spec: DeviceSpec<K>,
  ctx: DeviceContext,
): Omit<PciFunctionHandle, 'lock'> {
  const model: PciFunctionModel<PciFunctionOptionsByKind[K]> = PCI_FUNCTION_MODELS[spec.kind];
  return model.create(spec.state, spec.options as PciFunctionOptionsByKind[K], ctx);
}

function createBusDevice<K extends BusDeviceKind>(spec: DeviceSpec<K>, ctx: DeviceContext) {
  const model: DeviceModel<BusDeviceOptionsByKind[K]> = BUS_DEVICE_MODELS[spec.kind];
  return model.create(spec.state, spec.options as BusDeviceOptionsByKind[K], ctx);
}

const isPciFunction = (spec: DeviceSpec): spec is DeviceSpec<PciFunctionKind> =>
  Object.hasOwn(PCI_FUNCTION_MODELS, spec.kind);

/**
 * Builds this thread's buses: one BusDevice per spec, each behind its shared lock. PCI
 * functions come first, so the PCI root built after them can route to them.
 */
export function buildBuses(
  specs: readonly DeviceSpec[],
  base: Omit<DeviceContext, 'pciFunctions' | 'log'>,
  log: (source: string, line: string) => void,
): Buses {
  const buses: Buses = { pio: new Bus('port I/O'), mmio: new Bus('MMIO') };
  const pciFunctions = new Map<number, PciFunctionHandle>();
  const ctxOf = (spec: DeviceSpec): DeviceContext => ({ ...base, pciFunctions, log: (line) => log(spec.id, line) });
  for (const spec of specs) {
    if (isPciFunction(spec))
      pciFunctions.set(spec.base, { ...createPciFunction(spec, ctxOf(spec)), lock: lockOf(spec) });
  }
  for (const spec of specs) {
    if (isPciFunction(spec)) continue;
    const busSpec = spec as DeviceSpec<BusDeviceKind>;
    buses[busSpec.bus].insert(busSpec.base, busSpec.size, createBusDevice(busSpec, ctxOf(spec)), lockOf(spec));
  }
  return buses;
}

/** A device's saved state: everything it is, less its host resources (fds live in its options). */
export interface SavedDevice {
  readonly id: string;
  readonly kind: DeviceKind;
  /** The shared state after the lock word. */
  readonly state: Uint8Array;
}

/** Saves a device's whole state. The caller holds the device still (a paused VM). */
export function saveDevice(spec: DeviceSpec): SavedDevice {
  return { id: spec.id, kind: spec.kind, state: new Uint8Array(spec.state.slice(STATE_HEADER_BYTES)) };
}

/** Restores `saved` into `spec` (a device of the same kind and layout, not yet running); its lock word is left as it is. */
export function restoreDevice(spec: DeviceSpec, saved: SavedDevice): void {
  if (saved.kind !== spec.kind || saved.id !== spec.id)
    throw new KilnError(`saved device ${saved.id} (${saved.kind}) does not match device ${spec.id} (${spec.kind})`);
  if (saved.state.length !== spec.state.byteLength - STATE_HEADER_BYTES)
    throw new KilnError(
      `saved device ${saved.id}: ${saved.state.length} bytes of state, the device has ${spec.state.byteLength - STATE_HEADER_BYTES}`,
    );
  new Uint8Array(spec.state, STATE_HEADER_BYTES).set(saved.state);
}
