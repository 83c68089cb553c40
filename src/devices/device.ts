// How devices are described and instantiated on every thread. A DeviceSpec is plain,
// cloneable data: its register state lives in `state`, a SharedArrayBuffer whose first
// Int32 is the device's lock. Each vCPU thread builds its own BusDevice objects from the
// same specs (registry.ts), so a vCPU exit is handled on the vCPU's own thread with no
// hand-off, and all threads see one device state.
import type { BusDevice } from '../bus/bus.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { SharedLock } from '../bus/shared-lock.js';

export type DeviceOptions = Readonly<Record<string, number | string | boolean>>;

export interface DeviceSpec {
  /** Unique within a VM, e.g. "com1". */
  readonly id: string;
  readonly kind: string;
  /** 'pci': a PCI function at slot `base` on bus 0, reached through the PCI root. */
  readonly bus: 'pio' | 'mmio' | 'pci';
  readonly base: number;
  readonly size: number;
  readonly state: SharedArrayBuffer;
  readonly options: DeviceOptions;
}

/** What a device may ask of the thread it runs on. */
export interface DeviceContext {
  /** Ends the VM with this exit status (the guest asked for it). */
  requestExit(code: number, cause: string): void;
  /** Ends the VM because the guest reset the machine (reboot); the VMM decides what follows. */
  requestReset(cause: string): void;
  /** Drives an interrupt line of the in-kernel PIC/IOAPIC (KVM_IRQ_LINE). */
  setIrq(irq: number, level: 0 | 1): void;
  /** Sends a message-signalled interrupt (KVM_SIGNAL_MSI). */
  signalMsi(addressLo: number, addressHi: number, data: number): void;
  /** Guest RAM, as this thread sees it. */
  readonly memory: GuestMemory;
  /** The VM fd (for ioeventfd registration by PCI functions). */
  readonly vmFd: number;
  /** This thread's PCI functions by slot (filled before the PCI root is created). */
  readonly pciFunctions: ReadonlyMap<number, PciFunctionHandle>;
}

/** A PCI function's model: like a DeviceModel, but reached through the PCI root. */
export interface PciFunctionModel {
  stateBytes(options: DeviceOptions): number;
  create(state: SharedArrayBuffer, options: DeviceOptions, ctx: DeviceContext): Omit<PciFunctionHandle, 'lock'>;
}

export interface DeviceModel {
  /** Bytes of shared state after the lock word. */
  stateBytes(options: DeviceOptions): number;
  create(state: SharedArrayBuffer, options: DeviceOptions, ctx: DeviceContext): BusDevice;
}

/** Device state starts after the 8-byte lock header (8 keeps 64-bit fields aligned). */
export const STATE_HEADER_BYTES = 8;
export const LOCK_INDEX = 0;

export function numberOption(options: DeviceOptions, name: string, fallback: number): number {
  const value = options[name];
  return typeof value === 'number' ? value : fallback;
}

/**
 * A PCI function's behaviour on one thread: its BAR 0 registers, and a hook run after
 * the guest writes its configuration space (to follow a moved BAR or an MSI-X mask).
 */
export interface PciFunctionHandle {
  readonly bar: BusDevice;
  readonly barBytes: number;
  readonly lock: SharedLock;
  configWritten(space: DataView): void;
}
