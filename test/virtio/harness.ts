// Shared set-up for virtio tests: a test VM with an in-kernel irqchip, PCI bus 0 and
// the given virtio devices, running a freestanding C driver at ring 3 in long mode.
import { loadProgram } from '../../src/guest/kit.js';
import * as layout from '../../src/layout.js';
import { pciIntxGsi } from '../../src/layout.js';
import { attachPciHost, type PciHost } from '../../src/platform/pci.js';
import { addVirtioPciDevice, type VirtioPciDevice } from '../../src/platform/virtio.js';
import type { VirtioDeviceConfig } from '../../src/virtio/catalogue.js';
import type { VmResult } from '../../src/vm.js';
import { createTestVm, type TestVm } from '../helpers.js';

export interface VirtioTestVm extends TestVm {
  readonly pci: PciHost;
  readonly devices: VirtioPciDevice[];
}

export function virtioTestVm(
  devices: readonly VirtioDeviceConfig[],
  memoryBytes = 64 * layout.MiB,
  log?: (line: string) => void,
): VirtioTestVm {
  const t = createTestVm({ irqchip: true, memoryBytes, ...(log ? { log } : {}) });
  try {
    const pci = attachPciHost(t.vm);
    const added = devices.map((d, i) => {
      const slot = pci.takeSlot();
      return addVirtioPciDevice(t.vm, pci.root, pci.bars, {
        id: `virtio${i}`,
        slot,
        intxGsi: pciIntxGsi(slot),
        device: d,
      });
    });
    return { ...t, pci, devices: added };
  } catch (err) {
    void t.vm.destroy();
    throw err;
  }
}

/** Runs `main` (C, with kit.h/virtio.h) as the guest; the VM is destroyed afterwards. */
export async function runDriver(
  t: VirtioTestVm,
  main: string,
  defines: Record<string, number> = {},
  check: (result: VmResult) => void | Promise<void> = () => undefined,
  whileRunning: () => Promise<void> = async () => undefined,
): Promise<VmResult> {
  try {
    loadProgram(t.vm, {
      mode: 'long64',
      cpl: 3,
      source: 'call kit_main\nud2',
      c: [`#include "virtio.h"\n${main}`],
      defines: { ...defines, ...Object.fromEntries(t.devices.map((d, i) => [`SLOT${i}`, d.slot])) },
    });
    await t.vm.start();
    await whileRunning();
    const result = await t.vm.wait();
    await check(result);
    return result;
  } finally {
    await t.vm.destroy();
  }
}

/** RESULT(i) as the guest left it. */
export const result = (t: TestVm, i: number) => t.vm.memory.readU64(layout.KIT_DATA + 8 * i);
