// Facts about the host that need no FFI (so the manager can ask them without koffi).
import { readFileSync } from 'node:fs';

/** RAM plus swap, in bytes (Infinity when /proc/meminfo cannot be read). */
export function hostMemoryBytes(): number {
  try {
    const info = readFileSync('/proc/meminfo', 'utf8');
    const kib = (key: string) => Number(new RegExp(`^${key}:\\s*(\\d+) kB`, 'm').exec(info)?.[1] ?? 0);
    return (kib('MemTotal') + kib('SwapTotal')) * 1024 || Infinity;
  } catch (err) {
    process.emitWarning(
      `cannot read /proc/meminfo (${(err as Error).message}); not checking guest size against host memory`,
    );
    return Infinity;
  }
}
