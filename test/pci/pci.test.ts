// PCI configuration space through both mechanisms a guest uses (ports 0xcf8/0xcfc and
// ECAM), from test guests, and the host bridge's and a device's headers decoded by
// pciutils' own decoder (lspci -F reads a config-space dump).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { loadProgram } from '../../src/guest/kit.js';
import * as layout from '../../src/layout.js';
import { PciRoot, type PciFunctionConfig } from '../../src/pci/root.js';
import { allocateDeviceState } from '../../src/devices/catalogue.js';
import { Vm } from '../../src/vm.js';
import { kvmSkip, tempDir, toolAvailable } from '../helpers.js';

const HOST_BRIDGE: PciFunctionConfig = { vendorId: 0x1b36, deviceId: 0x0008, classCode: 0x060000 };
const TEST_FUNCTION: PciFunctionConfig = {
  vendorId: 0x1af4,
  deviceId: 0x1042,
  classCode: 0x010000,
  revision: 1,
  subsystemVendorId: 0x1af4,
  subsystemId: 0x0002,
  interruptPin: 1,
  bars: [
    { kind: 'memory32', size: 0x4000, address: layout.PCI_MMIO_START },
    { kind: 'io', size: 0x20, address: 0xc000 },
  ],
};

function pciVm() {
  const vm = Vm.create({ memoryBytes: 4 * layout.MiB, vcpus: 1 });
  vm.addDevice({
    id: 'debug-exit',
    kind: 'debug-exit',
    bus: 'pio',
    base: layout.PORT_DEBUG_EXIT,
    size: layout.PORT_DEBUG_EXIT_SIZE,
  });
  const cf8 = vm.addDevice({
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
    cf8,
  );
  const root = new PciRoot(cf8.state);
  root.addFunction(0, HOST_BRIDGE);
  root.addFunction(3, TEST_FUNCTION);
  return { vm, root };
}

/** CONFIG_ADDRESS for bus 0, `slot`, function 0, register `reg`. */
const cf8 = (slot: number, reg: number) => (0x8000_0000 | (slot << 11) | reg) >>> 0;

describe('PCI configuration space from a guest', { skip: kvmSkip }, () => {
  test('through ports 0xcf8/0xcfc: IDs, an absent slot, a BAR sizing probe, a read-only ID', async () => {
    const { vm, root } = pciVm();
    try {
      const read = (slot: number, reg: number, at: number) => `
        mov $0xcf8, %dx
        mov $${cf8(slot, reg)}, %eax
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        mov %eax, ${layout.KIT_DATA + at}`;
      const write = (slot: number, reg: number, value: number) => `
        mov $0xcf8, %dx
        mov $${cf8(slot, reg)}, %eax
        out %eax, %dx
        mov $0xcfc, %dx
        mov $${value >>> 0}, %eax
        out %eax, %dx`;
      loadProgram(vm, {
        mode: 'protected32',
        cpl: 3,
        source: [
          read(0, 0x00, 0),
          read(3, 0x00, 4),
          read(31, 0x00, 8),
          write(3, 0x10, 0xffffffff),
          read(3, 0x10, 12),
          write(3, 0x14, 0xffffffff),
          read(3, 0x14, 16),
          write(3, 0x00, 0x12345678),
          read(3, 0x00, 20),
          // A byte read of the class code's base class at 0xcfc + 3.
          'mov $0xcf8, %dx',
          `mov $${cf8(3, 0x08)}, %eax`,
          'out %eax, %dx',
          'mov $0xcff, %dx',
          'in %dx, %al',
          `mov %al, ${layout.KIT_DATA + 24}`,
          'mov $PORT_DEBUG_EXIT, %dx\n mov $0, %al\n out %al, %dx',
        ].join('\n'),
      });
      await vm.start();
      const result = await vm.wait();
      assert.equal(result.exitCode, 0, result.detail);
      const m = vm.memory;
      assert.equal(m.readU32(layout.KIT_DATA), 0x00081b36, 'host bridge 1b36:0008');
      assert.equal(m.readU32(layout.KIT_DATA + 4), 0x10421af4);
      assert.equal(m.readU32(layout.KIT_DATA + 8), 0xffffffff, 'no function in slot 31');
      assert.equal(m.readU32(layout.KIT_DATA + 12), 0xffffc000, 'a 16 KiB 32-bit memory BAR');
      assert.equal(m.readU32(layout.KIT_DATA + 16), 0xffffffe1, 'a 32-byte I/O BAR');
      assert.equal(m.readU32(layout.KIT_DATA + 20), 0x10421af4, 'IDs are read-only');
      assert.equal(m.readU8(layout.KIT_DATA + 24), 0x01, 'base class: mass storage');
      // The guest's probe left the BAR at all-ones' address bits: what it wrote, masked.
      assert.equal(new DataView(root.dump(3).buffer).getUint32(0x10, true), 0xffffc000);
    } finally {
      await vm.destroy();
    }
  });

  test('through ECAM (MMIO, from ring 3): IDs, class, and all-ones for absent functions', async () => {
    const { vm } = pciVm();
    try {
      const ecam = (slot: number, fn: number, reg: number) => layout.PCI_ECAM_START + (slot << 15) + (fn << 12) + reg;
      loadProgram(vm, {
        mode: 'long64',
        cpl: 3,
        source: `
          mov $${ecam(0, 0, 0)}, %ebx
          mov (%rbx), %eax
          mov %eax, KIT_DATA
          mov $${ecam(3, 0, 8)}, %ebx
          mov (%rbx), %eax
          mov %eax, KIT_DATA + 4
          mov $${ecam(3, 1, 0)}, %ebx
          mov (%rbx), %eax
          mov %eax, KIT_DATA + 8
          mov $${ecam(3, 0, 0x2c)}, %ebx
          movzwl 2(%rbx), %eax
          mov %eax, KIT_DATA + 12
          ud2`,
      });
      await vm.start();
      const result = await vm.wait();
      assert.equal(result.reason, 'shutdown', 'ends on ud2');
      const m = vm.memory;
      assert.equal(m.readU32(layout.KIT_DATA), 0x00081b36);
      assert.equal(m.readU32(layout.KIT_DATA + 4), 0x01000001, 'class 010000, revision 1');
      assert.equal(m.readU32(layout.KIT_DATA + 8), 0xffffffff, 'function 1 does not exist');
      assert.equal(m.readU32(layout.KIT_DATA + 12), 0x0002, 'subsystem id');
    } finally {
      await vm.destroy();
    }
  });
});

const lspci = toolAvailable('lspci', '--version');

test(
  'lspci -F decodes the host bridge and a device with memory and I/O BARs',
  { skip: lspci ? false : 'needs lspci (apt-get install pciutils)' },
  () => {
    const state = allocateDeviceState('pci-root', { role: 'cf8' });
    const root = new PciRoot(state);
    root.addFunction(0, HOST_BRIDGE);
    root.addFunction(3, TEST_FUNCTION);
    // The format of `lspci -x`: a header line per function, then 16 bytes per line.
    const dump = [0, 3]
      .map((slot) => {
        const bytes = root.dump(slot);
        const lines = [`00:${slot.toString(16).padStart(2, '0')}.0 Class 0000: 0000:0000`];
        for (let at = 0; at < bytes.length; at += 16) {
          lines.push(
            `${at.toString(16).padStart(2, '0')}: ${[...bytes.subarray(at, at + 16)].map((b) => b.toString(16).padStart(2, '0')).join(' ')}`,
          );
        }
        return `${lines.join('\n')}\n`;
      })
      .join('\n');
    const file = join(tempDir(), 'config.txt');
    writeFileSync(file, dump);
    const out = execFileSync('lspci', ['-F', file, '-nn', '-vv'], { encoding: 'utf8' });
    assert.match(out, /00:00\.0 Host bridge \[0600\]: .*\[1b36:0008\]/);
    assert.match(out, /00:03\.0 SCSI storage controller \[0100\]: .*\[1af4:1042\] \(rev 01\)/);
    assert.match(out, /Subsystem: .*\[1af4:0002\]/);
    assert.match(out, /Interrupt: pin A routed to IRQ 0/);
    assert.match(out, /Region 0: Memory at c0000000 \(32-bit, non-prefetchable\)/);
    assert.match(out, /Region 1: I\/O ports at c000/);
  },
);

test('bad PCI layouts are refused', () => {
  const root = new PciRoot(allocateDeviceState('pci-root', { role: 'cf8' }));
  root.addFunction(1, HOST_BRIDGE);
  assert.throws(() => root.addFunction(1, HOST_BRIDGE), /PCI slot 1 is already taken/);
  assert.throws(() => root.addFunction(32, HOST_BRIDGE), /PCI slot 32 does not exist/);
  assert.throws(
    () => root.addFunction(2, { ...HOST_BRIDGE, bars: [{ kind: 'memory32', size: 0x3000, address: 0 }] }),
    /size 12288 is not a power of two/,
  );
  assert.throws(
    () => root.addFunction(2, { ...HOST_BRIDGE, bars: [{ kind: 'memory32', size: 0x4000, address: 0x1000 }] }),
    /not aligned to its size/,
  );
});
