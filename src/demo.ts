// The built-in demo guest: `kiln run --demo`.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { loadProgram, type KitProgram } from './guest/kit.js';
import type { DeviceSpec } from './devices/device.js';
import { IRQ_COM1, PORT_COM1, PORT_COM_SIZE, PORT_DEBUG_EXIT, PORT_DEBUG_EXIT_SIZE, PORT_PROGRESS, PORT_PROGRESS_SIZE } from './layout.js';
import type { Vm } from './vm.js';

const demoSource = () => readFileSync(fileURLToPath(new URL('../../guests/demo.S', import.meta.url)), 'utf8');

export function demoProgram(): KitProgram {
  return { mode: 'protected32', cpl: 3, source: demoSource() };
}

/** The devices every Kiln VM has: COM1 (IRQ 4), the progress port, debug-exit. */
export function addStandardDevices(vm: Vm, serialOutFd: number): { com1: DeviceSpec; progress: DeviceSpec } {
  const com1 = vm.addDevice({ id: 'com1', kind: 'serial', bus: 'pio', base: PORT_COM1, size: PORT_COM_SIZE, options: { outFd: serialOutFd, irq: IRQ_COM1 } });
  const progress = vm.addDevice({ id: 'progress', kind: 'progress', bus: 'pio', base: PORT_PROGRESS, size: PORT_PROGRESS_SIZE });
  vm.addDevice({ id: 'debug-exit', kind: 'debug-exit', bus: 'pio', base: PORT_DEBUG_EXIT, size: PORT_DEBUG_EXIT_SIZE });
  return { com1, progress };
}

export function loadDemo(vm: Vm): void {
  loadProgram(vm, demoProgram());
}
