// The one log sink of a VMM. Every thread's lines (vCPU threads, the I/O thread, the
// main thread) reach it: worker threads post them as messages, never writing to stderr
// themselves, so a device's line goes wherever the VMM's logger goes (stderr, and
// Firecracker's log_path when set). Lines are rate-limited per source (a device, a
// vCPU): a hostile guest cannot flood the log or the disk under it.

/** A log line's origin and text, as a worker thread posts it. */
export interface LogMessage {
  readonly type: 'log';
  readonly source: string;
  readonly line: string;
}

/** How many lines one source may log per window, and the window. */
export const LOG_BURST = 20;
export const LOG_WINDOW_MS = 10_000;

export class LogSink {
  private readonly windows = new Map<string, { start: number; count: number; suppressed: number }>();

  constructor(
    private readonly write: (line: string) => void,
    private readonly now: () => number = Date.now,
  ) {}

  /** Logs `line` from `source` (shown as "source: line"), unless that source is over its rate. */
  emit(source: string, line: string): void {
    const t = this.now();
    let w = this.windows.get(source);
    if (!w || t - w.start >= LOG_WINDOW_MS) {
      if (w && w.suppressed > 0)
        this.write(
          `${source}: ${w.suppressed} more line(s) suppressed (over ${LOG_BURST} in ${LOG_WINDOW_MS / 1000} s)`,
        );
      w = { start: t, count: 0, suppressed: 0 };
      this.windows.set(source, w);
    }
    if (w.count < LOG_BURST) {
      w.count++;
      this.write(`${source}: ${line}`);
    } else w.suppressed++;
  }

  /** Reports what is still suppressed (at the end of the VM). */
  flush(): void {
    for (const [source, w] of this.windows) {
      if (w.suppressed > 0)
        this.write(
          `${source}: ${w.suppressed} more line(s) suppressed (over ${LOG_BURST} in ${LOG_WINDOW_MS / 1000} s)`,
        );
      w.suppressed = 0;
    }
  }
}

/** Whether a worker's message is a log line. */
export function isLogMessage(message: unknown): message is LogMessage {
  return typeof message === 'object' && message !== null && (message as { type?: unknown }).type === 'log';
}
