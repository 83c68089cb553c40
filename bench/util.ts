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
