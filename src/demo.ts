// The built-in demo guest: `kiln run --demo`.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { loadProgram, type KitProgram } from './guest/kit.js';
import type { Vm } from './vm.js';

const demoSource = () => readFileSync(fileURLToPath(new URL('../../guests/demo.S', import.meta.url)), 'utf8');

export function demoProgram(): KitProgram {
  return { mode: 'protected32', cpl: 3, source: demoSource() };
}

export function loadDemo(vm: Vm): void {
  loadProgram(vm, demoProgram());
}
