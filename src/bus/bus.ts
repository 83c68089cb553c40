// An address bus (port I/O or MMIO): non-overlapping ranges, each owned by one device
// with the rust-vmm interface read(offset, data) / write(offset, data). The offset is
// relative to the range's base; `data` is the access (1, 2, 4 or 8 bytes, little-endian).
import { KilnError } from '../errors.js';
import type { SharedLock } from './shared-lock.js';

export interface BusDevice {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

interface Range {
  readonly base: number;
  readonly end: number;
  readonly device: BusDevice;
  readonly lock: SharedLock | null;
  /** Set once the device's handler threw: from then on it reads as all-ones and ignores writes. */
  failed: boolean;
}

export class Bus {
  private ranges: Range[] = [];
  /**
   * Told once per device whose handler throws (a Kiln bug, or a state a guest drove it
   * into): that device alone goes into an error state; the vCPU and the VM go on.
   */
  onFault: (base: number, err: unknown) => void = () => undefined;

  constructor(readonly name: string) {}

  /** Maps [base, base+size) to `device`; overlapping an existing range is an error. */
  insert(base: number, size: number, device: BusDevice, lock: SharedLock | null = null): void {
    if (size <= 0) throw new KilnError(`${this.name} bus: empty range at 0x${base.toString(16)}`);
    const end = base + size;
    for (const r of this.ranges) {
      if (base < r.end && r.base < end) {
        throw new KilnError(
          `${this.name} bus: range 0x${base.toString(16)}-0x${(end - 1).toString(16)} overlaps 0x${r.base.toString(16)}-0x${(r.end - 1).toString(16)}`,
        );
      }
    }
    this.ranges.push({ base, end, device, lock, failed: false });
    this.ranges.sort((a, b) => a.base - b.base);
  }

  private find(addr: number): Range | undefined {
    let lo = 0;
    let hi = this.ranges.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = this.ranges[mid]!;
      if (addr < r.base) hi = mid - 1;
      else if (addr >= r.end) lo = mid + 1;
      else return r;
    }
    return undefined;
  }

  /** Returns false when nothing is mapped at `addr`. */
  read(addr: number, data: Uint8Array): boolean {
    const r = this.find(addr);
    if (r === undefined) return false;
    if (r.failed) {
      data.fill(0xff);
      return true;
    }
    if (r.lock) r.lock.lock();
    try {
      r.device.read(addr - r.base, data);
    } catch (err) {
      data.fill(0xff);
      this.fail(r, err);
    } finally {
      if (r.lock) r.lock.unlock();
    }
    return true;
  }

  private fail(r: Range, err: unknown): void {
    r.failed = true;
    this.onFault(r.base, err);
  }

  /** Returns false when nothing is mapped at `addr`. */
  write(addr: number, data: Uint8Array): boolean {
    const r = this.find(addr);
    if (r === undefined) return false;
    if (r.failed) return true;
    if (r.lock) r.lock.lock();
    try {
      r.device.write(addr - r.base, data);
    } catch (err) {
      this.fail(r, err);
    } finally {
      if (r.lock) r.lock.unlock();
    }
    return true;
  }
}

/** Reads a little-endian access of 1..8 bytes as a number (exact up to 2^53). */
export function accessValue(data: Uint8Array): number {
  let value = 0;
  for (let i = data.length - 1; i >= 0; i--) value = value * 256 + data[i]!;
  return value;
}

/** Stores `value` little-endian into the access bytes. */
export function setAccessValue(data: Uint8Array, value: number): void {
  for (let i = 0; i < data.length; i++) {
    data[i] = value % 256;
    value = Math.floor(value / 256);
  }
}
