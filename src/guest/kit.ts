// The test-guest kit: assemble a program, load it at KIT_CODE, and start every vCPU
// in the program's mode and ring with rdi = the vCPU's index.
import { KIT_CODE } from '../layout.js';
import type { Vm } from '../vm.js';
import { assemble } from './asm.js';
import { enterMode, type Cpl, type CpuMode } from './modes.js';

export interface KitProgram {
  readonly mode: CpuMode;
  readonly cpl: Cpl;
  /** GNU as source; `.code16`/`.code32`/`.code64` is added to match the mode. */
  readonly source: string;
  readonly defines?: Readonly<Record<string, number>>;
  /**
   * Freestanding C files linked after the assembly (long64 only); `#include "kit.h"`
   * and `"virtio.h"` give the kit's MMIO, PCI, LAPIC and virtio driver helpers.
   */
  readonly c?: readonly string[];
}

const directive: Record<CpuMode, string> = { real: '.code16', protected32: '.code32', long64: '.code64' };

/** Assembles a kit program into the bytes to load at KIT_CODE. */
export function buildProgram(program: KitProgram): Uint8Array {
  // Real-mode code runs with CS = KIT_CODE >> 4, so its labels are offsets from KIT_CODE.
  const origin = program.mode === 'real' ? 0 : KIT_CODE;
  return assemble(`${directive[program.mode]}\n.text\n${program.source}\n`, origin, program.defines, {
    cSources: program.c ?? [],
  });
}

/** Loads `program` into the VM's memory and points every vCPU at it. */
export function loadProgram(vm: Vm, program: KitProgram, image = buildProgram(program)): void {
  vm.memory.write(KIT_CODE, image);
  vm.vcpus.forEach((vcpu, index) =>
    enterMode(vcpu, vm.memory, {
      mode: program.mode,
      cpl: program.cpl,
      entry: KIT_CODE,
      regs: { rdi: BigInt(index), rsi: BigInt(vm.vcpus.length) },
    }),
  );
}
