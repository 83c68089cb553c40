// The Linux x86 boot protocol's structures (Documentation/arch/x86/boot.rst,
// <asm/bootparam.h>) and PVH's start info (xen/include/public/arch-x86/hvm/start_info.h).
// boot_params and setup_header are checked against the host's <asm/bootparam.h> by
// test/kvm/structs.test.ts; PVH's structs are fixed by the Xen ABI (sizes asserted there).
import { array, packedStruct, struct } from '../kvm/struct.js';

export const setup_header = packedStruct('setup_header', [
  ['setup_sects', 'u8'],
  ['root_flags', 'u16'],
  ['syssize', 'u32'],
  ['ram_size', 'u16'],
  ['vid_mode', 'u16'],
  ['root_dev', 'u16'],
  ['boot_flag', 'u16'],
  ['jump', 'u16'],
  ['header', 'u32'],
  ['version', 'u16'],
  ['realmode_swtch', 'u32'],
  ['start_sys_seg', 'u16'],
  ['kernel_version', 'u16'],
  ['type_of_loader', 'u8'],
  ['loadflags', 'u8'],
  ['setup_move_size', 'u16'],
  ['code32_start', 'u32'],
  ['ramdisk_image', 'u32'],
  ['ramdisk_size', 'u32'],
  ['bootsect_kludge', 'u32'],
  ['heap_end_ptr', 'u16'],
  ['ext_loader_ver', 'u8'],
  ['ext_loader_type', 'u8'],
  ['cmd_line_ptr', 'u32'],
  ['initrd_addr_max', 'u32'],
  ['kernel_alignment', 'u32'],
  ['relocatable_kernel', 'u8'],
  ['min_alignment', 'u8'],
  ['xloadflags', 'u16'],
  ['cmdline_size', 'u32'],
  ['hardware_subarch', 'u32'],
  ['hardware_subarch_data', 'u64'],
  ['payload_offset', 'u32'],
  ['payload_length', 'u32'],
  ['setup_data', 'u64'],
  ['pref_address', 'u64'],
  ['init_size', 'u32'],
  ['handover_offset', 'u32'],
  ['kernel_info_offset', 'u32'],
]);

export const boot_e820_entry = packedStruct('boot_e820_entry', [
  ['addr', 'u64'],
  ['size', 'u64'],
  ['type', 'u32'],
]);

/** E820_MAX_ENTRIES_ZEROPAGE */
export const E820_MAX_ENTRIES = 128;

/** The zero page. Sub-structures Kiln never fills are declared as bytes of their size. */
export const boot_params = packedStruct('boot_params', [
  ['screen_info', array('u8', 0x40)],
  ['apm_bios_info', array('u8', 0x14)],
  ['_pad2', array('u8', 4)],
  ['tboot_addr', 'u64'],
  ['ist_info', array('u8', 0x10)],
  ['acpi_rsdp_addr', 'u64'],
  ['_pad3', array('u8', 8)],
  ['hd0_info', array('u8', 16)],
  ['hd1_info', array('u8', 16)],
  ['sys_desc_table', array('u8', 0x10)],
  ['olpc_ofw_header', array('u8', 0x10)],
  ['ext_ramdisk_image', 'u32'],
  ['ext_ramdisk_size', 'u32'],
  ['ext_cmd_line_ptr', 'u32'],
  ['_pad4', array('u8', 112)],
  ['cc_blob_address', 'u32'],
  ['edid_info', array('u8', 0x80)],
  ['efi_info', array('u8', 0x20)],
  ['alt_mem_k', 'u32'],
  ['scratch', 'u32'],
  ['e820_entries', 'u8'],
  ['eddbuf_entries', 'u8'],
  ['edd_mbr_sig_buf_entries', 'u8'],
  ['kbd_status', 'u8'],
  ['secure_boot', 'u8'],
  ['_pad5', array('u8', 2)],
  ['sentinel', 'u8'],
  ['_pad6', array('u8', 1)],
  ['hdr', setup_header],
  ['_pad7', array('u8', 0x290 - 0x1f1 - setup_header.size)],
  ['edd_mbr_sig_buffer', array('u32', 16)],
  ['e820_table', array(boot_e820_entry, E820_MAX_ENTRIES)],
  ['_pad8', array('u8', 48)],
  ['eddbuf', array('u8', 6 * 82)],
  ['_pad9', array('u8', 276)],
]);

// PVH (Xen's hvm_start_info, version 1).
export const XEN_HVM_START_MAGIC_VALUE = 0x336ec578;

export const hvm_start_info = struct('hvm_start_info', [
  ['magic', 'u32'],
  ['version', 'u32'],
  ['flags', 'u32'],
  ['nr_modules', 'u32'],
  ['modlist_paddr', 'u64'],
  ['cmdline_paddr', 'u64'],
  ['rsdp_paddr', 'u64'],
  ['memmap_paddr', 'u64'],
  ['memmap_entries', 'u32'],
  ['reserved', 'u32'],
]);

export const hvm_modlist_entry = struct('hvm_modlist_entry', [
  ['paddr', 'u64'],
  ['size', 'u64'],
  ['cmdline_paddr', 'u64'],
  ['reserved', 'u64'],
]);

export const hvm_memmap_table_entry = struct('hvm_memmap_table_entry', [
  ['addr', 'u64'],
  ['size', 'u64'],
  ['type', 'u32'],
  ['reserved', 'u32'],
]);
