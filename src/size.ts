// Memory sizes as users write them: "128" (MiB, as QEMU's -m), "512M", "2G", "65536K", "4096B".
import { KilnError } from './errors.js';

const UNITS: Record<string, number> = { B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

export function parseSize(text: string): number {
  const m = /^\s*(\d+)\s*([BKMGT])?(?:i?B)?\s*$/i.exec(text);
  if (!m) throw new KilnError(`cannot read '${text}' as a memory size (examples: 128, 512M, 2G)`);
  const bytes = Number(m[1]) * UNITS[(m[2] ?? 'M').toUpperCase()]!;
  if (!Number.isSafeInteger(bytes)) throw new KilnError(`memory size '${text}' is too large`);
  return bytes;
}
