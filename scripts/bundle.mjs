// Bundles kiln-vmm, its worker threads, kiln-jailer's two stages and the `kiln` CLI
// (esbuild): each of dist/src/vmm-cli.js, dist/src/vcpu/worker.js,
// dist/src/virtio/io-worker.js, dist/src/jail/jailer-cli.js, dist/src/jail/enter.js and
// dist/src/cli.js gets one file beside it,
// `<name>.bundle.js`, holding everything it imports but koffi (a native addon) and Node's
// own modules, and is itself replaced by a two-line stub that runs the bundle through
// src/bundle-loader.ts with V8's code cache made here (`<name>.bundle.js.cache`). A VMM
// process, and each of its threads, then neither resolves ~150 modules nor compiles its
// code at start-up (docs/ARCHITECTURE.md, "Start-up"). Each entry also gets a CommonJS
// stub, `<name>.cjs`, through `bundle-loader.cjs`: what the bins, the manager, the pool,
// the jailer and the warm workers run, since an ES module entry first sets up Node's ES
// module loader (~10 ms of a process's start, 15-20 ms of a worker's, here). The `.js`
// stubs stay for whoever runs those paths.
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { builtinModules, createRequire } from 'node:module';
import { basename, dirname, relative, resolve, sep } from 'node:path';
import { Script } from 'node:vm';
import { BUILD_LINE, wrapBundle } from '../dist/src/bundle-loader.js';

const STUB_MARK = '// kiln: a stub that runs';
// Node's own modules and koffi are required at run time (the loader hands the bundle its
// `require`), so the bundle holds no import statement and can be compiled as a function.
// Each importing file gets a small ES module exporting just the names it imports, read
// from its import statement: esbuild's generic CommonJS interop would instead copy every
// export of every built-in into a new object per importing file (~16 ms of kiln-vmm's
// start, measured). A namespace import (`import * as tls`) keeps the generic interop.
const builtins = new Set(builtinModules.flatMap((m) => [m, `node:${m}`]));
const escape = (text) => text.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
const sources = new Map();
function importedNames(importer, spec) {
  if (!sources.has(importer)) sources.set(importer, readFileSync(importer, 'utf8'));
  const source = sources.get(importer);
  const statement = new RegExp(
    `import\\s+(?:([\\w$]+)\\s*,?\\s*)?(?:\\{([^}]*)\\})?\\s*from\\s*['"]${escape(spec)}['"]`,
    'g',
  );
  const names = new Set();
  let found = false;
  for (const m of source.matchAll(statement)) {
    found = true;
    if (m[1]) names.add('default');
    for (const part of (m[2] ?? '').split(',')) {
      const name = part
        .trim()
        .replace(/^type\s+/, '')
        .split(/\s+as\s+/)[0];
      if (name) names.add(name);
    }
  }
  const namespace = new RegExp(`import\\s*\\*\\s*as\\s+[\\w$]+\\s*from\\s*['"]${escape(spec)}['"]`).test(source);
  return found && !namespace ? [...names] : null;
}
// Built-ins that only some paths use (snapshots, migration, the guest kit, the daemon's
// helpers and its TLS peer channel) and that cost a start several milliseconds to load
// (~7 ms for tls, zlib and child_process in kiln-vmm's main thread, ~5 ms for crypto in
// each worker thread, here): an importing file that takes only plain functions from one
// gets functions that load it on their first call. A class (capitalised) or anything not
// a function keeps the module loaded at start.
const lazyBuiltins = new Set(['crypto', 'tls', 'zlib', 'child_process', 'https']);
const isPlainFunction = (spec) => (name) => {
  const value = createRequire(import.meta.url)(spec)[name];
  return typeof value === 'function' && /^[a-z]/.test(name);
};
const requireAtRunTime = {
  name: 'require-at-run-time',
  setup(b) {
    b.onResolve({ filter: /.*/ }, (a) => {
      if (!builtins.has(a.path) && a.path !== 'koffi') return undefined;
      if (a.namespace === 'run-time') return { path: a.path, external: true };
      if (a.kind === 'require-call') {
        // A dependency's `require` of one of these (commander's of child_process, for the
        // executable sub-commands Kiln has none of) gets the module on first use too.
        const lazy = lazyBuiltins.has(a.path.replace(/^node:/, '')) && /[\\/]node_modules[\\/]/.test(a.importer);
        return lazy ? { path: `${a.path}|proxy`, namespace: 'run-time' } : { path: a.path, external: true };
      }
      const names = a.kind === 'import-statement' ? importedNames(a.importer, a.path) : null;
      return { path: `${a.path}|${names ? names.join(',') : '*'}`, namespace: 'run-time' };
    });
    b.onLoad({ filter: /.*/, namespace: 'run-time' }, (a) => {
      const [spec, list] = a.path.split('|');
      const req = `require(${JSON.stringify(spec)})`;
      if (list === '*') return { contents: `module.exports = ${req};`, loader: 'js' };
      // The module, loaded at the first call of `get`.
      const lazy = `let m;\nconst get = () => (m ??= ${req});\n`;
      if (list === 'proxy')
        return {
          contents:
            lazy +
            'module.exports = new Proxy({}, { get: (_, k) => get()[k], has: (_, k) => k in get() });\n',
          loader: 'js',
        };
      const names = list ? list.split(',') : [];
      const named = names.filter((n) => n !== 'default');
      if (lazyBuiltins.has(spec.replace(/^node:/, '')) && named.length === names.length && named.every(isPlainFunction(spec)))
        return {
          contents:
            lazy +
            named.map((n) => `export function ${n}(...args) {\n  return get().${n}(...args);\n}\n`).join(''),
          loader: 'js',
        };
      return {
        contents:
          `const m = ${req};\n` +
          (names.includes('default') ? 'export default m;\n' : '') +
          (named.length ? `export const { ${named.join(', ')} } = m;\n` : ''),
        loader: 'js',
      };
    });
  },
};

// `import.meta.url` in a bundled module names that module, not the bundle: each becomes the
// module's own URL, from the bundle's (`__kilnUrl`), so a path relative to it (version.ts's
// package.json, the jailer's second stage) is the same in every bundle, at any depth.
const ownUrl = (bundleDir) => ({
  name: 'own-import-meta-url',
  setup(b) {
    b.onLoad({ filter: /\.js$/, namespace: 'file' }, (a) => {
      const contents = readFileSync(a.path, 'utf8');
      if (!contents.includes('import.meta.url')) return undefined;
      const rel = relative(bundleDir, a.path).split(sep).join('/');
      const url = `(new URL(${JSON.stringify(rel.startsWith('.') ? rel : `./${rel}`)}, __kilnUrl).href)`;
      return { contents: contents.replaceAll('import.meta.url', url), loader: 'js' };
    });
  },
});

// The default seccomp policy, compiled here once instead of at every start (src/seccomp/policy.ts).
const { compilePolicy, DEFAULT_POLICY } = await import('../dist/src/seccomp/policy.js');
const programs = compilePolicy(DEFAULT_POLICY);
const defaultSeccomp = JSON.stringify(
  Object.fromEntries(Object.entries(programs).map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
);

// The loader for the CommonJS stubs: src/bundle-loader.ts as one CommonJS file.
await build({
  entryPoints: ['dist/src/bundle-loader.js'],
  outfile: 'dist/src/bundle-loader.cjs',
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  logLevel: 'warning',
});

// Each entry, and the run its code cache is trained on (scripts/train-code-cache.mjs): the
// jailer's two stages are bundled too, since every jailed start runs both before kiln-vmm
// (two more Node processes; their ES modules unbundled were ~60 ms of it here). The
// jailer's second stage trains on an argument it refuses before it touches anything.
const training = {
  'vmm-cli': ['main'],
  'vcpu/worker': ['worker'],
  'virtio/io-worker': ['worker'],
  'jail/jailer-cli': ['main', '--version'],
  'jail/enter': ['main', 'not-a-plan'],
  // The manager's CLI (and its daemon, `kiln daemon`): every `kiln` verb is a Node start.
  // Trained on a daemon start it refuses after loading the manager's modules (a --tls-cert
  // without its key), so their code is in the cache too.
  cli: ['main', 'daemon', '--tls-cert', 'refused-without-a-key'],
};
const entries = Object.keys(training);
const results = await Promise.all(
  entries.map((entry) => {
    const from = `dist/src/${entry}.js`;
    if (readFileSync(from, 'utf8').includes(STUB_MARK))
      throw new Error(`${from} is already a stub: run tsc before bundling (npm run build does)`);
    return build({
      entryPoints: [from],
      outfile: `dist/src/${entry}.bundle.js`,
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      plugins: [requireAtRunTime, ownUrl(resolve(dirname(from)))],
      define: { 'import.meta.url': '__kilnUrl', __KILN_DEFAULT_SECCOMP__: defaultSeccomp },
      // Less to parse at each start; identifiers are kept so errors still name functions.
      minifyWhitespace: true,
      minifySyntax: true,
      logLevel: 'warning',
      metafile: true,
    });
  }),
);
for (const [i, r] of results.entries()) {
  const entry = entries[i];
  const bundle = `dist/src/${entry}.bundle.js`;
  // Its last line names its build, which its code cache must name too (src/bundle-loader.ts).
  const built = readFileSync(bundle, 'utf8');
  const code = `${built}${BUILD_LINE}${createHash('sha256').update(built).digest('hex')}\n`;
  writeFileSync(bundle, code);
  // A bundle left with an import statement or import.meta is a syntax error here, at build time.
  new Script(wrapBundle(code), { filename: bundle });
  // Its code cache, from a run of it (scripts/train-code-cache.mjs).
  const [kind, ...args] = training[entry];
  try {
    execFileSync(process.execPath, ['scripts/train-code-cache.mjs', kind, bundle, ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
  } catch (err) {
    throw new Error(`training ${bundle}'s code cache failed: ${err.stderr ?? err.message}`);
  }
  const cacheBytes = statSync(`${bundle}.cache`).size;
  const depth = entry.split('/').length - 1;
  const loader = depth === 0 ? './bundle-loader' : `${'../'.repeat(depth)}bundle-loader`;
  const head = `#!/usr/bin/env node\n${STUB_MARK} ${basename(bundle)} (scripts/bundle.mjs)\n`;
  writeFileSync(
    `dist/src/${entry}.js`,
    `${head}import { runBundle } from '${loader}.js';\nawait runBundle(new URL('./${basename(bundle)}', import.meta.url)).done;\n`,
  );
  // A rejection of `done` is unhandled, so Node reports it and exits 1, as for the ES module stub.
  writeFileSync(
    `dist/src/${entry}.cjs`,
    `${head}'use strict';\nrequire('${loader}.cjs').runBundle(require('node:url').pathToFileURL(\`\${__dirname}/${basename(bundle)}\`)).done;\n`,
  );
  process.stdout.write(
    `bundled ${bundle} (${(Buffer.byteLength(code) / 1024).toFixed(0)} KiB, code cache ${(cacheBytes / 1024).toFixed(0)} KiB)\n`,
  );
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
