// The BIOS-style memory map Linux reads (boot_params.e820_table, or PVH's memmap).
import { ACPI_END, ACPI_START, HIMEM_START, LOW_RAM_END, MMIO_HOLE_END, MMIO_HOLE_START } from '../layout.js';

export const E820_RAM = 1;
export const E820_RESERVED = 2;

export interface E820Entry {
  readonly addr: number;
  readonly size: number;
  readonly type: number;
}

export interface RamRange {
  readonly guestPhysAddr: number;
  readonly size: number;
}

/** Merges adjacent RAM ranges (memory slots split only for the host's sake). */
export function mergeRam(ranges: readonly RamRange[]): RamRange[] {
  const sorted = [...ranges].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
  const out: RamRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && last.guestPhysAddr + last.size === r.guestPhysAddr)
      out[out.length - 1] = { guestPhysAddr: last.guestPhysAddr, size: last.size + r.size };
    else out.push(r);
  }
  return out;
}

/**
 * Conventional memory below 640 KiB, the legacy area (where the ACPI tables live)
 * reserved, RAM from 1 MiB, the 32-bit MMIO hole reserved, and RAM above 4 GiB.
 */
export function buildE820(ram: readonly RamRange[]): E820Entry[] {
  const entries: E820Entry[] = [];
  for (const r of mergeRam(ram)) {
    const end = r.guestPhysAddr + r.size;
    if (r.guestPhysAddr < LOW_RAM_END)
      entries.push({ addr: r.guestPhysAddr, size: Math.min(end, LOW_RAM_END) - r.guestPhysAddr, type: E820_RAM });
    const from = Math.max(r.guestPhysAddr, HIMEM_START);
    if (end > from) entries.push({ addr: from, size: end - from, type: E820_RAM });
  }
  entries.push({ addr: ACPI_START, size: ACPI_END - ACPI_START, type: E820_RESERVED });
  entries.push({ addr: MMIO_HOLE_START, size: MMIO_HOLE_END - MMIO_HOLE_START, type: E820_RESERVED });
  return entries.sort((a, b) => a.addr - b.addr);
}
