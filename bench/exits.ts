// `npm run bench -- exits`: the port-I/O exit round trip, Kiln against a C loop.
// One guest (a tight `out` loop to the progress port), one starting state: Kiln sets
// up the VM, then writes its memory image and vCPU registers out for the C harness,
// so both run identical guest code from identical registers on this machine.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { addStandardDevices } from '../src/platform/standard.js';
import { loadProgram, type KitProgram } from '../src/guest/kit.js';
import { dataView } from '../src/kvm/struct.js';
import { kvm_regs, kvm_sregs } from '../src/kvm/structs.js';
import { MiB, PORT_DEBUG_EXIT, PORT_PROGRESS } from '../src/layout.js';
import { Vm } from '../src/vm.js';
import { median, type BenchContext } from './util.js';

const ITERATIONS = 200_000;
const ROUNDS = 5;
const MEMORY = 4 * MiB; // the C harness maps the same 4 MiB

const program: KitProgram = {
  mode: 'protected32',
  cpl: 3,
  source: `
    mov $PORT_PROGRESS, %dx
    mov $ITERATIONS, %ecx
  1:
    mov %ecx, %eax
    out %eax, %dx
    dec %ecx
    jnz 1b
    mov $PORT_DEBUG_EXIT, %dx
    xor %eax, %eax
    out %al, %dx
  `,
  defines: { ITERATIONS },
};

async function kilnRound(dumpDir?: string): Promise<number> {
  const vm = Vm.create({ memoryBytes: MEMORY, vcpus: 1 });
  try {
    addStandardDevices(vm, -1);
    loadProgram(vm, program);
    if (dumpDir) {
      const sregs = kvm_sregs.alloc();
      kvm_sregs.encode(dataView(sregs), 0, vm.vcpus[0]!.getSregs());
      const regs = kvm_regs.alloc();
      kvm_regs.encode(dataView(regs), 0, vm.vcpus[0]!.getRegs());
      writeFileSync(join(dumpDir, 'sregs.bin'), sregs);
      writeFileSync(join(dumpDir, 'regs.bin'), regs);
      writeFileSync(join(dumpDir, 'memory.bin'), vm.memory.read(0, MEMORY));
    }
    await vm.start();
    const result = await vm.wait();
    const v = result.vcpus[0]!;
    if (result.reason !== 'guest-exit' || v.exits !== ITERATIONS + 1)
      throw new Error(`Kiln run ended badly: ${result.detail} after ${v.exits} exits`);
    return (v.runMs * 1000) / v.exits;
  } finally {
    await vm.destroy();
  }
}

function cRound(exe: string, dir: string): number {
  const out = execFileSync(
    exe,
    [
      join(dir, 'memory.bin'),
      join(dir, 'sregs.bin'),
      join(dir, 'regs.bin'),
      String(PORT_PROGRESS),
      String(PORT_DEBUG_EXIT),
    ],
    { encoding: 'utf8' },
  );
  const m = /exits=(\d+) ns=(\d+)/.exec(out);
  if (!m || Number(m[1]) !== ITERATIONS + 1) throw new Error(`C harness printed: ${out}`);
  return Number(m[2]) / 1000 / Number(m[1]);
}

export async function benchExits(ctx: BenchContext): Promise<void> {
  const exe = join(ctx.dir, 'exit-loop');
  const src = fileURLToPath(new URL('../../bench/c/exit-loop.c', import.meta.url));
  execFileSync('gcc', ['-O2', '-o', exe, src]);
  await kilnRound(ctx.dir); // writes the shared starting state; also warms Kiln up
  const kiln: number[] = [];
  const c: number[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    // Alternate so that drift on the machine affects both sides alike.
    c.push(cRound(exe, ctx.dir));
    kiln.push(await kilnRound());
    ctx.log(`  round ${round + 1}: kiln ${kiln.at(-1)!.toFixed(3)} us/exit, C ${c.at(-1)!.toFixed(3)} us/exit`);
  }
  const k = median(kiln);
  const r = median(c);
  ctx.log(
    `exit round trip (${ITERATIONS} port writes, protected mode ring 3, median of ${ROUNDS}): Kiln ${k.toFixed(3)} us, C ${r.toFixed(3)} us`,
  );
  ctx.result(`exits kiln_us=${k.toFixed(3)} c_us=${r.toFixed(3)} ratio=${(k / r).toFixed(3)}`);
}
