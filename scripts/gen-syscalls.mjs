// Regenerates src/seccomp/syscalls.ts from the kernel's x86-64 system call header
// (Debian's linux-libc-dev). Run by hand after a kernel-header update; the output is committed.
import { readFileSync, writeFileSync } from 'node:fs';

const header = readFileSync(process.argv[2] ?? '/usr/include/x86_64-linux-gnu/asm/unistd_64.h', 'utf8');
const rows = [...header.matchAll(/^#define __NR_(\w+)\s+(\d+)$/gm)].map(([, name, nr]) => `  ${name}: ${nr},`);
const out = [
  "// x86-64 system call numbers, generated from the kernel's asm/unistd_64.h (linux-libc-dev) by",
  '// scripts/gen-syscalls.mjs. Names as seccompiler and strace spell them.',
  'export const SYSCALLS_X86_64: Readonly<Record<string, number>> = {',
  ...rows,
  '};',
  '',
].join('\n');
writeFileSync(new URL('../src/seccomp/syscalls.ts', import.meta.url), out);
