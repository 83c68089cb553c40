// Bus 0 as a VM sees it: the configuration mechanisms (ports 0xcf8-0xcff and ECAM),
// the 32-bit memory window that routes BAR accesses to functions, the host bridge at
// 00:00.0, and the bookkeeping for adding functions (next slot, BAR space, INTx GSI).
import { KilnError } from '../errors.js';
import * as layout from '../layout.js';
import type { Vm } from '../vm.js';
import { PCI_HOST_BRIDGE, PCI_SLOTS, PciBarAllocator, PciRoot } from '../pci/root.js';

export interface PciHost {
  readonly root: PciRoot;
  readonly bars: PciBarAllocator;
  /** The next free slot (device number); slot 0 is the host bridge. */
  takeSlot(): number;
}

export function attachPciHost(vm: Vm): PciHost {
  const ports = vm.addDevice({
    id: 'pci-cf8',
    kind: 'pci-root',
    bus: 'pio',
    base: layout.PORT_PCI_CONFIG_ADDRESS,
    size: layout.PORT_PCI_CONFIG_SIZE,
    options: { role: 'cf8' },
  });
  vm.addDevice(
    {
      id: 'pci-ecam',
      kind: 'pci-root',
      bus: 'mmio',
      base: layout.PCI_ECAM_START,
      size: layout.PCI_ECAM_SIZE,
      options: { role: 'ecam' },
    },
    ports,
  );
  vm.addDevice(
    {
      id: 'pci-window',
      kind: 'pci-root',
      bus: 'mmio',
      base: layout.PCI_MMIO_START,
      size: layout.PCI_MMIO_SIZE,
      options: { role: 'window', windowStart: layout.PCI_MMIO_START },
    },
    ports,
  );
  const root = new PciRoot(ports.state);
  root.addFunction(0, PCI_HOST_BRIDGE);
  let next = 1;
  return {
    root,
    bars: new PciBarAllocator(layout.PCI_MMIO_START, layout.PCI_MMIO_SIZE),
    takeSlot() {
      if (next >= PCI_SLOTS) throw new KilnError(`bus 0 is full (${PCI_SLOTS - 1} devices)`);
      return next++;
    },
  };
}
