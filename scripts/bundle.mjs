// Bundles kiln-vmm and its worker threads (esbuild): dist/src/vmm-cli.js,
// dist/src/vcpu/worker.js and dist/src/virtio/io-worker.js are replaced by one file each
// holding everything they import but koffi (a native addon, loaded as it is). A VMM
// process, and each of its threads, then reads and compiles one file instead of
// resolving ~150 modules: most of its start-up before this (docs/ARCHITECTURE.md,
// "Start-up"). The paths stay the same, so the manager, the jailer and the tests run
// what a user runs.
import { build } from 'esbuild';

const entries = ['vmm-cli', 'vcpu/worker', 'virtio/io-worker'];
const results = await Promise.all(
  entries.map((entry) =>
    build({
      entryPoints: [`dist/src/${entry}.js`],
      outfile: `dist/src/${entry}.js`,
      allowOverwrite: true,
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      external: ['koffi'],
      // Less to parse at each start; identifiers are kept so errors still name functions.
      minifyWhitespace: true,
      minifySyntax: true,
      // CommonJS dependencies (find-my-way) call require() for Node's own modules.
      banner: {
        js: "import { createRequire as kilnCreateRequire } from 'node:module'; const require = kilnCreateRequire(import.meta.url);",
      },
      logLevel: 'warning',
      metafile: true,
    }),
  ),
);
for (const [i, r] of results.entries()) {
  const bytes = Object.values(r.metafile.outputs).reduce((n, o) => n + o.bytes, 0);
  process.stdout.write(`bundled dist/src/${entries[i]}.js (${(bytes / 1024).toFixed(0)} KiB)\n`);
}

// The dashboard's page (src/dashboard/page): one script and one style sheet (xterm.js's
// and Kiln's), minified, with the HTML and icon beside them in dist/dashboard. Every
// byte the page loads is built here: nothing is fetched from the network when it runs.
import { copyFileSync, mkdirSync } from 'node:fs';
mkdirSync('dist/dashboard', { recursive: true });
const page = await build({
  entryPoints: { app: 'src/dashboard/page/app.ts' },
  outdir: 'dist/dashboard',
  bundle: true,
  platform: 'browser',
  format: 'iife',
  target: ['chrome110', 'firefox115', 'safari16'],
  minify: true,
  legalComments: 'none',
  logLevel: 'warning',
  metafile: true,
});
for (const f of ['index.html', 'favicon.svg']) copyFileSync(`src/dashboard/page/${f}`, `dist/dashboard/${f}`);
for (const [file, o] of Object.entries(page.metafile.outputs))
  process.stdout.write(`bundled ${file} (${(o.bytes / 1024).toFixed(0)} KiB)\n`);
