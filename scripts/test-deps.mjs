#!/usr/bin/env node
// The Debian packages Kiln's tests need, in one place. Run before the tests (npm's
// pretest) and by .ci/run: as root it installs what is missing; otherwise it names
// what is missing and fails, so no test is skipped for want of a tool.
import { spawnSync } from 'node:child_process';

// gcc/binutils assemble test guests at test time; setpriv (util-linux) runs the
// permission test unprivileged; iasl (acpica-tools) decodes the ACPI tables; lspci
// (pciutils) decodes PCI configuration space; the rest builds and packs the guest kit's
// minimal Linux (Debian's linux-source-6.1, busybox); iproute2 makes the network
// namespaces and passt is the rootless network backend the virtio-net tests use;
// cpio unpacks the initramfs writer's output (an independent decoder); strace watches
// which seccomp filters `kiln run` loads; chromium is the real browser the dashboard's
// tests drive (through playwright-core, which never downloads one); openssl makes the
// certificates the daemons' TLS tests use; python3 plays the far end of a TAP (an
// AF_PACKET socket) in the virtio-net tests that run without a guest.
export const PACKAGES = [
  'gcc',
  'binutils',
  'make',
  'util-linux',
  'acpica-tools',
  'pciutils',
  'linux-source-6.1',
  'bc',
  'bison',
  'flex',
  'libelf-dev',
  'libssl-dev',
  'xz-utils',
  'busybox-static',
  'e2fsprogs',
  'iproute2',
  'passt',
  'cpio',
  'strace',
  'chromium',
  'openssl',
  'python3',
];

const installed = (p) => {
  const r = spawnSync('dpkg-query', ['-W', '-f=${Status}', p], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.includes('install ok installed');
};

const missing = PACKAGES.filter((p) => !installed(p));
if (missing.length === 0) process.exit(0);
if (process.getuid?.() !== 0) {
  process.stderr.write(
    `kiln tests: these Debian packages are missing: ${missing.join(' ')}\n  install them (apt-get install ${missing.join(' ')}) or run the tests as root, which installs them\n`,
  );
  process.exit(1);
}
process.stderr.write(`kiln tests: installing ${missing.join(' ')}\n`);
const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
for (const args of [
  ['update', '-qq'],
  ['install', '-y', '-qq', '--no-install-recommends', ...missing],
]) {
  const r = spawnSync('apt-get', args, { stdio: 'inherit', env });
  if (r.status !== 0) {
    process.stderr.write(`kiln tests: apt-get ${args[0]} failed (status ${r.status})\n`);
    process.exit(1);
  }
}
