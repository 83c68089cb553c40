// The binary layouts of ACPI's fixed tables (ACPI 6.5, chapter 5), declared once with
// the struct codec, with ACPICA's field names (actbl.h, actbl1.h). All are packed, as
// ACPICA declares them. The bytes are checked by decoding them with iasl (test/acpi).
import { array, packedStruct } from '../kvm/struct.js';

/** 5.2.6: the header every table but the RSDP starts with. */
export const acpi_table_header = packedStruct('acpi_table_header', [
  ['signature', array('u8', 4)],
  ['length', 'u32'],
  ['revision', 'u8'],
  ['checksum', 'u8'],
  ['oem_id', array('u8', 6)],
  ['oem_table_id', array('u8', 8)],
  ['oem_revision', 'u32'],
  ['asl_compiler_id', array('u8', 4)],
  ['asl_compiler_revision', 'u32'],
]);

/** 5.2.3.2: Generic Address Structure. */
export const acpi_generic_address = packedStruct('acpi_generic_address', [
  ['space_id', 'u8'],
  ['bit_width', 'u8'],
  ['bit_offset', 'u8'],
  ['access_width', 'u8'],
  ['address', 'u64'],
]);

/** 5.2.5.3: the RSDP, revision 2. */
export const acpi_table_rsdp = packedStruct('acpi_table_rsdp', [
  ['signature', array('u8', 8)],
  ['checksum', 'u8'],
  ['oem_id', array('u8', 6)],
  ['revision', 'u8'],
  ['rsdt_physical_address', 'u32'],
  ['length', 'u32'],
  ['xsdt_physical_address', 'u64'],
  ['extended_checksum', 'u8'],
  ['reserved', array('u8', 3)],
]);

/** 5.2.9: the FADT, revision 6 (276 bytes). */
export const acpi_table_fadt = packedStruct('acpi_table_fadt', [
  ['header', acpi_table_header],
  ['facs', 'u32'],
  ['dsdt', 'u32'],
  ['model', 'u8'],
  ['preferred_profile', 'u8'],
  ['sci_interrupt', 'u16'],
  ['smi_command', 'u32'],
  ['acpi_enable', 'u8'],
  ['acpi_disable', 'u8'],
  ['s4_bios_request', 'u8'],
  ['pstate_control', 'u8'],
  ['pm1a_event_block', 'u32'],
  ['pm1b_event_block', 'u32'],
  ['pm1a_control_block', 'u32'],
  ['pm1b_control_block', 'u32'],
  ['pm2_control_block', 'u32'],
  ['pm_timer_block', 'u32'],
  ['gpe0_block', 'u32'],
  ['gpe1_block', 'u32'],
  ['pm1_event_length', 'u8'],
  ['pm1_control_length', 'u8'],
  ['pm2_control_length', 'u8'],
  ['pm_timer_length', 'u8'],
  ['gpe0_block_length', 'u8'],
  ['gpe1_block_length', 'u8'],
  ['gpe1_base', 'u8'],
  ['cst_control', 'u8'],
  ['c2_latency', 'u16'],
  ['c3_latency', 'u16'],
  ['flush_size', 'u16'],
  ['flush_stride', 'u16'],
  ['duty_offset', 'u8'],
  ['duty_width', 'u8'],
  ['day_alarm', 'u8'],
  ['month_alarm', 'u8'],
  ['century', 'u8'],
  ['boot_flags', 'u16'],
  ['reserved', 'u8'],
  ['flags', 'u32'],
  ['reset_register', acpi_generic_address],
  ['reset_value', 'u8'],
  ['arm_boot_flags', 'u16'],
  ['minor_revision', 'u8'],
  ['Xfacs', 'u64'],
  ['Xdsdt', 'u64'],
  ['xpm1a_event_block', acpi_generic_address],
  ['xpm1b_event_block', acpi_generic_address],
  ['xpm1a_control_block', acpi_generic_address],
  ['xpm1b_control_block', acpi_generic_address],
  ['xpm2_control_block', acpi_generic_address],
  ['xpm_timer_block', acpi_generic_address],
  ['xgpe0_block', acpi_generic_address],
  ['xgpe1_block', acpi_generic_address],
  ['sleep_control', acpi_generic_address],
  ['sleep_status', acpi_generic_address],
  ['hypervisor_id', 'u64'],
]);

/** 5.2.12: the MADT's fixed part, and the subtables Kiln writes. */
export const acpi_table_madt = packedStruct('acpi_table_madt', [
  ['header', acpi_table_header],
  ['address', 'u32'],
  ['flags', 'u32'],
]);
export const acpi_madt_local_apic = packedStruct('acpi_madt_local_apic', [
  ['type', 'u8'],
  ['length', 'u8'],
  ['processor_id', 'u8'],
  ['id', 'u8'],
  ['lapic_flags', 'u32'],
]);
export const acpi_madt_io_apic = packedStruct('acpi_madt_io_apic', [
  ['type', 'u8'],
  ['length', 'u8'],
  ['id', 'u8'],
  ['reserved', 'u8'],
  ['address', 'u32'],
  ['global_irq_base', 'u32'],
]);
export const acpi_madt_interrupt_override = packedStruct('acpi_madt_interrupt_override', [
  ['type', 'u8'],
  ['length', 'u8'],
  ['bus', 'u8'],
  ['source_irq', 'u8'],
  ['global_irq', 'u32'],
  ['inti_flags', 'u16'],
]);
export const acpi_madt_local_apic_nmi = packedStruct('acpi_madt_local_apic_nmi', [
  ['type', 'u8'],
  ['length', 'u8'],
  ['processor_id', 'u8'],
  ['inti_flags', 'u16'],
  ['lint', 'u8'],
]);

/** PCI Firmware 3.2, 4.1.2: MCFG and its one allocation entry. */
export const acpi_table_mcfg = packedStruct('acpi_table_mcfg', [
  ['header', acpi_table_header],
  ['reserved', array('u8', 8)],
]);
export const acpi_mcfg_allocation = packedStruct('acpi_mcfg_allocation', [
  ['address', 'u64'],
  ['pci_segment', 'u16'],
  ['start_bus_number', 'u8'],
  ['end_bus_number', 'u8'],
  ['reserved', 'u32'],
]);
