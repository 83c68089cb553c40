// Restores a ring-3 test guest's snapshot in this fresh process (snapshot.test.ts runs
// it): the same test machine, its RAM from the memory file, its state from the state
// file; runs it to its end and prints what it left as one JSON line.
import { closeSync } from 'node:fs';
import * as layout from '../../src/layout.js';
import { openMemoryFile } from '../../src/snapshot/memory-file.js';
import { readStateFile } from '../../src/snapshot/format.js';
import type { MachineState } from '../../src/vm.js';
import { createTestVm } from '../helpers.js';

const [statePath, memPath, paused] = process.argv.slice(2) as [string, string, string?];
const body = readStateFile(statePath) as { machine: MachineState; memoryBytes: number; vcpus: number };
const fd = openMemoryFile(memPath, body.memoryBytes);
const t = createTestVm({ irqchip: true, memoryBytes: body.memoryBytes, vcpus: body.vcpus, memoryFileFd: fd });
closeSync(fd);
const read = (i: number) => t.vm.memory.readU64(layout.KIT_DATA + 8 * i).toString();
const atRestore = [0, 1, 2, 3].map(read);
t.vm.restoreMachine(body.machine);
await t.vm.start({ restore: { vcpus: body.machine.vcpus, paused: paused === 'paused' } });
if (paused === 'paused') {
  // Stays paused until resumed: the guest's progress does not move meanwhile.
  await new Promise((r) => setTimeout(r, 300));
  const still = read(0);
  t.vm.resume();
  atRestore.push(still);
}
const result = await t.vm.wait();
process.stdout.write(
  `${JSON.stringify({ exitCode: result.exitCode, reason: result.reason, detail: result.detail, atRestore, after: [0, 1, 2, 3].map(read) })}\n`,
);
await t.vm.destroy();
