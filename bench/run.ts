// `npm run bench -- [name...]`: runs the named benchmarks (all when none is named).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { benchBoot } from './boot.js';
import { benchBlk } from './blk.js';
import { benchBlkdev } from './blkdev.js';
import { benchDashboard } from './dashboard.js';
import { benchExits } from './exits.js';
import { benchLaunch } from './launch.js';
import { benchMigrate } from './migrate.js';
import { benchNet } from './net.js';
import { benchNetdev } from './netdev.js';
import { benchRatelimit } from './ratelimit.js';
import { benchSnapshot } from './snapshot.js';
import { benchStartup } from './startup.js';
import type { BenchContext } from './util.js';

const benchmarks: Record<string, (ctx: BenchContext) => Promise<void>> = {
  exits: benchExits,
  boot: benchBoot,
  blk: benchBlk,
  blkdev: benchBlkdev,
  net: benchNet,
  netdev: benchNetdev,
  snapshot: benchSnapshot,
  migrate: benchMigrate,
  launch: benchLaunch,
  startup: benchStartup,
  ratelimit: benchRatelimit,
  dashboard: benchDashboard,
};

const names = process.argv.slice(2);
for (const name of names) {
  if (!benchmarks[name]) {
    process.stderr.write(`unknown benchmark '${name}'; known: ${Object.keys(benchmarks).join(', ')}\n`);
    process.exit(2);
  }
}
const results: string[] = [];
for (const name of names.length ? names : Object.keys(benchmarks)) {
  const dir = mkdtempSync(join(tmpdir(), `kiln-bench-${name}-`));
  try {
    process.stdout.write(`== ${name}\n`);
    await benchmarks[name]!({
      dir,
      log: (line) => process.stdout.write(`${line}\n`),
      result: (line) => results.push(line),
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
for (const line of results) process.stdout.write(`${line}\n`);
