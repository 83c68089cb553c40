// Makes a bundle's V8 code cache (src/bundle-loader.ts) from a run of it, so the cache
// holds every function that run compiled, not only what V8 compiles eagerly (the bodies
// of the bundle's modules are compiled when they are first evaluated): about 8 ms more off
// kiln-vmm's start than a cache of the eager compile alone (bench/RESULTS.md, startup).
//
//   node scripts/train-code-cache.mjs main BUNDLE [ARG...]   a run with ARGs (default --version):
//                                                            kiln-vmm --version evaluates every module
//   node scripts/train-code-cache.mjs worker BUNDLE          a warm worker, up to where it waits for its VM
//
// Only the build runs this; it writes BUNDLE.cache and nothing else.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Script } from 'node:vm';
import { isMainThread, Worker, workerData } from 'node:worker_threads';
import { bundleBuild, cacheFile, wrapBundle } from '../dist/src/bundle-loader.js';

function compile(bundle) {
  const code = readFileSync(bundle, 'utf8');
  const build = bundleBuild(code);
  if (build === null) throw new Error(`${bundle} does not end with its build's name`);
  const script = new Script(wrapBundle(code), { filename: bundle });
  const run = script.runInThisContext();
  const save = () => writeFileSync(`${bundle}.cache`, cacheFile(build, script.createCachedData()));
  return { run: () => run(createRequire(bundle), pathToFileURL(bundle).href), save };
}

if (isMainThread) {
  const [kind, file, ...args] = process.argv.slice(2);
  if ((kind !== 'main' && kind !== 'worker') || !file)
    throw new Error('usage: train-code-cache.mjs main|worker BUNDLE [ARG...]');
  const bundle = resolve(file);
  if (kind === 'main') {
    const { run, save } = compile(bundle);
    process.argv = [process.argv[0], bundle, ...(args.length > 0 ? args : ['--version'])];
    // Saved as the process exits, however it ends (commander's --version calls
    // process.exit; the CLI's main settles after the bundle's top level has run), so the
    // cache holds everything the run compiled. What the run's own exit status says does not
    // matter here (a refused argument is a fine run to train on); a bundle that throws does.
    let threw = false;
    process.once('exit', () => {
      if (threw) return;
      save();
      process.exitCode = 0;
    });
    await run().catch((err) => {
      threw = true;
      throw err;
    });
  } else {
    const worker = new Worker(new URL(import.meta.url), {
      workerData: { warmLoaded: new SharedArrayBuffer(4), bundle },
    });
    const code = await new Promise((done, fail) => worker.once('exit', done).once('error', fail));
    if (code !== 0) throw new Error(`training ${bundle} ended with ${code}`);
  }
} else {
  // A warm worker's modules load synchronously, up to its first await (workerInit), which
  // marks them loaded: by then everything its start compiles is compiled.
  const { run, save } = compile(workerData.bundle);
  void run();
  if (Atomics.load(new Int32Array(workerData.warmLoaded), 0) !== 1)
    throw new Error(`${workerData.bundle} did not reach its wait for a VM`);
  save();
  process.exit(0);
}
