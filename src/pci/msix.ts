// MSI-X (PCI Local Bus 3.0, 6.8.2): the capability in configuration space, and the
// vector table and pending-bit array a device exposes in one of its BARs. A vector that
// fires while masked (per entry, function-wide, or with MSI-X off) sets its pending bit
// and is delivered when unmasked. Delivery is a callback: KVM_SIGNAL_MSI, or an irqfd.
import { KilnError } from '../errors.js';
import type { PciCapability } from './root.js';

export const PCI_CAP_ID_MSIX = 0x11;
export const MSIX_CONTROL_ENABLE = 0x8000;
export const MSIX_CONTROL_FUNCTION_MASK = 0x4000;
export const MSIX_ENTRY_BYTES = 16;
export const MSIX_ENTRY_VECTOR_CONTROL = 12;
export const MSIX_VECTOR_MASKED = 0x1;
export const MSIX_MAX_VECTORS = 2048;

export interface MsixLayout {
  readonly vectors: number;
  readonly tableBar: number;
  readonly tableOffset: number;
  readonly pbaBar: number;
  readonly pbaOffset: number;
}

/** The capability: Message Control (table size - 1; enable and function mask writable), table and PBA locations. */
export function msixCapability(layout: MsixLayout): PciCapability {
  if (layout.vectors < 1 || layout.vectors > MSIX_MAX_VECTORS)
    throw new KilnError(`MSI-X supports 1 to ${MSIX_MAX_VECTORS} vectors (got ${layout.vectors})`);
  if (layout.tableOffset % 8 !== 0 || layout.pbaOffset % 8 !== 0)
    throw new KilnError('MSI-X table and PBA offsets must be 8-byte aligned');
  const body = new Uint8Array(10);
  const dv = new DataView(body.buffer);
  dv.setUint16(0, layout.vectors - 1, true);
  dv.setUint32(2, (layout.tableOffset | layout.tableBar) >>> 0, true);
  dv.setUint32(6, (layout.pbaOffset | layout.pbaBar) >>> 0, true);
  const writeMask = new Uint8Array(10);
  writeMask[1] = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8;
  return { id: PCI_CAP_ID_MSIX, body, writeMask };
}

/** Bytes of shared memory an MsixTable of `vectors` entries needs. */
export function msixStateBytes(vectors: number): number {
  return vectors * MSIX_ENTRY_BYTES + Math.ceil(vectors / 64) * 8;
}

/** The vector table and PBA over shared memory; the caller holds the device's lock. */
export class MsixTable {
  private readonly table: DataView;
  private readonly pba: Uint8Array;

  constructor(
    state: SharedArrayBuffer,
    offset: number,
    readonly vectors: number,
    /** The capability's Message Control word, as the guest last wrote it. */
    private readonly control: () => number,
    private readonly deliver: (addressLo: number, addressHi: number, data: number) => void,
  ) {
    this.table = new DataView(state, offset, vectors * MSIX_ENTRY_BYTES);
    this.pba = new Uint8Array(state, offset + vectors * MSIX_ENTRY_BYTES, Math.ceil(vectors / 64) * 8);
  }

  /**
   * The table's state at power-on: every vector masked (6.8.2.9), nothing pending. Run
   * once, on the main thread, before any vCPU runs (docs/ARCHITECTURE.md, shared
   * memory rules): a constructor runs on every thread, and one running late would
   * re-mask vectors the driver has already unmasked.
   */
  static initialise(state: SharedArrayBuffer, offset: number, vectors: number): void {
    const table = new DataView(state, offset, vectors * MSIX_ENTRY_BYTES);
    for (let v = 0; v < vectors; v++)
      table.setUint32(v * MSIX_ENTRY_BYTES + MSIX_ENTRY_VECTOR_CONTROL, MSIX_VECTOR_MASKED, true);
    new Uint8Array(state, offset + vectors * MSIX_ENTRY_BYTES, Math.ceil(vectors / 64) * 8).fill(0);
  }

  get tableBytes(): number {
    return this.vectors * MSIX_ENTRY_BYTES;
  }

  private masked(vector: number): boolean {
    const c = this.control();
    return (
      !(c & MSIX_CONTROL_ENABLE) ||
      (c & MSIX_CONTROL_FUNCTION_MASK) !== 0 ||
      (this.table.getUint32(vector * MSIX_ENTRY_BYTES + MSIX_ENTRY_VECTOR_CONTROL, true) & MSIX_VECTOR_MASKED) !== 0
    );
  }

  pending(vector: number): boolean {
    return (this.pba[vector >> 3]! & (1 << (vector & 7))) !== 0;
  }

  private send(vector: number): void {
    const at = vector * MSIX_ENTRY_BYTES;
    this.deliver(
      this.table.getUint32(at, true),
      this.table.getUint32(at + 4, true),
      this.table.getUint32(at + 8, true),
    );
  }

  /** The device raises `vector`: delivered now, or left pending while masked. */
  notify(vector: number): void {
    if (vector < 0 || vector >= this.vectors) return;
    if (this.masked(vector)) this.pba[vector >> 3]! |= 1 << (vector & 7);
    else this.send(vector);
  }

  /** Delivers what became unmasked (after a table write or a Message Control change). */
  deliverPending(): void {
    for (let v = 0; v < this.vectors; v++) {
      if (this.pending(v) && !this.masked(v)) {
        this.pba[v >> 3]! &= ~(1 << (v & 7));
        this.send(v);
      }
    }
  }

  /** Guest reads of the table region (offsets from its start); out of range reads as zero. */
  readTable(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) data[i] = offset + i < this.tableBytes ? this.table.getUint8(offset + i) : 0;
  }

  writeTable(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length && offset + i < this.tableBytes; i++) this.table.setUint8(offset + i, data[i]!);
    this.deliverPending();
  }

  /** The PBA is read-only to the guest. */
  readPba(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) data[i] = offset + i < this.pba.length ? this.pba[offset + i]! : 0;
  }
}
