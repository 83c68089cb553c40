// The guest physical memory map and every fixed address or port Kiln uses.
// Nothing else in Kiln names a guest address as a literal.

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const PAGE_SIZE = 4 * KiB;

// ---- RAM and the 32-bit hole ----
/** RAM starts at guest-physical 0. */
export const RAM_START = 0;
/**
 * RAM below 4 GiB stops here; [MMIO_HOLE_START, 4 GiB) holds device MMIO, the
 * LAPIC/IOAPIC and the firmware area, and RAM beyond it continues at HIGH_RAM_START.
 */
export const MMIO_HOLE_START = 3 * GiB;
export const MMIO_HOLE_END = 4 * GiB;
export const HIGH_RAM_START = 4 * GiB;

// ---- Linux boot (loaders in src/boot/) ----
/** Conventional memory ends here; the EBDA and legacy ROM area follow. */
export const LOW_RAM_END = 0xa_0000;
/** Boot GDT and IDT for the 64-bit Linux entry. */
export const BOOT_GDT = 0x500;
export const BOOT_IDT = 0x520;
/** PVH hvm_start_info, its module list and its memory map. */
export const PVH_START_INFO = 0x6000;
export const PVH_MODLIST = 0x6040;
export const PVH_MEMMAP = 0x6080;
/** The zero page (struct boot_params). */
export const ZERO_PAGE = 0x7000;
/** Identity page tables for the 64-bit Linux entry: PML4, PDPT, one PD of 2 MiB pages (1 GiB). */
export const BOOT_PML4 = 0x9000;
export const BOOT_PDPT = 0xa000;
export const BOOT_PD = 0xb000;
/** Kernel command line; the kernel's own limit (setup header cmdline_size) is usually 2047. */
export const CMDLINE_START = 0x2_0000;
export const CMDLINE_MAX = 0x1_0000;
/** The ACPI tables: RSDP first, then everything it points to, up to the end of the BIOS area. */
export const ACPI_START = 0xe_0000;
export const ACPI_END = 0x10_0000;
/**
 * The VM generation ID (ACPI "VMGENCTR"): 16 bytes at the top of the reserved ACPI area,
 * a new random value at every boot and every restore (snapshots).
 */
export const VMGENID_ADDR = 0xf_f000;
export const VMGENID_SIZE = 16;
/** Where the protected-mode kernel is loaded (bzImage) and the lowest address any kernel may use. */
export const HIMEM_START = 0x10_0000;
/** A bzImage's 64-bit entry point, relative to where its protected-mode code is loaded. */
export const BZIMAGE_64BIT_ENTRY_OFFSET = 0x200;

// ---- PCI ----
/** 32-bit BAR window for PCI devices. */
export const PCI_MMIO_START = 0xc000_0000;
export const PCI_MMIO_SIZE = 0x1000_0000;
/** PCI Express enhanced configuration (ECAM) for bus 0: 1 MiB (32 devices x 8 functions x 4 KiB). */
export const PCI_ECAM_START = 0xe000_0000;
export const PCI_ECAM_SIZE = 0x10_0000;
/** Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc-0xcff. */
export const PORT_PCI_CONFIG_ADDRESS = 0xcf8;
export const PORT_PCI_CONFIG_SIZE = 8;

// ---- Platform MMIO inside the hole ----
/** Kiln's own platform devices (test device, later virtio-mmio) live in this window. */
export const PLATFORM_MMIO_START = 0xd000_0000;
export const PLATFORM_MMIO_SIZE = 0x0100_0000;
/** The MMIO test device of the guest kit: a scratch register file and access recorder. */
export const TEST_DEVICE_MMIO_BASE = PLATFORM_MMIO_START;
export const TEST_DEVICE_MMIO_SIZE = 0x1000;
/** debug-exit on MMIO, for 64-bit ring-3 test guests (software KVM refuses their port I/O). */
export const DEBUG_EXIT_MMIO_BASE = PLATFORM_MMIO_START + 0x1000;
export const DEBUG_EXIT_MMIO_SIZE = 4;
export const IOAPIC_START = 0xfec0_0000;
export const LAPIC_START = 0xfee0_0000;
/** KVM needs three pages for the real-mode TSS on Intel; Firecracker and kvmtool use this. */
export const KVM_TSS_ADDRESS = 0xfffb_d000;

// ---- I/O ports ----
export const PORT_COM1 = 0x3f8;
export const PORT_COM_SIZE = 8;
/**
 * Boot-progress port: test guests and a test init write progress codes here; the
 * VMM records the last value and the count (see devices/progress.ts).
 */
export const PORT_PROGRESS = 0x80;
export const PORT_PROGRESS_SIZE = 4;
/**
 * Guest-requested exit, like QEMU's isa-debug-exit: a write of N ends the VM with exit
 * status N. Used by test guests and the demo; a Linux guest powers off through ACPI instead.
 */
/** Firecracker's boot timer (--boot-timer): the guest writes 123 here once booted. */
export const PORT_BOOT_TIMER = 0x3f0;
export const PORT_BOOT_TIMER_SIZE = 1;
export const PORT_DEBUG_EXIT = 0x501;
export const PORT_DEBUG_EXIT_SIZE = 4;
/** ACPI (hardware-reduced) sleep control, sleep status and reset registers (FADT). */
export const PORT_ACPI_SLEEP_CONTROL = 0x600;
export const PORT_ACPI_SLEEP_STATUS = 0x601;
export const PORT_ACPI_RESET = 0x602;
export const PORT_ACPI_PM_SIZE = 3;
/** The value the FADT tells the guest to write to the reset register. */
export const ACPI_RESET_VALUE = 0x01;
/** The i8042 keyboard controller: data and status/command ports (reset via command 0xFE). */
export const PORT_I8042_DATA = 0x60;
export const PORT_I8042_COMMAND = 0x64;
/** CMOS RTC index and data ports. */
export const PORT_RTC = 0x70;
export const PORT_RTC_SIZE = 2;

// ---- Interrupts (GSIs on the IOAPIC; ISA IRQs map 1:1 but for the PIT's 0 -> 2) ----
export const IRQ_COM1 = 4;
export const IRQ_RTC = 8;
/** The Generic Event Device's interrupt: it delivers the ACPI power button. */
export const IRQ_GED = 10;
/** The GED interrupt that tells the guest its VM generation ID changed (a restore). */
export const IRQ_VMGENID = 11;
export const IOAPIC_PINS = 24;
/** PCI INTx lines: slot S, pin P (0 = INTA) uses GSI PCI_INTX_GSI_BASE + (S + P) % PCI_INTX_GSIS (the _PRT says so). */
export const PCI_INTX_GSI_BASE = 16;
export const PCI_INTX_GSIS = 8;

/** The port I/O test device of the guest kit (echo and access recorder). */
export const PORT_TEST_DEVICE = 0x510;
export const PORT_TEST_DEVICE_SIZE = 16;

// ---- Test-guest kit (guest/modes.ts): fixed structures in low RAM ----
export const KIT_GDT = 0x1000;
export const KIT_IDT = 0x2000;
export const KIT_TSS = 0x3000;
/** Identity page tables for long mode: PML4, one PDPT, four page directories of 2 MiB pages. */
export const KIT_PML4 = 0x8000;
export const KIT_PDPT = 0x9000;
export const KIT_PD = 0xa000;
/** How much the kit's page tables identity-map (the whole 32-bit space, MMIO hole included). */
export const KIT_IDENTITY_MAP_SIZE = 4 * GiB;
/** Where kit guest code is loaded and entered. */
export const KIT_CODE = 0x10000;
/** Top of the ring-3 stack and of the ring-0 stack (TSS.RSP0). */
export const KIT_USER_STACK_TOP = 0x80000;
export const KIT_KERNEL_STACK_TOP = 0x90000;
/** A data area kit guests use for results the host reads back. */
export const KIT_DATA = 0x100000;
/** Free RAM from here on is the kit drivers' heap: virtqueues and buffers. */
export const KIT_HEAP = 0x200000;
/** Smallest RAM the kit needs: code, stacks, tables and the data page. */
export const KIT_MIN_MEMORY = 2 * MiB;

// ---- ACPI sleep control (FADT sleep control register, ACPI 6.4 4.8.3.11) ----
/** The _S5 sleep type; the guest writes (SLP_TYP << 2) | SLP_EN to the sleep control register. */
export const SLP_TYP_S5 = 5;
export const SLP_EN = 1 << 5;
export const SLEEP_CONTROL_S5 = (SLP_TYP_S5 << 2) | SLP_EN;

/** The GSI a PCI function's INTx pin reaches, as the DSDT's _PRT tells the guest. */
export function pciIntxGsi(slot: number, pin = 0): number {
  return PCI_INTX_GSI_BASE + ((slot + pin) % PCI_INTX_GSIS);
}
