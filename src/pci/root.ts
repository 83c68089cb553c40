// PCI bus 0: the configuration space of every function (4 KiB each, PCI Express size),
// reached through configuration mechanism #1 (CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at
// 0xcfc-0xcff) and through ECAM (PCIe enhanced configuration, one 4 KiB page per
// function). Both are one device model over one shared state, so every vCPU thread sees
// the same registers. Each byte has a write mask: read-only bytes (IDs, class) ignore
// writes, and a BAR's mask makes the standard sizing probe work (write all-ones, read
// back the size). Functions that do not exist read as all-ones.
import type { BusDevice } from '../bus/bus.js';
import { KilnError } from '../errors.js';
import { STATE_HEADER_BYTES, type DeviceModel } from '../devices/device.js';

export type { PciFunctionHandle } from '../devices/device.js';

export const PCI_SLOTS = 32;
export const CONFIG_SPACE_BYTES = 4096;

// Type 0 header offsets (PCI Local Bus 3.0, 6.1).
export const PCI_VENDOR_ID = 0x00;
export const PCI_DEVICE_ID = 0x02;
export const PCI_COMMAND = 0x04;
export const PCI_STATUS = 0x06;
export const PCI_REVISION_ID = 0x08;
export const PCI_CLASS_PROG = 0x09;
export const PCI_CLASS_DEVICE = 0x0a;
export const PCI_HEADER_TYPE = 0x0e;
export const PCI_BASE_ADDRESS_0 = 0x10;
export const PCI_SUBSYSTEM_VENDOR_ID = 0x2c;
export const PCI_SUBSYSTEM_ID = 0x2e;
export const PCI_INTERRUPT_LINE = 0x3c;
export const PCI_INTERRUPT_PIN = 0x3d;
export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_INTX_DISABLE = 0x400;
export const PCI_BASE_ADDRESS_SPACE_IO = 0x1;
export const PCI_CAPABILITY_LIST = 0x34;
export const PCI_STATUS_CAP_LIST = 0x10;
/** Capabilities start after the type 0 header. */
const FIRST_CAPABILITY = 0x40;
const CONFIG_ADDRESS_ENABLE = 0x8000_0000;

// Shared state: CONFIG_ADDRESS, a present flag per slot, then per slot its config
// space followed by its write masks.
const ADDRESS_AT = STATE_HEADER_BYTES;
const PRESENT_AT = ADDRESS_AT + 4;
const SPACES_AT = PRESENT_AT + PCI_SLOTS;
const SLOT_BYTES = 2 * CONFIG_SPACE_BYTES;
const STATE_BYTES = 4 + PCI_SLOTS + PCI_SLOTS * SLOT_BYTES;

export interface PciBar {
  /** Power of two, at least 16 bytes (memory) or 4 bytes (I/O). */
  readonly size: number;
  readonly kind: 'memory32' | 'io';
  /** The address Kiln places it at (the guest may move it). */
  readonly address: number;
}

export interface PciFunctionConfig {
  readonly vendorId: number;
  readonly deviceId: number;
  /** Base class, subclass and programming interface, e.g. 0x060000 for a host bridge. */
  readonly classCode: number;
  readonly revision?: number;
  readonly subsystemVendorId?: number;
  readonly subsystemId?: number;
  readonly bars?: readonly PciBar[];
  /** INTx pin 1-4 (INTA-INTD), 0 for none. */
  readonly interruptPin?: number;
  /** Capabilities, chained in this order from offset 0x40. */
  readonly capabilities?: readonly PciCapability[];
}

/**
 * One capability: its ID and the bytes after the 2-byte header (ID, next pointer),
 * with a write mask of the same length (which bits the guest may change).
 */
export interface PciCapability {
  readonly id: number;
  readonly body: Uint8Array;
  readonly writeMask: Uint8Array;
}

/** Hands out naturally aligned BAR addresses inside a window, in order. */
export class PciBarAllocator {
  private next: number;

  constructor(
    private readonly start: number,
    private readonly size: number,
  ) {
    this.next = start;
  }

  allocate(bytes: number): number {
    const at = Math.ceil(this.next / bytes) * bytes;
    if (at + bytes > this.start + this.size)
      throw new KilnError(`the PCI memory window has no room for another ${bytes}-byte BAR`);
    this.next = at + bytes;
    return at;
  }
}

/** Kiln's host bridge at 00:00.0: Red Hat's ID for a generic PCIe host bridge, class 0600. */
export const PCI_HOST_BRIDGE: PciFunctionConfig = { vendorId: 0x1b36, deviceId: 0x0008, classCode: 0x060000 };

/** Host-side view of the bus: set functions up before the VM starts, dump them any time. */
export class PciRoot {
  private readonly bytes: Uint8Array;

  constructor(readonly state: SharedArrayBuffer) {
    this.bytes = new Uint8Array(state);
  }

  private space(slot: number): Uint8Array {
    return this.bytes.subarray(SPACES_AT + slot * SLOT_BYTES, SPACES_AT + slot * SLOT_BYTES + CONFIG_SPACE_BYTES);
  }

  /** A function's configuration space (read by the host after a restore). */
  configSpace(slot: number): DataView {
    const b = this.space(slot);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }

  private mask(slot: number): Uint8Array {
    const at = SPACES_AT + slot * SLOT_BYTES + CONFIG_SPACE_BYTES;
    return this.bytes.subarray(at, at + CONFIG_SPACE_BYTES);
  }

  /** Places a single-function device at `slot` (device number) on bus 0. */
  addFunction(slot: number, f: PciFunctionConfig): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= PCI_SLOTS)
      throw new KilnError(`PCI slot ${slot} does not exist (0-${PCI_SLOTS - 1})`);
    if (this.bytes[PRESENT_AT + slot]) throw new KilnError(`PCI slot ${slot} is already taken`);
    const space = new DataView(this.space(slot).buffer, this.space(slot).byteOffset, CONFIG_SPACE_BYTES);
    const mask = new DataView(this.mask(slot).buffer, this.mask(slot).byteOffset, CONFIG_SPACE_BYTES);
    space.setUint16(PCI_VENDOR_ID, f.vendorId, true);
    space.setUint16(PCI_DEVICE_ID, f.deviceId, true);
    space.setUint8(PCI_REVISION_ID, f.revision ?? 0);
    space.setUint8(PCI_CLASS_PROG, f.classCode & 0xff);
    space.setUint16(PCI_CLASS_DEVICE, f.classCode >>> 8, true);
    space.setUint8(PCI_HEADER_TYPE, 0);
    space.setUint16(PCI_SUBSYSTEM_VENDOR_ID, f.subsystemVendorId ?? 0, true);
    space.setUint16(PCI_SUBSYSTEM_ID, f.subsystemId ?? 0, true);
    space.setUint8(PCI_INTERRUPT_PIN, f.interruptPin ?? 0);
    mask.setUint16(
      PCI_COMMAND,
      PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE,
      true,
    );
    mask.setUint8(PCI_INTERRUPT_LINE, 0xff);
    (f.bars ?? []).forEach((bar, i) => {
      if (i >= 6) throw new KilnError('a PCI function has at most 6 BARs');
      const min = bar.kind === 'io' ? 4 : 16;
      if (bar.size < min || (bar.size & (bar.size - 1)) !== 0)
        throw new KilnError(`BAR ${i}: size ${bar.size} is not a power of two of at least ${min}`);
      if (bar.address % bar.size !== 0)
        throw new KilnError(`BAR ${i}: address 0x${bar.address.toString(16)} is not aligned to its size`);
      const flags = bar.kind === 'io' ? PCI_BASE_ADDRESS_SPACE_IO : 0;
      space.setUint32(PCI_BASE_ADDRESS_0 + 4 * i, (bar.address | flags) >>> 0, true);
      // The address bits above the size are writable; the size bits and flags are not.
      mask.setUint32(PCI_BASE_ADDRESS_0 + 4 * i, ~(bar.size - 1) & ((bar.kind === 'io' ? ~0x3 : ~0xf) >>> 0), true);
    });
    let at = FIRST_CAPABILITY;
    let previousNext = PCI_CAPABILITY_LIST;
    for (const cap of f.capabilities ?? []) {
      if (cap.body.length !== cap.writeMask.length)
        throw new KilnError(`capability 0x${cap.id.toString(16)}: body and write mask differ in length`);
      if (at + 2 + cap.body.length > 0x100)
        throw new KilnError('the capabilities do not fit in the first 256 bytes of configuration space');
      space.setUint8(previousNext, at);
      space.setUint8(at, cap.id);
      this.space(slot).set(cap.body, at + 2);
      this.mask(slot).set(cap.writeMask, at + 2);
      previousNext = at + 1;
      at = (at + 2 + cap.body.length + 3) & ~3;
    }
    if (f.capabilities?.length) space.setUint16(PCI_STATUS, PCI_STATUS_CAP_LIST, true);
    this.bytes[PRESENT_AT + slot] = 1;
  }

  /** Where capability `id` sits in a function's configuration space, or -1. */
  findCapability(slot: number, id: number): number {
    const space = this.space(slot);
    for (let at = space[PCI_CAPABILITY_LIST]!, hops = 0; at !== 0 && hops < 48; at = space[at + 1]!, hops++) {
      if (space[at] === id) return at;
    }
    return -1;
  }

  /** Whether a function exists at `slot`. */
  present(slot: number): boolean {
    return slot >= 0 && slot < PCI_SLOTS && this.bytes[PRESENT_AT + slot] === 1;
  }

  /** A live view of a function's configuration space. */
  spaceView(slot: number): DataView {
    const space = this.space(slot);
    return new DataView(space.buffer, space.byteOffset, CONFIG_SPACE_BYTES);
  }

  /** Where memory BAR `bar` of `slot` decodes now, or -1 (memory decoding off, or an I/O BAR). */
  memoryBarBase(slot: number, bar: number): number {
    const space = this.space(slot);
    if (!(space[PCI_COMMAND]! & PCI_COMMAND_MEMORY)) return -1;
    const at = PCI_BASE_ADDRESS_0 + 4 * bar;
    const value = (space[at]! | (space[at + 1]! << 8) | (space[at + 2]! << 16) | (space[at + 3]! << 24)) >>> 0;
    if (value & PCI_BASE_ADDRESS_SPACE_IO) return -1;
    return (value & ~0xf) >>> 0;
  }

  /** A copy of a function's configuration space (`length` bytes from 0). */
  dump(slot: number, length = 256): Uint8Array {
    return Uint8Array.from(this.space(slot).subarray(0, length));
  }

  /** Reads and writes as the guest does (the caller holds the device lock on a live VM). */
  access(slot: number, reg: number, data: Uint8Array, write: boolean, written?: (slot: number) => void): void {
    if (slot < 0 || slot >= PCI_SLOTS || !this.bytes[PRESENT_AT + slot] || reg + data.length > CONFIG_SPACE_BYTES) {
      if (!write) data.fill(0xff);
      return;
    }
    const space = this.space(slot);
    if (!write) {
      data.set(space.subarray(reg, reg + data.length));
      return;
    }
    const mask = this.mask(slot);
    for (let i = 0; i < data.length; i++) {
      const m = mask[reg + i]!;
      space[reg + i] = (space[reg + i]! & ~m) | (data[i]! & m);
    }
    written?.(slot);
  }

  get configAddress(): number {
    return new DataView(this.state, ADDRESS_AT, 4).getUint32(0, true);
  }

  set configAddress(value: number) {
    new DataView(this.state, ADDRESS_AT, 4).setUint32(0, value >>> 0, true);
  }
}

/** The PCI root is reached three ways, one spec each, sharing one state. */
export type PciRootOptions =
  { readonly role: 'cf8' } | { readonly role: 'ecam' } | { readonly role: 'window'; readonly windowStart: number };

export const pciRootModel: DeviceModel<PciRootOptions> = {
  stateBytes: () => STATE_BYTES,
  create(state, options, ctx): BusDevice {
    const root = new PciRoot(state);
    const functions = ctx.pciFunctions;
    const written = (slot: number) => {
      const f = functions.get(slot);
      if (!f) return;
      f.lock.lock();
      try {
        f.configWritten(root.spaceView(slot));
      } finally {
        f.lock.unlock();
      }
    };
    if (options.role === 'window') {
      // The 32-bit memory window: an access goes to the function whose BAR 0 decodes
      // that address now, so a BAR the guest moved is followed at once. The offset is
      // from the window's start.
      const window = options.windowStart;
      const route = (offset: number, data: Uint8Array, write: boolean) => {
        const addr = window + offset;
        for (const [slot, f] of functions) {
          const base = root.memoryBarBase(slot, 0);
          if (base < 0 || addr < base || addr >= base + f.barBytes) continue;
          f.lock.lock();
          try {
            if (write) f.bar.write(addr - base, data);
            else f.bar.read(addr - base, data);
          } finally {
            f.lock.unlock();
          }
          return;
        }
        if (!write) data.fill(0xff);
      };
      return { read: (offset, data) => route(offset, data, false), write: (offset, data) => route(offset, data, true) };
    }
    if (options.role === 'ecam') {
      // ECAM offset = bus << 20 | device << 15 | function << 12 | register; only
      // function 0 of bus 0 exists.
      const slotOf = (offset: number) =>
        offset >>> 20 === 0 && ((offset >>> 12) & 7) === 0 ? (offset >>> 15) & 31 : -1;
      return {
        read: (offset, data) => root.access(slotOf(offset), offset & 0xfff, data, false),
        write: (offset, data) => root.access(slotOf(offset), offset & 0xfff, data, true, written),
      };
    }
    // Configuration mechanism #1: CONFIG_ADDRESS at offset 0, CONFIG_DATA at 4-7.
    const target = (offset: number): { slot: number; reg: number } | null => {
      const address = root.configAddress;
      const bus = (address >>> 16) & 0xff;
      const fn = (address >>> 8) & 7;
      if (!(address & CONFIG_ADDRESS_ENABLE) || bus !== 0 || fn !== 0) return null;
      return { slot: (address >>> 11) & 31, reg: (address & 0xfc) + (offset - 4) };
    };
    return {
      read(offset, data) {
        if (offset < 4) {
          const value = root.configAddress;
          for (let i = 0; i < data.length; i++) data[i] = (value >>> (8 * (offset + i))) & 0xff;
          return;
        }
        const t = target(offset);
        if (t) root.access(t.slot, t.reg, data, false);
        else data.fill(0xff);
      },
      write(offset, data) {
        if (offset === 0 && data.length === 4) {
          root.configAddress = data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24);
          return;
        }
        const t = offset >= 4 ? target(offset) : null;
        if (t) root.access(t.slot, t.reg, data, true, written);
      },
    };
  },
};
