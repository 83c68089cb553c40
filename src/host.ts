// Facts about the host that need no FFI (so the manager can ask them without koffi).
import { readFileSync } from 'node:fs';
import { totalmem } from 'node:os';
import { fileURLToPath } from 'node:url';

/**
 * kiln-vmm's entry as the manager, the pool and the jailer start it: the CommonJS stub the
 * build writes beside `vmm-cli.js` (scripts/bundle.mjs). Node sets up its ES module loader
 * for an ES module entry, ~10 ms of every start here (docs/ARCHITECTURE.md, "Start-up").
 */
export const KILN_VMM = fileURLToPath(new URL('./vmm-cli.cjs', import.meta.url));

/** Whether a process's argument names a kiln-vmm entry: this build's, or the ES module one (an earlier Kiln's VMMs). */
export const isKilnVmmEntry = (arg: string): boolean => /vmm-cli\.c?js$/.test(arg);

/** /proc/meminfo's fields, each in KiB (0 when absent). Throws where there is no /proc. */
export function meminfoKiB(): (key: string) => number {
  const info = readFileSync('/proc/meminfo', 'utf8');
  return (key) => Number(new RegExp(`^${key}:\\s*(\\d+) kB`, 'm').exec(info)?.[1] ?? 0);
}

/**
 * Free pages in the host's default hugetlb pool and their size in bytes, or null where
 * /proc/meminfo cannot be read (a jailed VMM: the mapping itself then says).
 */
export function hugePagesFree(): { pages: number; bytes: number } | null {
  try {
    const info = readFileSync('/proc/meminfo', 'utf8');
    const free = /^HugePages_Free:\s*(\d+)/m.exec(info);
    const size = /^Hugepagesize:\s*(\d+) kB/m.exec(info);
    return free && size ? { pages: Number(free[1]), bytes: Number(size[1]) * 1024 } : null;
  } catch {
    return null;
  }
}

/** RAM plus swap, in bytes (RAM alone from sysinfo(2) where there is no /proc, as in a jailed VMM). */
export function hostMemoryBytes(): number {
  let kib: (key: string) => number;
  try {
    kib = meminfoKiB();
  } catch {
    return totalmem() || Infinity;
  }
  return (kib('MemTotal') + kib('SwapTotal')) * 1024 || Infinity;
}

/**
 * The environment to start a kiln-vmm (or the jailer that executes one) with: this
 * process's, less NODE_EXTRA_CA_CERTS, which makes Node read and parse a CA bundle before
 * anything else (~95 ms where a host sets it; a VMM needs no extra CA).
 */
export function vmmEnvironment(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.NODE_EXTRA_CA_CERTS;
  return env;
}

/** Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host === '[::1]' || host.startsWith('127.');
}
