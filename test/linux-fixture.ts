// The test fixture later tests restore instead of booting Linux for 50 s: the kit's
// Linux booted to its shell (1 vCPU, 128 MiB, an entropy device, a read-only disk whose
// first bytes are FIXTURE_DISK_MARK, and, where the host lets tests make TAPs, a NIC
// `net0` whose TAP existed only while the fixture was made: a load gives it another with
// network_overrides) under kiln-vmm and snapshotted. Made once per build of Kiln and guest kit (the cache key hashes Kiln's
// compiled code, the kernel and the initramfs) and kept in the guest kit's cache.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildInitramfs, buildMinimalKernel, cacheDir } from '../src/guestkit/build.js';
import { toolAvailable } from './helpers.js';
import { bootShell, pauseAndSnapshot, startVmm } from './vmm-driver.js';

export interface LinuxFixture {
  readonly state: string;
  readonly memory: string;
  /** Whether the snapshot has a NIC, net0 (then every load must give it a TAP). */
  readonly nic: boolean;
  /** Whether this call booted Linux to make it (false: it was cached). */
  readonly made: boolean;
}

const SRC = fileURLToPath(new URL('../src/', import.meta.url));
export const FIXTURE_DISK_MARK = 'kiln-fixture-disk\n';
/** Root with a TUN device and iproute2: tests can make TAPs and network namespaces. */
export const canNetns = process.getuid?.() === 0 && existsSync('/dev/net/tun') && toolAvailable('ip', '-V');

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
  const name = `linux-shell-${key}${canNetns ? '-nic' : ''}`;
  const dir = join(cacheDir(), 'fixtures', name);
  const state = join(dir, 'state');
  const memory = join(dir, 'memory');
  // The disk's path is in the snapshot: it lives beside the fixture's directory, not in it
  // (the directory is built under a temporary name).
  const disk = join(cacheDir(), 'fixtures', `${name}.disk`);
  if (existsSync(state) && existsSync(memory) && existsSync(disk)) return { state, memory, nic: canNetns, made: false };
  log('making the Linux snapshot fixture (booting the kit Linux once for this build)');
  const work = `${dir}.tmp-${process.pid}`;
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  const image = Buffer.alloc(1024 * 1024);
  image.write(FIXTURE_DISK_MARK);
  writeFileSync(disk, image);
  const vmm = await startVmm(work, 'fixture');
  try {
    await bootShell(
      vmm,
      {
        kernel: kernel.vmlinux,
        initrd: initrd.path,
        memoryMiB: 128,
        entropy: true,
        disks: [{ id: 'data', path: disk }],
        nets: canNetns ? [{ id: 'net0', tap: `kfx${process.pid % 100000}`, mac: '06:00:0a:63:00:02' }] : [],
      },
      600,
    );
    await pauseAndSnapshot(vmm, join(work, 'state'), join(work, 'memory'));
  } finally {
    vmm.child.kill('SIGKILL');
    await vmm.exited;
  }
  for (const f of readdirSync(work)) if (f !== 'state' && f !== 'memory') rmSync(join(work, f), { force: true });
  // Fixtures of earlier builds go (each is ~20 MiB on disk).
  for (const old of readdirSync(join(cacheDir(), 'fixtures')))
    if (old.startsWith('linux-shell-') && !old.includes('.tmp-') && old !== `${name}.disk`)
      rmSync(join(cacheDir(), 'fixtures', old), { recursive: true, force: true });
  renameSync(work, dir);
  return { state, memory, nic: canNetns, made: true };
}
