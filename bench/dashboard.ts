// `npm run bench -- dashboard`: the dashboard's page in headless Chromium (Debian's
// package, driven by playwright-core), side by side with the floor a browser sets on
// this machine: a one-line static page served by node:http. For each, five fresh
// browser contexts (nothing cached): first contentful paint; for Kiln also the time
// until the VM list holds its rows (the first live sample over the WebSocket) and the
// bytes transferred.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser } from 'playwright-core';
import { median, type BenchContext } from './util.js';

const CLI = fileURLToPath(new URL('../src/cli.cjs', import.meta.url));
const ROUNDS = 5;

interface Load {
  fcpMs: number;
  listMs: number;
  bytes: number;
}

async function load(browser: Browser, url: string, rowsExpected: number): Promise<Load> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  await page.goto(url);
  let listMs = -1;
  if (rowsExpected > 0) {
    await page.waitForFunction((n) => document.querySelectorAll('table.vms tbody tr').length >= n, rowsExpected);
    listMs = await page.evaluate(() => performance.now());
  } else await page.waitForLoadState('load');
  await page.waitForFunction(() => performance.getEntriesByName('first-contentful-paint').length > 0);
  const r = await page.evaluate(() => ({
    fcpMs: performance.getEntriesByName('first-contentful-paint')[0]!.startTime,
    bytes: performance
      .getEntriesByType('resource')
      .concat(performance.getEntriesByType('navigation'))
      .reduce((n, e) => n + (e as PerformanceResourceTiming).transferSize, 0),
  }));
  await context.close();
  return { ...r, listMs };
}

export async function benchDashboard(ctx: BenchContext): Promise<void> {
  const state = join(ctx.dir, 'state');
  mkdirSync(state);
  const env = { ...process.env, KILN_STATE_DIR: state };
  const kiln = (...args: string[]) => {
    const r = spawnSync(process.execPath, [CLI, ...args], { env, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`kiln ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };
  for (const name of ['web', 'db', 'cache']) kiln('create', name, '--memory', '64M');
  const reference = createServer((_req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html' });
    res.end('<!doctype html><html lang="en"><title>ref</title><h1>Machines</h1></html>');
  });
  await new Promise<void>((resolve) => reference.listen(0, '127.0.0.1', resolve));
  const refPort = (reference.address() as { port: number }).port;
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
  });
  const kilnLoads: Load[] = [];
  const refLoads: Load[] = [];
  try {
    for (let i = 0; i < ROUNDS; i++) {
      const url = (JSON.parse(kiln('dashboard', '--listen', '127.0.0.1:0', '--json')) as { url: string }).url;
      const k = await load(browser, url, 3);
      const r = await load(browser, `http://127.0.0.1:${refPort}/`, 0);
      kilnLoads.push(k);
      refLoads.push(r);
      ctx.log(
        `  round ${i + 1}: kiln first paint ${k.fcpMs.toFixed(0)} ms, list ${k.listMs.toFixed(0)} ms, ${(k.bytes / 1024).toFixed(0)} KiB; reference first paint ${r.fcpMs.toFixed(0)} ms`,
      );
    }
  } finally {
    await browser.close();
    reference.close();
    for (const line of spawnSync('pgrep', ['-f', `${CLI} daemon`], { encoding: 'utf8' }).stdout.split('\n')) {
      const pid = Number(line);
      if (pid > 0 && readFileSync(`/proc/${pid}/environ`, 'utf8').includes(`KILN_STATE_DIR=${state}`))
        process.kill(pid, 'SIGTERM');
    }
  }
  const js = readFileSync(fileURLToPath(new URL('../dashboard/app.js', import.meta.url)));
  const { gzipSync } = await import('node:zlib');
  const fcp = median(kilnLoads.map((l) => l.fcpMs));
  const list = median(kilnLoads.map((l) => l.listMs));
  const ref = median(refLoads.map((l) => l.fcpMs));
  const kib = median(kilnLoads.map((l) => l.bytes)) / 1024;
  ctx.log(
    `dashboard page (headless Chromium, loopback, no cache, median of ${ROUNDS}): first paint ${fcp.toFixed(0)} ms (a one-line page: ${ref.toFixed(0)} ms), list with its rows ${list.toFixed(0)} ms, ${kib.toFixed(0)} KiB transferred; app.js ${(js.length / 1024).toFixed(0)} KiB, ${(gzipSync(js).length / 1024).toFixed(0)} KiB gzipped`,
  );
  ctx.result(
    `dashboard kiln_fcp_ms=${fcp.toFixed(0)} ref_fcp_ms=${ref.toFixed(0)} kiln_list_ms=${list.toFixed(0)} transfer_kib=${kib.toFixed(0)} js_kib=${(js.length / 1024).toFixed(0)}`,
  );
}
