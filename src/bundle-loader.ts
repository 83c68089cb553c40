// Runs one of kiln-vmm's bundles (scripts/bundle.mjs) with V8's code cache made for it at
// build time. Node 20 keeps no code cache for ES modules, so each VMM process, and each of
// its worker threads, would parse and compile its bundle at every start. A bundle is
// instead one async function compiled through `vm.Script` with the cached data beside it,
// made by the build from a run of the bundle (scripts/train-code-cache.mjs): V8 then
// deserialises the compiled code of the start's functions instead of compiling them.
//
// V8 checks a cache against its own version and flags and against the source's length,
// not its contents, so each bundle ends with a line naming its build (the SHA-256 of the
// rest of it, written by the build) and its cache starts with the same name, compared here
// without hashing anything at run time: a cache made for another build of the bundle is
// not used, and the bundle is compiled as if there were none. The cache is as trusted as
// the bundle itself: both are written by the build into the package, never at run time.
// `KILN_NO_CODE_CACHE=1` in the environment leaves every cache unused (to compare, or to
// rule the cache out).
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Script } from 'node:vm';
import { fileURLToPath } from 'node:url';

/** What a bundle's source is wrapped in: its `require` and its own URL (its `import.meta.url`) come as arguments. */
const BUNDLE_PREFIX = '(async function (require, __kilnUrl) {';
const BUNDLE_SUFFIX = '\n})';
/** A bundle's last line: this, then its build's name (64 hex digits). */
export const BUILD_LINE = '\n//# kiln-build=';
const ID_BYTES = 64;

/** The wrapped source of a bundle file. */
export function wrapBundle(code: string): string {
  return `${BUNDLE_PREFIX}${code.replace(/^#!.*/, '')}${BUNDLE_SUFFIX}`;
}

/** The build name a bundle ends with, or null. */
export function bundleBuild(code: string): string | null {
  const at = code.lastIndexOf(BUILD_LINE);
  const id = at < 0 ? '' : code.slice(at + BUILD_LINE.length).trim();
  return /^[0-9a-f]{64}$/.test(id) ? id : null;
}

/** A cache file's bytes: the bundle's build name, then V8's data. */
export function cacheFile(build: string, v8Data: Buffer): Buffer {
  return Buffer.concat([Buffer.from(build, 'latin1'), v8Data]);
}

/** What loading a bundle did with its cache: used, none (no file), stale (made from other source), rejected (by V8). */
export type CacheUse = 'used' | 'none' | 'stale' | 'rejected';

function readCache(path: string, build: string | null): { data?: Buffer; use: CacheUse } {
  let bytes: Buffer;
  try {
    bytes = readFileSync(path);
  } catch {
    return { use: 'none' };
  }
  if (build === null || bytes.length <= ID_BYTES || bytes.toString('latin1', 0, ID_BYTES) !== build)
    return { use: 'stale' };
  return { data: bytes.subarray(ID_BYTES), use: 'used' };
}

type BundleMain = (require: NodeJS.Require, url: string) => Promise<void>;

/** Compiles a bundle; nothing but the compiled function outlives this (not the source text, not the cache's bytes). */
function compileBundle(file: string): { main: BundleMain; use: CacheUse } {
  const code = readFileSync(file, 'utf8');
  const cache: { data?: Buffer; use: CacheUse } =
    process.env.KILN_NO_CODE_CACHE === '1' ? { use: 'none' } : readCache(`${file}.cache`, bundleBuild(code));
  const script = new Script(wrapBundle(code), { filename: file, ...(cache.data ? { cachedData: cache.data } : {}) });
  const use: CacheUse = cache.data && script.cachedDataRejected === true ? 'rejected' : cache.use;
  return { main: script.runInThisContext() as BundleMain, use };
}

/** Compiles (from its cache where it has a good one) and runs the bundle at `url`: `use` says what became of the cache, `done` settles when its top level has run. */
export function runBundle(url: URL): { use: CacheUse; done: Promise<void> } {
  const file = fileURLToPath(url);
  const { main, use } = compileBundle(file);
  return { use, done: main(createRequire(file), url.href) };
}
