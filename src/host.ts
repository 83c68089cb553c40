// Facts about the host that need no FFI (so the manager can ask them without koffi).
import { readFileSync } from 'node:fs';
import { totalmem } from 'node:os';

/** RAM plus swap, in bytes (RAM alone from sysinfo(2) where there is no /proc, as in a jailed VMM). */
export function hostMemoryBytes(): number {
  let info: string;
  try {
    info = readFileSync('/proc/meminfo', 'utf8');
  } catch {
    return totalmem() || Infinity;
  }
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s*(\\d+) kB`, 'm').exec(info)?.[1] ?? 0);
  return (kib('MemTotal') + kib('SwapTotal')) * 1024 || Infinity;
}
