// Builds guest programs from GNU assembler source at run time: gcc preprocesses and
// assembles (so sources may use #define and the Kiln constants passed with -D), ld
// places the code at its load address, objcopy turns it into a flat binary.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KilnError } from '../errors.js';
import * as layout from '../layout.js';

/** Constants every kit source can use by name (from layout.ts). */
export const KIT_DEFINES: Readonly<Record<string, number>> = {
  PORT_COM1: layout.PORT_COM1,
  PORT_PROGRESS: layout.PORT_PROGRESS,
  PORT_DEBUG_EXIT: layout.PORT_DEBUG_EXIT,
  PORT_TEST_DEVICE: layout.PORT_TEST_DEVICE,
  TEST_DEVICE_MMIO_BASE: layout.TEST_DEVICE_MMIO_BASE,
  KIT_DATA: layout.KIT_DATA,
  KIT_CODE: layout.KIT_CODE,
  KIT_HEAP: layout.KIT_HEAP,
  DEBUG_EXIT_MMIO_BASE: layout.DEBUG_EXIT_MMIO_BASE,
  PCI_ECAM_START: layout.PCI_ECAM_START,
  LAPIC_START: layout.LAPIC_START,
};

/** Freestanding 64-bit C for ring-3 kit guests: no SSE (no FPU state to set up), no red zone, no PIC. */
const C_FLAGS = [
  '-O2',
  '-m64',
  '-ffreestanding',
  '-nostdlib',
  '-fno-pic',
  '-fno-pie',
  '-fno-stack-protector',
  '-mno-red-zone',
  '-mgeneral-regs-only',
  '-fno-asynchronous-unwind-tables',
  '-fcf-protection=none',
  '-Wall',
  '-Werror',
];
/** The kit's C headers (guests/kit). */
const KIT_INCLUDE = fileURLToPath(new URL('../../../guests/kit', import.meta.url));

function tool(cmd: string, args: string[], what: string): void {
  try {
    execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    if (e.code === 'ENOENT')
      throw new KilnError(
        `${cmd} is needed to build guest programs (${what}); install it with: apt-get install gcc binutils`,
      );
    throw new KilnError(`${what} failed: ${e.stderr?.toString().trim() ?? e.message}`);
  }
}

/**
 * Assembles `source` into a flat binary whose first byte is at `origin` (the address
 * its labels assume). Execution starts at the first instruction of `.text`.
 */
export function assemble(
  source: string,
  origin: number,
  defines: Readonly<Record<string, number>> = {},
  options: { cSources?: readonly string[] } = {},
): Uint8Array {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-asm-'));
  try {
    const src = join(dir, 'guest.S');
    const obj = join(dir, 'guest.o');
    const elf = join(dir, 'guest.elf');
    const bin = join(dir, 'guest.bin');
    const script = join(dir, 'guest.ld');
    writeFileSync(src, source);
    writeFileSync(
      script,
      `SECTIONS { . = ${origin}; .text : { *(.text*) *(.rodata*) *(.data*) *(.bss*) *(COMMON) } /DISCARD/ : { *(.note*) *(.eh_frame*) *(.comment) } }\n`,
    );
    const d = Object.entries({ ...KIT_DEFINES, ...defines }).map(([k, v]) => `-D${k}=${v}`);
    tool('gcc', ['-c', '-nostdlib', '-ffreestanding', ...d, '-o', obj, src], 'assembling the guest');
    const objects = [obj];
    for (const [i, c] of (options.cSources ?? []).entries()) {
      const cFile = join(dir, `part${i}.c`);
      const cObj = join(dir, `part${i}.o`);
      writeFileSync(cFile, c);
      tool('gcc', [...C_FLAGS, `-I${KIT_INCLUDE}`, ...d, '-c', '-o', cObj, cFile], 'compiling the guest');
      objects.push(cObj);
    }
    tool('ld', ['-nostdlib', '-static', '-T', script, '-o', elf, ...objects], 'linking the guest');
    tool('objcopy', ['-O', 'binary', '-j', '.text', elf, bin], 'extracting the guest binary');
    return new Uint8Array(readFileSync(bin));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
