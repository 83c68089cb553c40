// Linux kernel loaders. loadKernel() is pure: it validates the kernel, initrd and
// command line against the guest's RAM, and returns every byte to write into guest
// memory plus the vCPU's entry state. Nothing touches guest memory until every check
// has passed (applyBootImage).
//
// - ELF vmlinux with a Xen PVH note: entered in 32-bit protected mode at the note's
//   address, paging off, %ebx = hvm_start_info (as Cloud Hypervisor does).
// - ELF vmlinux without the note: entered at e_entry in 64-bit mode, %rsi = zero page.
// - bzImage (boot protocol 2.12+, 64-bit capable): protected-mode code loaded at 1 MiB,
//   entered at +0x200 in 64-bit mode with identity paging, %rsi = zero page (as
//   Firecracker and crosvm do).
import { KilnError } from '../errors.js';
import { dataView } from '../kvm/struct.js';
import {
  BZIMAGE_64BIT_ENTRY_OFFSET,
  CMDLINE_MAX,
  CMDLINE_START,
  HIMEM_START,
  PAGE_SIZE,
  PVH_MEMMAP,
  PVH_MODLIST,
  PVH_START_INFO,
  ZERO_PAGE,
} from '../layout.js';
import { buildE820, mergeRam, type E820Entry, type RamRange } from './e820.js';
import { isElf, KernelImageError, parseElfKernel } from './elf.js';
import {
  boot_e820_entry,
  boot_params,
  E820_MAX_ENTRIES,
  hvm_memmap_table_entry,
  hvm_modlist_entry,
  hvm_start_info,
  setup_header,
  XEN_HVM_START_MAGIC_VALUE,
} from './structs.js';

export { KernelImageError } from './elf.js';

export type BootEntry =
  /** 32-bit protected mode, paging off, flat segments; %ebx = hvm_start_info. */
  | { readonly mode: 'pvh32'; readonly rip: number; readonly rbx: number }
  /** 64-bit mode with identity paging; %rsi = zero page. */
  | { readonly mode: 'linux64'; readonly rip: number; readonly rsi: number };

export interface BootImage {
  readonly format: 'pvh' | 'elf64' | 'bzimage';
  readonly writes: ReadonlyArray<{ readonly gpa: number; readonly bytes: Uint8Array }>;
  readonly entry: BootEntry;
  readonly e820: readonly E820Entry[];
  readonly initrd: { readonly gpa: number; readonly size: number } | null;
  /** Boot protocol version of a bzImage (e.g. 0x20f), else null. */
  readonly protocol: number | null;
  /** End of the kernel's .text, for an ELF kernel with section headers. */
  readonly textEnd: { readonly vaddr: bigint; readonly paddr: number } | null;
}

export interface BootRequest {
  readonly kernel: Uint8Array;
  readonly initrd?: Uint8Array;
  readonly cmdline: string;
  readonly ram: readonly RamRange[];
  /** Guest-physical address of the ACPI RSDP, if the VM has ACPI. */
  readonly rsdp?: number;
}

// Setup header constants (Documentation/arch/x86/boot.rst).
const SETUP_HEADER_OFFSET = 0x1f1;
const HDRS_MAGIC = 0x53726448; // "HdrS"
const BOOT_FLAG = 0xaa55;
const MIN_BZIMAGE_PROTOCOL = 0x20c; // 2.12: xloadflags and the 64-bit entry
const XLF_KERNEL_64 = 1 << 0;
const LOADFLAGS_LOADED_HIGH = 1 << 0;
const LOADFLAGS_CAN_USE_HEAP = 1 << 7;
const TYPE_OF_LOADER_UNDEFINED = 0xff;
/** x86's COMMAND_LINE_SIZE, for kernels that do not state their own limit (PVH, ELF). */
const DEFAULT_CMDLINE_SIZE = 2048;
const DEFAULT_INITRD_ADDR_MAX = 0x37ff_ffff;

const hex = (n: number) => `0x${n.toString(16)}`;
const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
const alignUp = (n: number, a: number) => Math.ceil(n / a) * a;
const alignDown = (n: number, a: number) => Math.floor(n / a) * a;

function encodeCmdline(cmdline: string, limit: number): Uint8Array {
  const bytes = new TextEncoder().encode(cmdline);
  // The limit counts the terminating NUL.
  if (bytes.length + 1 > Math.min(limit, CMDLINE_MAX)) {
    throw new KilnError(
      `the kernel command line is ${bytes.length} bytes; this kernel accepts at most ${Math.min(limit, CMDLINE_MAX) - 1}`,
    );
  }
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** The contiguous RAM starting at 0, where the kernel, initrd and boot data must fit. */
function lowRamTop(ram: readonly RamRange[]): number {
  const first = mergeRam(ram)[0];
  if (!first || first.guestPhysAddr !== 0) throw new KilnError('guest RAM must start at address 0');
  return first.guestPhysAddr + first.size;
}

/** Places the initrd as high as allowed, page-aligned, above the kernel. */
function placeInitrd(initrd: Uint8Array, kernelEnd: number, top: number): number {
  const gpa = alignDown(top - initrd.length, PAGE_SIZE);
  if (initrd.length > top || gpa < alignUp(kernelEnd, PAGE_SIZE)) {
    throw new KilnError(
      `the initrd (${mib(initrd.length)}) does not fit in guest memory: ${mib(Math.max(0, top - alignUp(kernelEnd, PAGE_SIZE)))} is free between the kernel and ${hex(top)}`,
    );
  }
  return gpa;
}

function zeroPage(e820: readonly E820Entry[], fill: (bp: DataView) => void): Uint8Array {
  if (e820.length > E820_MAX_ENTRIES)
    throw new KilnError(`the memory map has ${e820.length} entries; the zero page holds ${E820_MAX_ENTRIES}`);
  const page = new Uint8Array(boot_params.size);
  const dv = dataView(page);
  fill(dv);
  boot_params.encode(dv, 0, { e820_entries: e820.length });
  const table = boot_params.offsetOf('e820_table');
  e820.forEach((e, i) =>
    boot_e820_entry.encode(dv, table + i * boot_e820_entry.size, {
      addr: BigInt(e.addr),
      size: BigInt(e.size),
      type: e.type,
    }),
  );
  return page;
}

function loadElf(req: BootRequest, top: number): BootImage {
  const elf = parseElfKernel(req.kernel);
  const writes: Array<{ gpa: number; bytes: Uint8Array }> = [];
  let kernelEnd = 0;
  for (const seg of elf.segments) {
    if (seg.paddr < HIMEM_START || seg.paddr + seg.memSize > top) {
      throw new KilnError(
        `the kernel (segment at ${hex(seg.paddr)}, ${mib(seg.memSize)}) does not fit in ${mib(top)} of guest memory`,
      );
    }
    const bytes = new Uint8Array(seg.memSize);
    bytes.set(req.kernel.subarray(seg.fileOffset, seg.fileOffset + seg.fileSize));
    writes.push({ gpa: seg.paddr, bytes });
    kernelEnd = Math.max(kernelEnd, seg.paddr + seg.memSize);
  }
  const cmdline = encodeCmdline(req.cmdline, DEFAULT_CMDLINE_SIZE);
  writes.push({ gpa: CMDLINE_START, bytes: cmdline });
  const initrdGpa = req.initrd ? placeInitrd(req.initrd, kernelEnd, Math.min(top, DEFAULT_INITRD_ADDR_MAX + 1)) : null;
  if (req.initrd && initrdGpa !== null) writes.push({ gpa: initrdGpa, bytes: req.initrd });
  const e820 = buildE820(req.ram);
  const initrd = req.initrd && initrdGpa !== null ? { gpa: initrdGpa, size: req.initrd.length } : null;

  if (elf.pvhEntry !== null) {
    const info = new Uint8Array(hvm_start_info.size);
    hvm_start_info.encode(dataView(info), 0, {
      magic: XEN_HVM_START_MAGIC_VALUE,
      version: 1,
      nr_modules: initrd ? 1 : 0,
      modlist_paddr: BigInt(initrd ? PVH_MODLIST : 0),
      cmdline_paddr: BigInt(CMDLINE_START),
      rsdp_paddr: BigInt(req.rsdp ?? 0),
      memmap_paddr: BigInt(PVH_MEMMAP),
      memmap_entries: e820.length,
    });
    writes.push({ gpa: PVH_START_INFO, bytes: info });
    if (initrd) {
      const mod = new Uint8Array(hvm_modlist_entry.size);
      hvm_modlist_entry.encode(dataView(mod), 0, { paddr: BigInt(initrd.gpa), size: BigInt(initrd.size) });
      writes.push({ gpa: PVH_MODLIST, bytes: mod });
    }
    const memmap = new Uint8Array(e820.length * hvm_memmap_table_entry.size);
    e820.forEach((e, i) =>
      hvm_memmap_table_entry.encode(dataView(memmap), i * hvm_memmap_table_entry.size, {
        addr: BigInt(e.addr),
        size: BigInt(e.size),
        type: e.type,
      }),
    );
    writes.push({ gpa: PVH_MEMMAP, bytes: memmap });
    return {
      format: 'pvh',
      writes,
      entry: { mode: 'pvh32', rip: elf.pvhEntry, rbx: PVH_START_INFO },
      e820,
      initrd,
      protocol: null,
      textEnd: elf.textEnd,
    };
  }

  const page = zeroPage(e820, (bp) => {
    boot_params.encode(bp, 0, { acpi_rsdp_addr: BigInt(req.rsdp ?? 0) });
    const hdr = boot_params.offsetOf('hdr');
    setup_header.encode(bp, hdr, {
      boot_flag: BOOT_FLAG,
      header: HDRS_MAGIC,
      type_of_loader: TYPE_OF_LOADER_UNDEFINED,
      cmd_line_ptr: CMDLINE_START,
      cmdline_size: cmdline.length,
      ramdisk_image: initrd?.gpa ?? 0,
      ramdisk_size: initrd?.size ?? 0,
      kernel_alignment: 0x100_0000,
    });
  });
  writes.push({ gpa: ZERO_PAGE, bytes: page });
  return {
    format: 'elf64',
    writes,
    entry: { mode: 'linux64', rip: elf.entry, rsi: ZERO_PAGE },
    e820,
    initrd,
    protocol: null,
    textEnd: elf.textEnd,
  };
}

function loadBzImage(req: BootRequest, top: number): BootImage {
  const image = req.kernel;
  const dv = dataView(image);
  const hdrAt = SETUP_HEADER_OFFSET;
  if (image.length < hdrAt + setup_header.size)
    throw new KernelImageError(`the bzImage is truncated: ${image.length} bytes is less than its setup header`);
  const hdr = setup_header.decode(dv, hdrAt);
  const protocol = Number(hdr.version);
  if (protocol < MIN_BZIMAGE_PROTOCOL || !(Number(hdr.xloadflags) & XLF_KERNEL_64)) {
    throw new KernelImageError(
      `the bzImage speaks boot protocol ${protocol >> 8}.${(protocol & 0xff).toString().padStart(2, '0')} without a 64-bit entry; Kiln needs 2.12 or later`,
    );
  }
  if (!(Number(hdr.loadflags) & LOADFLAGS_LOADED_HIGH))
    throw new KernelImageError('the bzImage is a zImage (not loaded high); Kiln boots bzImages only');
  const setupSects = Number(hdr.setup_sects) || 4;
  const setupBytes = (setupSects + 1) * 512;
  const kernelBytes = Number(hdr.syssize) * 16;
  if (image.length < setupBytes + kernelBytes) {
    throw new KernelImageError(
      `the bzImage is truncated: its header promises ${setupBytes + kernelBytes} bytes, the file has ${image.length}`,
    );
  }
  const protectedMode = image.subarray(setupBytes);
  const loadAt = HIMEM_START;
  // The kernel decompresses in place and needs init_size bytes from its load address.
  const footprint = Math.max(Number(hdr.init_size), protectedMode.length);
  if (loadAt + footprint > top)
    throw new KilnError(
      `the kernel needs ${mib(footprint)} from ${hex(loadAt)}; the guest has ${mib(top)} of low memory`,
    );
  const cmdline = encodeCmdline(req.cmdline, Number(hdr.cmdline_size) || DEFAULT_CMDLINE_SIZE);
  const initrdMax = Math.min(top, (Number(hdr.initrd_addr_max) || DEFAULT_INITRD_ADDR_MAX) + 1);
  const initrdGpa = req.initrd ? placeInitrd(req.initrd, loadAt + footprint, initrdMax) : null;
  const initrd = req.initrd && initrdGpa !== null ? { gpa: initrdGpa, size: req.initrd.length } : null;
  const e820 = buildE820(req.ram);
  const page = zeroPage(e820, (bp) => {
    // The setup header is copied from the image as the boot protocol asks, then amended.
    new Uint8Array(bp.buffer, bp.byteOffset + boot_params.offsetOf('hdr'), setup_header.size).set(
      image.subarray(hdrAt, hdrAt + setup_header.size),
    );
    boot_params.encode(bp, 0, { acpi_rsdp_addr: BigInt(req.rsdp ?? 0) });
    setup_header.encode(bp, boot_params.offsetOf('hdr'), {
      type_of_loader: TYPE_OF_LOADER_UNDEFINED,
      loadflags: Number(hdr.loadflags) | LOADFLAGS_CAN_USE_HEAP,
      cmd_line_ptr: CMDLINE_START,
      ramdisk_image: initrd?.gpa ?? 0,
      ramdisk_size: initrd?.size ?? 0,
      code32_start: loadAt,
    });
  });
  const writes = [
    { gpa: loadAt, bytes: protectedMode },
    { gpa: CMDLINE_START, bytes: cmdline },
    { gpa: ZERO_PAGE, bytes: page },
    ...(req.initrd && initrd ? [{ gpa: initrd.gpa, bytes: req.initrd }] : []),
  ];
  return {
    format: 'bzimage',
    writes,
    entry: { mode: 'linux64', rip: loadAt + BZIMAGE_64BIT_ENTRY_OFFSET, rsi: ZERO_PAGE },
    e820,
    initrd,
    protocol,
    textEnd: null,
  };
}

/** How many bytes from a kernel image's start kernelFormatOf needs. */
export const KERNEL_HEADER_BYTES = 0x206;

/**
 * The format a kernel image's first KERNEL_HEADER_BYTES say it is (an ELF vmlinux or a
 * bzImage), or null: what Firecracker checks when the boot source is PUT.
 */
export function kernelFormatOf(head: Uint8Array): 'elf' | 'bzimage' | null {
  if (isElf(head)) return 'elf';
  if (head.length >= KERNEL_HEADER_BYTES && dataView(head).getUint32(0x202, true) === HDRS_MAGIC) return 'bzimage';
  return null;
}

/** Recognises the kernel's format and lays out everything the boot needs. */
export function loadKernel(req: BootRequest): BootImage {
  const top = lowRamTop(req.ram);
  if (isElf(req.kernel)) return loadElf(req, top);
  const dv = dataView(req.kernel);
  if (req.kernel.length >= 0x206 && dv.getUint32(0x202, true) === HDRS_MAGIC) return loadBzImage(req, top);
  throw new KernelImageError(
    'this is not a Linux kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no "HdrS" setup header)',
  );
}
