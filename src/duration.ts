// How long a VM has been up, as `kiln ls`/`kiln info` and the dashboard write it
// ("2d 3h 4m 5s"). Imports nothing, so the dashboard's page bundles it too.

/** The time since `startedAt` (ISO 8601) at `now`, in days, hours, minutes and seconds; at most `parts` of them. */
export function uptimeText(startedAt: string | null, now = Date.now(), parts = 4): string {
  if (!startedAt) return '-';
  let s = Math.max(0, Math.floor((now - Date.parse(startedAt)) / 1000));
  const out: string[] = [];
  for (const [unit, size] of [
    ['d', 86400],
    ['h', 3600],
    ['m', 60],
  ] as const) {
    if (s >= size) out.push(`${Math.floor(s / size)}${unit}`);
    s %= size;
  }
  out.push(`${s}s`);
  return out.slice(0, parts).join(' ');
}
