// ACPI tables (ACPI 6.5, chapter 5) for a hardware-reduced platform: RSDP -> XSDT ->
// FADT (-> DSDT), MADT. Pure: build() takes the VM's shape and returns the bytes to
// place at ACPI_START and the RSDP's address. test/acpi decodes every table with iasl.
import { KilnError } from '../errors.js';
import {
  pciIntxGsi,
  SLEEP_CONTROL_S5,
  SLP_EN,
  SLP_TYP_S5,
  ACPI_RESET_VALUE,
  ACPI_START,
  IOAPIC_START,
  IRQ_COM1,
  IRQ_GED,
  IRQ_VMGENID,
  VMGENID_ADDR,
  IRQ_RTC,
  LAPIC_START,
  PORT_ACPI_RESET,
  PORT_ACPI_SLEEP_CONTROL,
  PORT_ACPI_SLEEP_STATUS,
  PORT_COM1,
  PORT_COM_SIZE,
  PCI_ECAM_SIZE,
  PCI_ECAM_START,
  PCI_MMIO_SIZE,
  PCI_MMIO_START,
  PORT_PCI_CONFIG_ADDRESS,
  PORT_PCI_CONFIG_SIZE,
  PORT_RTC,
  PORT_RTC_SIZE,
} from '../layout.js';
export { SLEEP_CONTROL_S5, SLP_EN, SLP_TYP_S5 };
import * as aml from './aml.js';
import {
  acpi_madt_interrupt_override,
  acpi_madt_io_apic,
  acpi_madt_local_apic,
  acpi_madt_local_apic_nmi,
  acpi_mcfg_allocation,
  acpi_table_fadt,
  acpi_table_header,
  acpi_table_madt,
  acpi_table_mcfg,
  acpi_table_rsdp,
} from './structs.js';
import type { StructType, Value } from '../kvm/struct.js';

export const OEM_ID = 'KILN  ';
const CREATOR_ID = 'KILN';
const HEADER_SIZE = acpi_table_header.size;
const ascii = (s: string) => new TextEncoder().encode(s);

/** One struct's bytes with `fields` written (the rest zero). */
function encoded(type: StructType, fields: { readonly [field: string]: Value | undefined }): Uint8Array {
  const out = new Uint8Array(type.size);
  type.encode(new DataView(out.buffer), 0, fields);
  return out;
}

function checksum(table: Uint8Array, from = 0, to = table.length): number {
  let sum = 0;
  for (let i = from; i < to; i++) sum = (sum + table[i]!) & 0xff;
  return (0x100 - sum) & 0xff;
}

/** A table: the standard header (signature, length, revision, checksum, OEM ids) and a body. */
function table(signature: string, revision: number, oemTableId: string, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + body.length);
  acpi_table_header.encode(new DataView(out.buffer), 0, {
    signature: ascii(signature),
    length: out.length,
    revision,
    oem_id: ascii(OEM_ID),
    oem_table_id: ascii(oemTableId.padEnd(8, ' ')),
    oem_revision: 1,
    asl_compiler_id: ascii(CREATOR_ID),
    asl_compiler_revision: 1,
  });
  out.set(body, HEADER_SIZE);
  out[acpi_table_header.offsetOf('checksum')] = checksum(out);
  return out;
}

const ACPI_ADR_SPACE_SYSTEM_IO = 1;
const ACPI_ACCESS_BYTE = 1;

/** A Generic Address Structure in system I/O space. */
function gasIo(port: number, bits: number): { readonly [field: string]: Value } {
  return {
    space_id: ACPI_ADR_SPACE_SYSTEM_IO,
    bit_width: bits,
    bit_offset: 0,
    access_width: ACPI_ACCESS_BYTE,
    address: BigInt(port),
  };
}

// FADT (5.2.9), revision 6.
const FADT_FLAG_RESET_REG_SUP = 1 << 10;
const FADT_FLAG_HW_REDUCED_ACPI = 1 << 20;
const IAPC_BOOT_ARCH_8042 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2;
const FADT_MINOR_VERSION = 5;

function fadt(dsdtAddr: number): Uint8Array {
  const fields = encoded(acpi_table_fadt, {
    dsdt: dsdtAddr,
    boot_flags: IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT,
    flags: FADT_FLAG_HW_REDUCED_ACPI | FADT_FLAG_RESET_REG_SUP,
    reset_register: gasIo(PORT_ACPI_RESET, 8),
    reset_value: ACPI_RESET_VALUE,
    minor_revision: FADT_MINOR_VERSION,
    Xdsdt: BigInt(dsdtAddr),
    sleep_control: gasIo(PORT_ACPI_SLEEP_CONTROL, 8),
    sleep_status: gasIo(PORT_ACPI_SLEEP_STATUS, 8),
  });
  // The hypervisor vendor identity, "KILNKVM\0", read as a little-endian u64.
  fields.set(ascii('KILNKVM\0'), acpi_table_fadt.offsetOf('hypervisor_id'));
  return table('FACP', 6, 'KILNFACP', fields.subarray(HEADER_SIZE));
}

// MADT (5.2.12).
const MADT_PCAT_COMPAT = 1;
const MADT_LOCAL_APIC = 0;
const MADT_IO_APIC = 1;
const MADT_INTERRUPT_OVERRIDE = 2;
const MADT_LOCAL_APIC_NMI = 4;
const LOCAL_APIC_ENABLED = 1;
/** xAPIC ids are 8 bits and 0xff is broadcast. */
export const MAX_MADT_VCPUS = 254;

function madt(vcpus: number): Uint8Array {
  if (vcpus > MAX_MADT_VCPUS) throw new KilnError(`ACPI MADT: at most ${MAX_MADT_VCPUS} vCPUs (got ${vcpus})`);
  const sub = (type: StructType, kind: number, fields: { readonly [field: string]: Value }) =>
    encoded(type, { type: kind, length: type.size, ...fields });
  const parts: Uint8Array[] = [
    encoded(acpi_table_madt, { address: LAPIC_START, flags: MADT_PCAT_COMPAT }).subarray(HEADER_SIZE),
  ];
  for (let i = 0; i < vcpus; i++)
    parts.push(sub(acpi_madt_local_apic, MADT_LOCAL_APIC, { processor_id: i, id: i, lapic_flags: LOCAL_APIC_ENABLED }));
  parts.push(sub(acpi_madt_io_apic, MADT_IO_APIC, { id: 0, address: IOAPIC_START, global_irq_base: 0 }));
  // ISA IRQ 0 (PIT) arrives on GSI 2; COM1's IRQ 4 needs an explicit entry on a
  // hardware-reduced platform or Linux leaves the port without an interrupt.
  parts.push(
    sub(acpi_madt_interrupt_override, MADT_INTERRUPT_OVERRIDE, { bus: 0, source_irq: 0, global_irq: 2, inti_flags: 0 }),
  );
  parts.push(
    sub(acpi_madt_interrupt_override, MADT_INTERRUPT_OVERRIDE, {
      bus: 0,
      source_irq: IRQ_COM1,
      global_irq: IRQ_COM1,
      inti_flags: 0,
    }),
  );
  // All processors (0xff): LINT1 is the NMI.
  parts.push(sub(acpi_madt_local_apic_nmi, MADT_LOCAL_APIC_NMI, { processor_id: 0xff, inti_flags: 0, lint: 1 }));
  return table('APIC', 5, 'KILNMADT', Buffer.concat(parts));
}

/** PCI I/O port window: above the legacy ISA range, below the top of the 16-bit space. */
export const PCI_IO_START = 0x1000;
export const PCI_IO_END = 0xffff;

/**
 * _PRT (ACPI 6.4, 6.2.13): every slot's INTA-INTD straight to IOAPIC GSIs (no link
 * devices), swizzled so neighbouring slots spread over the PCI_INTX_GSIS lines.
 */
function pciRoutingTable(): Uint8Array {
  const entries: Uint8Array[] = [];
  for (let slot = 1; slot < 32; slot++) {
    for (let pin = 0; pin < 4; pin++) {
      entries.push(
        aml.packageOf([
          aml.integer(slot * 0x10000 + 0xffff),
          aml.integer(pin),
          aml.integer(0),
          aml.integer(pciIntxGsi(slot, pin)),
        ]),
      );
    }
  }
  return aml.packageOf(entries);
}

/** The PCI host bridge (bus 0, ports 0xcf8-0xcff, I/O and memory windows) and ECAM's reservation. */
function pciHostBridge(): Uint8Array[] {
  return [
    aml.device('PCI0', [
      aml.name('_HID', aml.eisaId('PNP0A08')),
      aml.name('_CID', aml.eisaId('PNP0A03')),
      aml.name('_SEG', aml.integer(0)),
      aml.name('_BBN', aml.integer(0)),
      aml.name('_UID', aml.integer(0)),
      aml.name(
        '_CRS',
        aml.resourceTemplate([
          aml.wordBusNumber(0, 0),
          aml.ioPort(PORT_PCI_CONFIG_ADDRESS, PORT_PCI_CONFIG_SIZE),
          aml.dwordIo(PCI_IO_START, PCI_IO_END),
          aml.dwordMemory(PCI_MMIO_START, PCI_MMIO_START + PCI_MMIO_SIZE - 1),
        ]),
      ),
      aml.name('_PRT', pciRoutingTable()),
    ]),
    // Linux trusts an MCFG area only if firmware also reserves it.
    aml.device('RES0', [
      aml.name('_HID', aml.eisaId('PNP0C02')),
      aml.name('_CRS', aml.resourceTemplate([aml.memory32Fixed(PCI_ECAM_START, PCI_ECAM_SIZE)])),
    ]),
  ];
}

/** MCFG (PCI Firmware 3.2, 4.1.2): ECAM for segment 0, bus 0. */
function mcfg(): Uint8Array {
  const allocation = encoded(acpi_mcfg_allocation, {
    address: BigInt(PCI_ECAM_START),
    pci_segment: 0,
    start_bus_number: 0,
    end_bus_number: PCI_ECAM_SIZE / (1 << 20) - 1,
  });
  return table('MCFG', 1, 'KILNMCFG', Buffer.concat([new Uint8Array(acpi_table_mcfg.size - HEADER_SIZE), allocation]));
}

/** The DSDT's AML: COM1, the RTC, the power button and its GED, one ACPI0007 per vCPU, _S5. */
export function dsdtAml(vcpus: number, pci = false): Uint8Array {
  const hid = (id: string) => aml.name('_HID', aml.eisaId(id));
  const uid = (n: number) => aml.name('_UID', aml.integer(n));
  const sb = aml.scope('\\_SB', [
    aml.device('COM1', [
      hid('PNP0501'),
      uid(1),
      aml.name('_CRS', aml.resourceTemplate([aml.ioPort(PORT_COM1, PORT_COM_SIZE), aml.irqNoFlags(IRQ_COM1)])),
    ]),
    aml.device('RTC', [
      hid('PNP0B00'),
      aml.name('_CRS', aml.resourceTemplate([aml.ioPort(PORT_RTC, PORT_RTC_SIZE), aml.irqNoFlags(IRQ_RTC)])),
    ]),
    aml.device('PWRB', [hid('PNP0C0C'), uid(0)]),
    // The VM generation ID (Microsoft's "Virtual Machine Generation ID" spec, as Linux's
    // vmgenid driver reads it): ADDR is the 16-byte ID's address, low and high 32 bits.
    aml.device('VGEN', [
      aml.name('_HID', aml.string('VMGENCTR')),
      aml.name('_CID', aml.string('VM_Gen_Counter')),
      aml.name('_DDN', aml.string('VM_Gen_Counter')),
      aml.name('ADDR', aml.packageOf([aml.integer(VMGENID_ADDR), aml.integer(0)])),
    ]),
    aml.device('GED', [
      aml.name('_HID', aml.string('ACPI0013')),
      uid(0),
      aml.name('_CRS', aml.resourceTemplate([aml.extendedInterrupt(IRQ_GED), aml.extendedInterrupt(IRQ_VMGENID)])),
      // Linux calls _EVT with the GSI that fired: the power button, or a new generation ID.
      aml.method('_EVT', 1, [
        aml.ifThen(aml.lEqual(aml.arg0, aml.integer(IRQ_GED)), [aml.notify('\\_SB.PWRB', 0x80)]),
        aml.ifThen(aml.lEqual(aml.arg0, aml.integer(IRQ_VMGENID)), [aml.notify('\\_SB.VGEN', 0x80)]),
      ]),
    ]),
    ...Array.from({ length: vcpus }, (_, i) =>
      aml.device(`C${i.toString(16).toUpperCase().padStart(3, '0')}`, [
        aml.name('_HID', aml.string('ACPI0007')),
        uid(i),
      ]),
    ),
    ...(pci ? pciHostBridge() : []),
  ]);
  const s5 = aml.name('_S5', aml.packageOf([aml.integer(SLP_TYP_S5), aml.integer(0)]));
  return aml.amlConcat([sb, s5]);
}

export interface AcpiTables {
  /** Bytes to place at `base`. */
  readonly base: number;
  readonly bytes: Uint8Array;
  readonly rsdp: number;
  /** Each table's guest address, by signature. */
  readonly addresses: Readonly<Record<string, number>>;
}

const align = (n: number, a: number) => Math.ceil(n / a) * a;

/** The VM's shape as ACPI describes it; `pci` adds the host bridge and MCFG. */
/** Tables already built, by shape: they depend on nothing else. */
const built = new Map<string, AcpiTables>();

/** The ACPI tables of a VM of `shape` (built once per shape a process; the result is not to be changed). */
export function buildAcpiTables(shape: { vcpus: number; pci?: boolean }): AcpiTables {
  const key = `${shape.vcpus}:${shape.pci ?? false}`;
  let tables = built.get(key);
  if (!tables) {
    tables = makeAcpiTables(shape);
    built.set(key, tables);
  }
  return tables;
}

function makeAcpiTables(shape: { vcpus: number; pci?: boolean }): AcpiTables {
  const base = ACPI_START;
  const rsdpSize = acpi_table_rsdp.size;
  const dsdtAddr = base + align(rsdpSize, 16);
  const dsdt = table('DSDT', 6, 'KILNDSDT', dsdtAml(shape.vcpus, shape.pci ?? false));
  const fadtAddr = align(dsdtAddr + dsdt.length, 16);
  const fadtTable = fadt(dsdtAddr);
  const madtAddr = align(fadtAddr + fadtTable.length, 16);
  const madtTable = madt(shape.vcpus);
  const mcfgAddr = align(madtAddr + madtTable.length, 16);
  const mcfgTable = shape.pci ? mcfg() : new Uint8Array(0);
  const xsdtAddr = align(mcfgAddr + mcfgTable.length, 16);
  const entries = shape.pci ? [fadtAddr, madtAddr, mcfgAddr] : [fadtAddr, madtAddr];
  const xsdtBody = new Uint8Array(entries.length * 8);
  entries.forEach((a, i) => new DataView(xsdtBody.buffer).setBigUint64(i * 8, BigInt(a), true));
  const xsdt = table('XSDT', 1, 'KILNXSDT', xsdtBody);
  const end = xsdtAddr + xsdt.length;
  if (end > VMGENID_ADDR)
    throw new KilnError(`the ACPI tables need ${end - base} bytes; the ACPI area holds ${VMGENID_ADDR - base}`);

  // RSDP (5.2.5), revision 2.
  const rsdp = encoded(acpi_table_rsdp, {
    signature: ascii('RSD PTR '),
    oem_id: ascii(OEM_ID),
    revision: 2,
    length: rsdpSize,
    xsdt_physical_address: BigInt(xsdtAddr),
  });
  // The first checksum covers the ACPI 1.0 part (up to `length`), the extended one all of it.
  rsdp[acpi_table_rsdp.offsetOf('checksum')] = checksum(rsdp, 0, acpi_table_rsdp.offsetOf('length'));
  rsdp[acpi_table_rsdp.offsetOf('extended_checksum')] = checksum(rsdp);

  const bytes = new Uint8Array(end - base);
  const place = (addr: number, t: Uint8Array) => bytes.set(t, addr - base);
  place(base, rsdp);
  place(dsdtAddr, dsdt);
  place(fadtAddr, fadtTable);
  place(madtAddr, madtTable);
  place(mcfgAddr, mcfgTable);
  place(xsdtAddr, xsdt);
  return {
    base,
    bytes,
    rsdp: base,
    addresses: {
      RSDP: base,
      DSDT: dsdtAddr,
      FACP: fadtAddr,
      APIC: madtAddr,
      XSDT: xsdtAddr,
      ...(shape.pci ? { MCFG: mcfgAddr } : {}),
    },
  };
}
