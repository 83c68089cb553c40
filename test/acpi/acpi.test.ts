// ACPI tables: every table decoded by iasl (Debian's acpica-tools) and checked field by
// field; every checksum verified; the AML encoder's primitives against the spec.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import * as aml from '../../src/acpi/aml.js';
import { buildAcpiTables } from '../../src/acpi/tables.js';
import {
  ACPI_START,
  IRQ_GED,
  IRQ_VMGENID,
  VMGENID_ADDR,
  PORT_ACPI_RESET,
  PORT_ACPI_SLEEP_CONTROL,
  PORT_ACPI_SLEEP_STATUS,
} from '../../src/layout.js';
import { tempDir, toolAvailable } from '../helpers.js';

const iasl = toolAvailable('iasl', '-v');

function tablesFor(vcpus: number, pci = false) {
  const t = buildAcpiTables({ vcpus, pci });
  const bytesOf = (sig: string) => {
    const off = t.addresses[sig]! - t.base;
    const len = sig === 'RSDP' ? 36 : new DataView(t.bytes.buffer).getUint32(off + 4, true);
    return t.bytes.subarray(off, off + len);
  };
  return { t, bytesOf };
}

/** Disassembles one table with iasl -d and returns the .dsl text. */
function disassemble(name: string, bytes: Uint8Array): string {
  const dir = tempDir();
  const file = join(dir, `${name}.dat`);
  writeFileSync(file, bytes);
  execFileSync('iasl', ['-d', file], { cwd: dir, stdio: 'pipe' });
  return readFileSync(join(dir, `${name}.dsl`), 'utf8');
}

test('RSDP: signature, revision 2, length, XSDT address (iasl does not decode a lone RSDP)', () => {
  const { t, bytesOf } = tablesFor(1);
  const rsdp = bytesOf('RSDP');
  const dv = new DataView(rsdp.buffer, rsdp.byteOffset, rsdp.byteLength);
  assert.equal(new TextDecoder().decode(rsdp.subarray(0, 8)), 'RSD PTR ');
  assert.equal(rsdp[15], 2);
  assert.equal(dv.getUint32(20, true), 36);
  assert.equal(dv.getBigUint64(24, true), BigInt(t.addresses.XSDT!));
});

test("every table checksums to zero; the RSDP's two checksums too", () => {
  const { bytesOf } = tablesFor(4);
  const sum = (b: Uint8Array) => b.reduce((s, x) => (s + x) & 0xff, 0);
  for (const sig of ['DSDT', 'FACP', 'APIC', 'XSDT']) assert.equal(sum(bytesOf(sig)), 0, sig);
  const rsdp = bytesOf('RSDP');
  assert.equal(sum(rsdp.subarray(0, 20)), 0, 'RSDP v1 checksum');
  assert.equal(sum(rsdp), 0, 'RSDP extended checksum');
});

describe('tables decoded by iasl', { skip: iasl ? false : 'needs iasl (apt-get install acpica-tools)' }, () => {
  const { t, bytesOf } = tablesFor(3);
  const hex = (n: number, width = 16) => n.toString(16).toUpperCase().padStart(width, '0');

  test('XSDT: the FADT and the MADT', () => {
    const dsl = disassemble('xsdt', bytesOf('XSDT'));
    assert.match(dsl, new RegExp(`ACPI Table Address +0 : ${hex(t.addresses.FACP!)}`));
    assert.match(dsl, new RegExp(`ACPI Table Address +1 : ${hex(t.addresses.APIC!)}`));
  });

  test('FADT: hardware-reduced, reset register and sleep registers in I/O space, X_DSDT', () => {
    const dsl = disassemble('facp', bytesOf('FACP'));
    assert.match(dsl, /Revision : 06/);
    assert.match(dsl, /Hardware Reduced \(V5\) : 1/);
    assert.match(dsl, /Reset Register Supported \(V2\) : 1/);
    assert.match(
      dsl,
      new RegExp(
        `Reset Register : \\[Generic Address Structure\\][\\s\\S]*?Space ID : 01 \\[SystemIO\\][\\s\\S]*?Address : ${hex(PORT_ACPI_RESET)}`,
      ),
    );
    assert.match(dsl, /Value to cause reset : 01/);
    assert.match(
      dsl,
      new RegExp(
        `Sleep Control Register : \\[Generic Address Structure\\][\\s\\S]*?Address : ${hex(PORT_ACPI_SLEEP_CONTROL)}`,
      ),
    );
    assert.match(
      dsl,
      new RegExp(
        `Sleep Status Register : \\[Generic Address Structure\\][\\s\\S]*?Address : ${hex(PORT_ACPI_SLEEP_STATUS)}`,
      ),
    );
    assert.match(dsl, new RegExp(`DSDT Address : ${hex(t.addresses.DSDT!, 16)}`), 'X_DSDT');
    assert.match(dsl, /Hypervisor ID : 004D564B4E4C494B/, '"KILNKVM"');
  });

  test('MADT: one enabled local APIC per vCPU, the IOAPIC, ISA overrides for IRQ 0 and 4, LINT1 NMI', () => {
    const dsl = disassemble('apic', bytesOf('APIC'));
    assert.match(dsl, /Local Apic Address : FEE00000/);
    for (let i = 0; i < 3; i++)
      assert.match(dsl, new RegExp(`Processor ID : ${hex(i, 2)}\\n[^\\n]*Local Apic ID : ${hex(i, 2)}`));
    assert.equal(dsl.match(/Subtable Type : 00 \[Processor Local APIC\]/g)?.length, 3);
    assert.equal(dsl.match(/Processor Enabled : 1/g)?.length, 3);
    assert.match(dsl, /Subtable Type : 01 \[I\/O APIC\][\s\S]*?Address : FEC00000/);
    assert.match(dsl, /Source : 00\n[^\n]*Interrupt : 00000002/);
    assert.match(dsl, /Source : 04\n[^\n]*Interrupt : 00000004/);
    assert.match(dsl, /Subtable Type : 04 \[Local APIC NMI\][\s\S]*?Interrupt Input LINT : 01/);
  });

  test('DSDT: COM1, RTC, power button and its GED, processors, _S5', () => {
    const dsl = disassemble('dsdt', bytesOf('DSDT'));
    assert.match(
      dsl,
      /Device \(COM1\)[\s\S]*?EisaId \("PNP0501"\)[\s\S]*?IO \(Decode16,\s+0x03F8,[^\n]*\n\s+0x03F8,[^\n]*\n\s+0x01,[^\n]*\n\s+0x08,[\s\S]*?IRQNoFlags \(\)\s+\{4\}/,
    );
    assert.match(dsl, /Device \(RTC\)[\s\S]*?EisaId \("PNP0B00"\)[\s\S]*?0x0070[\s\S]*?\{8\}/);
    assert.match(dsl, /Device \(PWRB\)[\s\S]*?EisaId \("PNP0C0C"\)/);
    assert.match(
      dsl,
      new RegExp(
        `Device \\(GED\\)[\\s\\S]*?"ACPI0013"[\\s\\S]*?Interrupt \\(ResourceConsumer, Edge, ActiveHigh, Exclusive[\\s\\S]*?0x${hex(IRQ_GED, 8)}[\\s\\S]*?Method \\(_EVT, 1[\\s\\S]*?If \\(\\(Arg0 == 0x${hex(IRQ_GED, 2)}\\)\\)[\\s\\S]*?Notify \\(\\\\_SB\\.PWRB, 0x80\\)`,
      ),
    );
    // The VM generation ID: its device, its 16 bytes' address, and the GED's second interrupt notifying it.
    assert.match(
      dsl,
      new RegExp(
        `Device \\(VGEN\\)[\\s\\S]*?Name \\(_HID, "VMGENCTR"\\)[\\s\\S]*?Name \\(_CID, "VM_Gen_Counter"\\)[\\s\\S]*?Name \\(ADDR, Package \\(0x02\\)[^{]*\\{\\s*0x${hex(VMGENID_ADDR, 8)},\\s*Zero`,
      ),
    );
    assert.match(
      dsl,
      new RegExp(
        `Device \\(GED\\)[\\s\\S]*?0x${hex(IRQ_VMGENID, 8)}[\\s\\S]*?If \\(\\(Arg0 == 0x${hex(IRQ_VMGENID, 2)}\\)\\)[\\s\\S]*?Notify \\(\\\\_SB\\.VGEN, 0x80\\)`,
      ),
    );
    for (const c of ['C000', 'C001', 'C002'])
      assert.match(dsl, new RegExp(`Device \\(${c}\\)\\s*\\{\\s*Name \\(_HID, "ACPI0007"`));
    assert.match(dsl, /Name \(_S5, Package \(0x02\)[^{]*\{\s*0x05,\s*Zero/);
  });
});

describe('the PCI host bridge and MCFG', { skip: iasl ? false : 'needs iasl (apt-get install acpica-tools)' }, () => {
  const { t, bytesOf } = tablesFor(1, true);

  test('MCFG: ECAM at 0xe0000000 for segment 0, bus 0; listed in the XSDT', () => {
    const dsl = disassemble('mcfg', bytesOf('MCFG'));
    assert.match(dsl, /Base Address : 00000000E0000000/);
    assert.match(dsl, /Segment Group Number : 0000/);
    assert.match(dsl, /Start Bus Number : 00\n[^\n]*End Bus Number : 00/);
    assert.match(
      disassemble('xsdt', bytesOf('XSDT')),
      new RegExp(`ACPI Table Address +2 : ${t.addresses.MCFG!.toString(16).toUpperCase().padStart(16, '0')}`),
    );
  });

  test('DSDT: PNP0A08 host bridge with its bus, config-port, I/O and memory windows; ECAM reserved', () => {
    const dsl = disassemble('dsdt', bytesOf('DSDT'));
    assert.match(dsl, /Device \(PCI0\)[\s\S]*?EisaId \("PNP0A08"\)[\s\S]*?EisaId \("PNP0A03"\)/);
    assert.match(
      dsl,
      /WordBusNumber \(ResourceProducer, MinFixed, MaxFixed, PosDecode,[\s\S]*?0x0000,\s+\/\/ Range Maximum/,
    );
    assert.match(dsl, /IO \(Decode16,\s+0x0CF8,/);
    assert.match(dsl, /DWordIO \(ResourceProducer[\s\S]*?0x00001000,\s+\/\/ Range Minimum\s+0x0000FFFF,/);
    assert.match(dsl, /DWordMemory \(ResourceProducer[\s\S]*?0xC0000000,\s+\/\/ Range Minimum\s+0xCFFFFFFF,/);
    assert.match(
      dsl,
      /Device \(RES0\)[\s\S]*?EisaId \("PNP0C02"\)[\s\S]*?Memory32Fixed \(ReadWrite,\s+0xE0000000,[^\n]*\n\s+0x00100000,/,
    );
  });
});

test('the tables live in the legacy area and the RSDP is first', () => {
  const { t } = tablesFor(254);
  assert.equal(t.rsdp, ACPI_START);
  assert.ok(t.base + t.bytes.length <= 0x10_0000);
  assert.throws(() => buildAcpiTables({ vcpus: 255 }), /at most 254 vCPUs/);
});

test('AML primitives: PkgLength, NameString, integers, EISA ids', () => {
  assert.deepEqual([...aml.pkgLength(0x3e)], [0x3f]);
  assert.deepEqual([...aml.pkgLength(0x3f)], [0x41, 0x04]); // 0x41 total: 2-byte form
  assert.deepEqual([...aml.pkgLength(0x1000)], [0x83, 0x00, 0x01]); // 0x1003 total: 3-byte form
  assert.deepEqual([...aml.nameString('_HID')], [0x5f, 0x48, 0x49, 0x44]);
  assert.deepEqual([...aml.nameString('\\_SB.PWRB')], [0x5c, 0x2e, 0x5f, 0x53, 0x42, 0x5f, 0x50, 0x57, 0x52, 0x42]);
  assert.deepEqual([...aml.integer(0)], [0x00]);
  assert.deepEqual([...aml.integer(1)], [0x01]);
  assert.deepEqual([...aml.integer(0x1234)], [0x0b, 0x34, 0x12]);
  assert.deepEqual([...aml.eisaId('PNP0501')], [0x0c, 0x41, 0xd0, 0x05, 0x01]);
  assert.throws(() => aml.nameString('TOOLONG'), /bad ACPI name segment/);
});
