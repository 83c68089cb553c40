// Waiting for something outside the process (a VMM to come up, a process to end)
// without a fixed sleep: poll with a back-off that starts at 10 ms and doubles up to a
// quarter of a second, so a quick event is seen quickly and a slow one costs little.

export interface Clock {
  now(): number;
  sleep(ms: number): Promise<void>;
}

const realClock: Clock = { now: Date.now, sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)) };

/**
 * Polls `probe` until it returns a value other than null, or `timeoutMs` passes (then
 * null). `maxDelayMs` caps the back-off: a wait for something that takes a few hundred
 * milliseconds and that a user waits on (the daemon's start) polls more often, since a
 * doubling delay can overshoot it by as much as it has waited.
 */
export async function waitFor<T>(
  probe: () => Promise<T | null> | T | null,
  timeoutMs: number,
  clock: Clock = realClock,
  maxDelayMs = 250,
): Promise<T | null> {
  const deadline = clock.now() + timeoutMs;
  let delay = Math.min(10, maxDelayMs);
  for (;;) {
    const value = await probe();
    if (value !== null) return value;
    const left = deadline - clock.now();
    if (left <= 0) return null;
    await clock.sleep(Math.min(delay, left));
    delay = Math.min(delay * 2, maxDelayMs);
  }
}
