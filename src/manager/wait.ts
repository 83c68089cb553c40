// Waiting for something outside the process (a VMM to come up, a process to end)
// without a fixed sleep: poll with a back-off that starts at 10 ms and doubles up to a
// quarter of a second, so a quick event is seen quickly and a slow one costs little.

/** Polls `probe` until it returns a value other than null, or `timeoutMs` passes (then null). */
export async function waitFor<T>(probe: () => Promise<T | null> | T | null, timeoutMs: number): Promise<T | null> {
  const deadline = Date.now() + timeoutMs;
  let delay = 10;
  for (;;) {
    const value = await probe();
    if (value !== null) return value;
    const left = deadline - Date.now();
    if (left <= 0) return null;
    await new Promise((resolve) => setTimeout(resolve, Math.min(delay, left)));
    delay = Math.min(delay * 2, 250);
  }
}
