// The VMM's one log sink: lines from every source, rate-limited per source, with what
// was held back counted, never lost silently.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LOG_BURST, LOG_WINDOW_MS, LogSink } from '../src/log.js';

test('each source may log a burst per window; the rest is counted and reported', () => {
  let now = 0;
  const out: string[] = [];
  const sink = new LogSink(
    (line) => out.push(line),
    () => now,
  );
  for (let i = 0; i < LOG_BURST + 5; i++) sink.emit('disk0', `error ${i}`);
  sink.emit('net0', 'link down');
  assert.equal(out.filter((l) => l.startsWith('disk0: error')).length, LOG_BURST);
  assert.ok(out.includes('net0: link down'), 'another source is not held back by a noisy one');
  now += LOG_WINDOW_MS;
  sink.emit('disk0', 'again');
  assert.deepEqual(out.slice(-2), [
    `disk0: 5 more line(s) suppressed (over ${LOG_BURST} in ${LOG_WINDOW_MS / 1000} s)`,
    'disk0: again',
  ]);
  for (let i = 0; i < LOG_BURST + 2; i++) sink.emit('disk0', 'x');
  sink.flush();
  assert.equal(out.at(-1), `disk0: 3 more line(s) suppressed (over ${LOG_BURST} in ${LOG_WINDOW_MS / 1000} s)`);
});
