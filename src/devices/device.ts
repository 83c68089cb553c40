// How devices are described and instantiated on every thread. A DeviceSpec is plain,
// cloneable data: its register state lives in `state`, a SharedArrayBuffer whose first
// Int32 is the device's lock. Each vCPU thread builds its own BusDevice objects from the
// same specs (catalogue.ts), so a vCPU exit is handled on the vCPU's own thread with no
// hand-off, and all threads see one device state.
import type { BusDevice } from '../bus/bus.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { SharedLock } from '../bus/shared-lock.js';

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
  /** A line for the VMM's log (the one sink, log.ts), from this device; never stderr directly. */
  log(line: string): void;
  /** Guest RAM, as this thread sees it. */
  readonly memory: GuestMemory;
  /** The VM fd (for ioeventfd registration by PCI functions). */
  readonly vmFd: number;
  /** This thread's PCI functions by slot (filled before the PCI root is created). */
  readonly pciFunctions: ReadonlyMap<number, PciFunctionHandle>;
}

/**
 * A device kind's model. Its options `O` are plain data (they are structured-cloned to
 * every thread); its state is the shared memory after the lock word, and that is all
 * of its state: `init` fills it in once, on the main thread, before any vCPU runs (the
 * only place shared state is initialised); `create` builds this thread's view of it;
 * save and restore copy it (devices/catalogue.ts).
 */
export interface DeviceModel<O> {
  /** Bytes of shared state after the lock word. */
  stateBytes(options: O): number;
  init?(state: SharedArrayBuffer, options: O): void;
  create(state: SharedArrayBuffer, options: O, ctx: DeviceContext): BusDevice;
}

/** A PCI function's model: like a DeviceModel, but reached through the PCI root. */
export interface PciFunctionModel<O> {
  stateBytes(options: O): number;
  init?(state: SharedArrayBuffer, options: O): void;
  create(state: SharedArrayBuffer, options: O, ctx: DeviceContext): Omit<PciFunctionHandle, 'lock'>;
}

/** The options of a device kind that has none. */
export type NoOptions = Readonly<Record<string, never>>;

/** Device state starts after the 8-byte lock header (8 keeps 64-bit fields aligned). */
export const STATE_HEADER_BYTES = 8;
export const LOCK_INDEX = 0;

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
