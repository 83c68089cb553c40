// The guest kit: ready-to-boot guests made from Debian packages and cached.
//   minimal-kernel  Debian's linux-source-6.1, tinyconfig + guests/linux/minimal.config
//                   (the kernel tests and CI boot; ~5 minutes on 2 cores)
//   cloud-kernel    linux-image-cloud-amd64 with its virtio modules (hardware KVM hosts)
//   initramfs       busybox-static and guests/initramfs/init, uncompressed newc cpio
//   rootfs          the same userland as an ext4 image (mke2fs -d, no mount needed)
// Each artifact lives under <cache>/<kind>/<hash of its inputs>/, so a changed config
// fragment or init script builds anew and an unchanged one is reused.
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KilnError } from '../errors.js';
import { buildCpio, type CpioEntry } from './cpio.js';

/** Bump when the way an artifact is built changes, so caches rebuild. */
const RECIPE_VERSION = 1;
const LINUX_SOURCE_PACKAGE = 'linux-source-6.1';
const LINUX_SOURCE_TARBALL = `/usr/src/${LINUX_SOURCE_PACKAGE}.tar.xz`;
const KERNEL_BUILD_PACKAGES = ['bc', 'bison', 'flex', 'libelf-dev', 'libssl-dev', 'make', 'gcc', 'xz-utils'];
const BUSYBOX = '/bin/busybox';

const repoFile = (...parts: string[]) => fileURLToPath(new URL(`../../../${parts.join('/')}`, import.meta.url));

export function cacheDir(): string {
  if (process.env.KILN_CACHE_DIR) return process.env.KILN_CACHE_DIR;
  return join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'kiln');
}

export interface Progress {
  (line: string): void;
}

const hash = (...parts: Array<string | Uint8Array>) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex').slice(0, 16);
};

function commandExists(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function packageInstalled(pkg: string): boolean {
  try {
    return execFileSync('dpkg-query', ['-W', '-f=${Status}', pkg], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    }).includes('install ok installed');
  } catch {
    return false;
  }
}

/** Installs missing Debian packages, or says exactly what to install. */
export function ensurePackages(packages: readonly string[], why: string, progress: Progress): void {
  const missing = packages.filter((p) => !packageInstalled(p));
  if (missing.length === 0) return;
  if (!commandExists('apt-get'))
    throw new KilnError(
      `${why} needs the Debian packages ${missing.join(', ')}, and apt-get is not available to install them`,
    );
  if (process.getuid?.() !== 0)
    throw new KilnError(
      `${why} needs the Debian packages ${missing.join(', ')}: install them with: sudo apt-get install ${missing.join(' ')}`,
    );
  progress(`installing ${missing.join(', ')} with apt-get`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  try {
    execFileSync('apt-get', ['update', '-qq'], { stdio: ['ignore', 'ignore', 'pipe'], env });
    execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env,
    });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim().split('\n').slice(-3).join(' / ');
    throw new KilnError(`apt-get could not install ${missing.join(', ')}: ${stderr || (err as Error).message}`);
  }
}

/** Runs a long command, reporting progress from its output; rejects with its last lines. */
function runLogged(
  cmd: string,
  args: string[],
  cwd: string,
  progress: Progress,
  label: string,
  count: RegExp,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const tail: string[] = [];
    let steps = 0;
    let lastReport = Date.now();
    const started = Date.now();
    const onLine = (line: string) => {
      tail.push(line);
      if (tail.length > 20) tail.shift();
      if (count.test(line)) steps++;
      if (Date.now() - lastReport > 15_000) {
        lastReport = Date.now();
        progress(`${label}: ${steps} steps, ${Math.round((Date.now() - started) / 1000)} s`);
      }
    };
    let pending = '';
    const feed = (chunk: Buffer) => {
      pending += chunk.toString();
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      lines.forEach(onLine);
    };
    child.stdout.on('data', feed);
    child.stderr.on('data', feed);
    child.on('error', (err) => reject(new KilnError(`${label}: cannot run ${cmd}: ${err.message}`)));
    child.on('close', (code) => {
      if (code === 0) resolve();
      else reject(new KilnError(`${label} failed (exit ${code}); last output:\n${tail.join('\n')}`));
    });
  });
}

export interface KernelArtifact {
  readonly vmlinux: string;
  readonly bzImage: string;
  readonly built: boolean;
}

/** Builds (or finds in the cache) the minimal kernel tests and CI boot. */
export async function buildMinimalKernel(progress: Progress): Promise<KernelArtifact> {
  const fragment = readFileSync(repoFile('guests', 'linux', 'minimal.config'));
  ensurePackages([LINUX_SOURCE_PACKAGE, ...KERNEL_BUILD_PACKAGES], 'building the minimal kernel', progress);
  const sourceVersion = execFileSync('dpkg-query', ['-W', '-f=${Version}', LINUX_SOURCE_PACKAGE], { encoding: 'utf8' });
  const dir = join(cacheDir(), 'minimal-kernel', hash(fragment, sourceVersion, String(RECIPE_VERSION)));
  const vmlinux = join(dir, 'vmlinux');
  const bzImage = join(dir, 'bzImage');
  if (existsSync(vmlinux) && existsSync(bzImage)) return { vmlinux, bzImage, built: false };

  const work = join(cacheDir(), 'build', `linux-${hash(sourceVersion)}`);
  const tree = join(work, LINUX_SOURCE_PACKAGE);
  if (!existsSync(join(tree, 'Makefile'))) {
    progress(`unpacking ${LINUX_SOURCE_TARBALL}`);
    rmSync(work, { recursive: true, force: true });
    mkdirSync(work, { recursive: true });
    execFileSync('tar', ['-xf', LINUX_SOURCE_TARBALL, '-C', work]);
  }
  const fragmentPath = join(work, 'kiln-minimal.config');
  writeFileSync(fragmentPath, fragment);
  progress('configuring: tinyconfig + guests/linux/minimal.config');
  execFileSync('make', ['tinyconfig'], { cwd: tree, stdio: 'ignore' });
  execFileSync(join(tree, 'scripts/kconfig/merge_config.sh'), ['-m', '.config', fragmentPath], {
    cwd: tree,
    stdio: 'ignore',
  });
  execFileSync('make', ['olddefconfig'], { cwd: tree, stdio: 'ignore' });
  const jobs = String(Math.max(1, (await import('node:os')).availableParallelism()) + 1);
  progress(`compiling the minimal kernel with make -j${jobs} (about 5 minutes on 2 cores)`);
  await runLogged(
    'make',
    [`-j${jobs}`, 'vmlinux', 'bzImage'],
    tree,
    progress,
    'compiling the minimal kernel',
    /^\s+(CC|AS|LD|AR)\s/,
  );
  const staging = `${dir}.tmp`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { recursive: true });
  copyFileSync(join(tree, 'vmlinux'), join(staging, 'vmlinux'));
  copyFileSync(join(tree, 'arch/x86/boot/bzImage'), join(staging, 'bzImage'));
  copyFileSync(join(tree, '.config'), join(staging, 'config'));
  mkdirSync(dirname(dir), { recursive: true });
  rmSync(dir, { recursive: true, force: true });
  renameSync(staging, dir);
  return { vmlinux, bzImage, built: true };
}

/** The userland's inputs, read once: they are both hashed (for the cache) and packed. */
function userlandInputs(): { busybox: Uint8Array; init: Uint8Array } {
  return { busybox: readFileSync(BUSYBOX), init: readFileSync(repoFile('guests', 'initramfs', 'init')) };
}

/** The userland both the initramfs and the root filesystem carry. */
function userland(inputs: { busybox: Uint8Array; init: Uint8Array }): CpioEntry[] {
  return [
    { type: 'dir', path: 'bin' },
    { type: 'dir', path: 'dev' },
    { type: 'dir', path: 'proc' },
    { type: 'dir', path: 'sys' },
    { type: 'dir', path: 'tmp', mode: 0o1777 },
    { type: 'chardev', path: 'dev/console', major: 5, minor: 1 },
    { type: 'file', path: 'bin/busybox', data: inputs.busybox, mode: 0o755 },
    { type: 'file', path: 'init', data: inputs.init, mode: 0o755 },
  ];
}

export async function buildInitramfs(progress: Progress): Promise<{ path: string; built: boolean }> {
  ensurePackages(['busybox-static'], 'building the initramfs', progress);
  const inputs = userlandInputs();
  const dir = join(cacheDir(), 'initramfs', hash(inputs.busybox, inputs.init, String(RECIPE_VERSION)));
  const path = join(dir, 'initramfs.cpio');
  if (existsSync(path)) return { path, built: false };
  progress('writing the initramfs (uncompressed cpio)');
  mkdirSync(dir, { recursive: true });
  writeFileSync(`${path}.tmp`, buildCpio(userland(inputs)));
  renameSync(`${path}.tmp`, path);
  return { path, built: true };
}

export async function buildRootfs(progress: Progress, sizeMiB = 64): Promise<{ path: string; built: boolean }> {
  ensurePackages(['busybox-static', 'e2fsprogs'], 'building the root filesystem', progress);
  const inputs = userlandInputs();
  const dir = join(cacheDir(), 'rootfs', hash(inputs.busybox, inputs.init, String(sizeMiB), String(RECIPE_VERSION)));
  const path = join(dir, 'rootfs.ext4');
  if (existsSync(path)) return { path, built: false };
  progress(`writing a ${sizeMiB} MiB ext4 root filesystem with mke2fs -d`);
  const tree = join(dir, 'tree');
  rmSync(dir, { recursive: true, force: true });
  for (const e of userland(inputs)) {
    const target = join(tree, e.path);
    if (e.type === 'dir') mkdirSync(target, { recursive: true });
    else if (e.type === 'file') {
      mkdirSync(dirname(target), { recursive: true });
      writeFileSync(target, e.data, { mode: e.mode ?? 0o644 });
    }
    // Device nodes come from devtmpfs at boot; mke2fs -d copies only what exists.
  }
  mkdirSync(join(tree, 'sbin'), { recursive: true });
  execFileSync('ln', ['-s', '/init', join(tree, 'sbin', 'init')]);
  execFileSync('mke2fs', ['-q', '-t', 'ext4', '-d', tree, '-L', 'kiln-root', `${path}.tmp`, `${sizeMiB}M`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  renameSync(`${path}.tmp`, path);
  rmSync(tree, { recursive: true, force: true });
  return { path, built: true };
}

/**
 * Debian's stock cloud kernel and the virtio modules it needs (it builds virtio-pci as
 * a module), for hosts with hardware KVM. Downloaded with apt-get, unpacked with dpkg-deb.
 */
export async function buildCloudKernel(
  progress: Progress,
): Promise<{ vmlinuz: string; modules: string; built: boolean }> {
  if (!commandExists('apt-get')) throw new KilnError('the cloud kernel comes from Debian: apt-get is not available');
  const candidate = (pkg: string) =>
    execFileSync('apt-cache', ['depends', pkg], { encoding: 'utf8' }).match(/Depends: (linux-image-[^\s]+)/)?.[1];
  let image = candidate('linux-image-cloud-amd64');
  if (!image) {
    progress('refreshing the package lists with apt-get update');
    execFileSync('apt-get', ['update', '-qq'], { stdio: 'ignore' });
    image = candidate('linux-image-cloud-amd64');
  }
  if (!image)
    throw new KilnError(
      'apt cannot find linux-image-cloud-amd64 (run apt-get update, and check Debian sources are configured)',
    );
  const dir = join(cacheDir(), 'cloud-kernel', image);
  const done = join(dir, 'vmlinuz');
  if (existsSync(done)) return { vmlinuz: done, modules: join(dir, 'modules'), built: false };
  progress(`downloading ${image}`);
  const dl = join(dir, 'download');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dl, { recursive: true });
  execFileSync('apt-get', ['download', image], { cwd: dl, stdio: ['ignore', 'ignore', 'pipe'] });
  const deb = readdirSync(dl).find((f) => f.endsWith('.deb'));
  if (!deb) throw new KilnError(`apt-get download ${image} produced no package`);
  progress('unpacking the kernel and its virtio modules');
  const root = join(dir, 'root');
  execFileSync('dpkg-deb', ['-x', join(dl, deb), root]);
  const vmlinuz = readdirSync(join(root, 'boot')).find((f) => f.startsWith('vmlinuz-'));
  if (!vmlinuz) throw new KilnError(`${image} holds no /boot/vmlinuz-*`);
  copyFileSync(join(root, 'boot', vmlinuz), done);
  const release = vmlinuz.slice('vmlinuz-'.length);
  const modulesSrc = join(root, 'lib', 'modules', release, 'kernel');
  const modules = join(dir, 'modules');
  mkdirSync(modules, { recursive: true });
  const want =
    /^(virtio|virtio_ring|virtio_pci|virtio_pci_modern_dev|virtio_pci_legacy_dev|virtio_blk|virtio_net|net_failover|failover|virtio_console|virtio_rng|virtio_balloon|vmw_vsock_virtio_transport|vmw_vsock_virtio_transport_common|vsock)\.ko/;
  const walk = (d: string): void => {
    for (const entry of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, entry.name);
      if (entry.isDirectory()) walk(p);
      else if (want.test(entry.name)) copyFileSync(p, join(modules, entry.name));
    }
  };
  walk(modulesSrc);
  rmSync(dl, { recursive: true, force: true });
  rmSync(root, { recursive: true, force: true });
  return { vmlinuz: done, modules, built: true };
}
