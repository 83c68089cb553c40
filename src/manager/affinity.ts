// vCPU pinning: sched_setaffinity(2) on a thread of the VMM, through the FFI (loaded
// only when a VM asks for pinning).
import * as libc from '../kvm/libc.js';

/** Pins thread `tid` to host CPU `cpu`; returns null, or why it failed. */
export function pinThread(tid: number, cpu: number): string | null {
  // A cpu_set_t is a bit mask; 128 bytes (1024 CPUs) is glibc's size, larger for larger CPU numbers.
  const mask = Buffer.alloc(Math.max(128, Math.ceil((cpu + 1) / 64) * 8));
  mask[cpu >> 3] = 1 << (cpu & 7);
  if (libc.schedSetaffinity(tid, mask.length, mask) === 0) return null;
  const e = libc.errno();
  return `${libc.errnoName(e)} (${libc.strerror(e)})`;
}

/** The host CPUs thread `tid` may run on. */
export function affinityOf(tid: number): number[] {
  const mask = Buffer.alloc(128);
  if (libc.schedGetaffinity(tid, mask.length, mask) < 0) return [];
  const cpus: number[] = [];
  for (let i = 0; i < mask.length * 8; i++) if (mask[i >> 3]! & (1 << (i & 7))) cpus.push(i);
  return cpus;
}
