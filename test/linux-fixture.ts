// The test fixture later tests restore instead of booting Linux for 50 s: the kit's
// Linux booted to its shell (1 vCPU, 128 MiB, an entropy device) under kiln-vmm and
// snapshotted. Made once per build of Kiln and guest kit (the cache key hashes Kiln's
// compiled code, the kernel and the initramfs) and kept in the guest kit's cache.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildInitramfs, buildMinimalKernel, cacheDir } from '../src/guestkit/build.js';
import { bootShell, pauseAndSnapshot, startVmm } from './vmm-driver.js';

export interface LinuxFixture {
  readonly state: string;
  readonly memory: string;
  /** Whether this call booted Linux to make it (false: it was cached). */
  readonly made: boolean;
}

const SRC = fileURLToPath(new URL('../src/', import.meta.url));

/** A digest of every compiled file of Kiln (a changed device layout must not meet an old fixture). */
function codeDigest(): string {
  const hash = createHash('sha256');
  const walk = (dir: string) => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) walk(path);
      else if (name.endsWith('.js')) hash.update(name).update(readFileSync(path));
    }
  };
  walk(SRC);
  return hash.digest('hex');
}

export async function linuxSnapshotFixture(log: (line: string) => void): Promise<LinuxFixture> {
  const kernel = await buildMinimalKernel(log);
  const initrd = await buildInitramfs(log);
  const key = createHash('sha256')
    .update(codeDigest())
    .update(readFileSync(kernel.vmlinux))
    .update(readFileSync(initrd.path))
    .digest('hex')
    .slice(0, 16);
  const dir = join(cacheDir(), 'fixtures', `linux-shell-${key}`);
  const state = join(dir, 'state');
  const memory = join(dir, 'memory');
  if (existsSync(state) && existsSync(memory)) return { state, memory, made: false };
  log('making the Linux snapshot fixture (booting the kit Linux once for this build)');
  const work = `${dir}.tmp-${process.pid}`;
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  const vmm = await startVmm(work, 'fixture');
  try {
    await bootShell(vmm, { kernel: kernel.vmlinux, initrd: initrd.path, memoryMiB: 128, entropy: true }, 600);
    await pauseAndSnapshot(vmm, join(work, 'state'), join(work, 'memory'));
  } finally {
    vmm.child.kill('SIGKILL');
    await vmm.exited;
  }
  for (const f of readdirSync(work)) if (f !== 'state' && f !== 'memory') rmSync(join(work, f), { force: true });
  // Fixtures of earlier builds go (each is ~20 MiB on disk).
  for (const old of readdirSync(join(cacheDir(), 'fixtures')))
    if (old.startsWith('linux-shell-') && !old.includes('.tmp-'))
      rmSync(join(cacheDir(), 'fixtures', old), { recursive: true, force: true });
  renameSync(work, dir);
  return { state, memory, made: true };
}
