// `npm run fuzz [-- --runs N] [-- --seed S] [-- --only NAME]`: every fuzz target, a
// million inputs in all by default, shared by weight; prints one line per target and ends
// with one `fuzz key=value ...` line. Record results in docs/FUZZING.md.
import { parseArgs } from 'node:util';
import { allTargets, fuzzTarget } from './targets.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '1000000' },
    seed: { type: 'string', default: String(Date.now() % 2 ** 31) },
    only: { type: 'string' },
  },
});
const total = Number(values.runs);
const seed = Number(values.seed);
const targets = allTargets().filter((t) => !values.only || t.name === values.only);
const weights = targets.reduce((s, t) => s + t.weight, 0);
let inputs = 0;
let findings = 0;
const started = performance.now();
for (const target of targets) {
  const runs = Math.max(1, Math.round((total * target.weight) / weights));
  const r = await fuzzTarget(target, { runs, seed, timeBoundMs: 2_000, memoryBoundMiB: 64 });
  inputs += r.runs;
  if (r.finding) findings++;
  process.stdout.write(
    `${r.name.padEnd(26)} ${String(r.runs).padStart(8)} inputs  ${r.seconds.toFixed(1).padStart(7)} s  slowest ${r.slowestMs.toFixed(1)} ms  heap ${r.heapGrowthMiB >= 0 ? '+' : ''}${r.heapGrowthMiB.toFixed(1)} MiB  rss ${r.rssGrowthMiB >= 0 ? '+' : ''}${r.rssGrowthMiB.toFixed(1)} MiB  ${r.finding ? `FINDING:\n${r.finding}` : 'ok'}\n`,
  );
}
process.stdout.write(
  `fuzz targets=${targets.length} inputs=${inputs} seconds=${((performance.now() - started) / 1000).toFixed(1)} seed=${seed} findings=${findings}\n`,
);
process.exitCode = findings > 0 ? 1 : 0;
