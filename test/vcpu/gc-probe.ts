// Run by exit-loop.test.ts under `node --trace-gc`: a guest that makes N port-I/O exits.
import { addStandardDevices } from '../../src/platform/standard.js';
import { loadProgram } from '../../src/guest/kit.js';
import { MiB } from '../../src/layout.js';
import { Vm } from '../../src/vm.js';

const exits = Number(process.argv[2]);
const vm = Vm.create({ memoryBytes: 4 * MiB, vcpus: 1 });
addStandardDevices(vm, -1);
loadProgram(vm, {
  mode: 'protected32',
  cpl: 3,
  source: `mov $PORT_PROGRESS, %dx\n mov $EXITS, %ecx\n1: mov %ecx, %eax\n out %eax, %dx\n dec %ecx\n jnz 1b\n mov $PORT_DEBUG_EXIT, %dx\n out %al, %dx`,
  defines: { EXITS: exits },
});
await vm.start();
const result = await vm.wait();
process.stdout.write(`exits=${result.vcpus[0]!.exits}\n`);
await vm.destroy();
