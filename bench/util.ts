import { readFileSync } from 'node:fs';
export interface BenchContext {
  /** A scratch directory for this benchmark run. */
  readonly dir: string;
  log(line: string): void;
  /** The benchmark's summary line (printed last). */
  result(line: string): void;
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Resident MiB of a process, less the resident part of its guest-RAM mapping (`guestMiB` or larger). */
export function overheadMiB(pid: number, guestMiB: number): number | null {
  let smaps: string;
  try {
    smaps = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  } catch {
    return null;
  }
  let total = 0;
  let guest = 0;
  for (const block of smaps.split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)) {
    const [range] = block.split(' ');
    const [lo, hi] = range!.split('-').map((h) => parseInt(h, 16));
    const rss = Number(/^Rss:\s+(\d+) kB/m.exec(block)?.[1] ?? 0);
    total += rss;
    // Guest RAM: the anonymous mapping at least as large as the guest's memory.
    if (hi! - lo! >= guestMiB * 2 ** 20 && !/\s\//.test(block.split('\n')[0]!)) guest = Math.max(guest, rss);
  }
  return (total - guest) / 1024;
}

/** A field of a process's /proc/PID/smaps_rollup in MiB (shared pages divided among their users for Pss), or null once it is gone. */
function rollupMiB(pid: number, field: 'Rss' | 'Pss'): number | null {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
    return Number(m![1]) / 1024;
  } catch {
    return null;
  }
}

/** A process's proportional set size in MiB (shared pages divided among their users), or null once it is gone. */
export const pssMiB = (pid: number): number | null => rollupMiB(pid, 'Pss');

/** A process's resident set size in MiB, or null once it is gone. */
export const rssMiB = (pid: number): number | null => rollupMiB(pid, 'Rss');
