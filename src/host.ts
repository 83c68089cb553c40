// Facts about the host that need no FFI (so the manager can ask them without koffi).
import { readFileSync } from 'node:fs';
import { totalmem } from 'node:os';

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
