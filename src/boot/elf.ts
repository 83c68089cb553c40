// Reading a vmlinux ELF64 image: its PT_LOAD segments and the Xen PVH entry note.
import { KilnError } from '../errors.js';
import { array, struct } from '../kvm/struct.js';

// <elf.h>'s 64-bit headers, declared once (checked against the host's <elf.h> by a test).
export const Elf64_Ehdr = struct('Elf64_Ehdr', [
  ['e_ident', array('u8', 16)],
  ['e_type', 'u16'],
  ['e_machine', 'u16'],
  ['e_version', 'u32'],
  ['e_entry', 'u64'],
  ['e_phoff', 'u64'],
  ['e_shoff', 'u64'],
  ['e_flags', 'u32'],
  ['e_ehsize', 'u16'],
  ['e_phentsize', 'u16'],
  ['e_phnum', 'u16'],
  ['e_shentsize', 'u16'],
  ['e_shnum', 'u16'],
  ['e_shstrndx', 'u16'],
]);
export const Elf64_Phdr = struct('Elf64_Phdr', [
  ['p_type', 'u32'],
  ['p_flags', 'u32'],
  ['p_offset', 'u64'],
  ['p_vaddr', 'u64'],
  ['p_paddr', 'u64'],
  ['p_filesz', 'u64'],
  ['p_memsz', 'u64'],
  ['p_align', 'u64'],
]);
export const Elf64_Shdr = struct('Elf64_Shdr', [
  ['sh_name', 'u32'],
  ['sh_type', 'u32'],
  ['sh_flags', 'u64'],
  ['sh_addr', 'u64'],
  ['sh_offset', 'u64'],
  ['sh_size', 'u64'],
  ['sh_link', 'u32'],
  ['sh_info', 'u32'],
  ['sh_addralign', 'u64'],
  ['sh_entsize', 'u64'],
]);
export const Elf64_Nhdr = struct('Elf64_Nhdr', [
  ['n_namesz', 'u32'],
  ['n_descsz', 'u32'],
  ['n_type', 'u32'],
]);
const EI_CLASS = 4;
const EI_DATA = 5;
const EH = (field: string) => Elf64_Ehdr.offsetOf(field);
const PH = (field: string) => Elf64_Phdr.offsetOf(field);
const SH = (field: string) => Elf64_Shdr.offsetOf(field);
const NH = (field: string) => Elf64_Nhdr.offsetOf(field);

export class KernelImageError extends KilnError {
  override readonly name: string = 'KernelImageError';
}

const ELF_MAGIC = 0x464c457f; // "\x7fELF", little-endian
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const EM_X86_64 = 62;
const PT_LOAD = 1;
const PT_NOTE = 4;
/** Xen's ELF note carrying the 32-bit PVH entry point (xen/include/public/elfnote.h). */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

export interface ElfSegment {
  /** Kernel virtual addresses exceed 2^53: kept exact as BigInt. */
  readonly vaddr: bigint;
  readonly paddr: number;
  readonly fileOffset: number;
  readonly fileSize: number;
  readonly memSize: number;
}

export interface ElfKernel {
  readonly entry: number;
  readonly pvhEntry: number | null;
  readonly segments: readonly ElfSegment[];
  /**
   * The end of the kernel's .text (virtual and physical), from the section headers:
   * the bytes from there to the end of its page are mapped, executable and unused.
   */
  readonly textEnd: { readonly vaddr: bigint; readonly paddr: number } | null;
}

export function isElf(image: Uint8Array): boolean {
  return (
    image.length >= 4 && new DataView(image.buffer, image.byteOffset, image.byteLength).getUint32(0, true) === ELF_MAGIC
  );
}

export function parseElfKernel(image: Uint8Array): ElfKernel {
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const need = (end: number, what: string) => {
    if (end > image.length)
      throw new KernelImageError(
        `the kernel ELF image is truncated: ${what} ends at byte ${end}, the file has ${image.length}`,
      );
  };
  need(Elf64_Ehdr.size, 'the ELF header');
  if (dv.getUint8(EI_CLASS) !== ELFCLASS64 || dv.getUint8(EI_DATA) !== ELFDATA2LSB)
    throw new KernelImageError('the kernel is an ELF file but not 64-bit little-endian');
  if (dv.getUint16(EH('e_machine'), true) !== EM_X86_64)
    throw new KernelImageError(
      `the kernel is an ELF file for machine ${dv.getUint16(EH('e_machine'), true)}, not x86-64`,
    );
  const u64 = (at: number) => Number(dv.getBigUint64(at, true));
  const entry = u64(EH('e_entry'));
  const phoff = u64(EH('e_phoff'));
  const phentsize = dv.getUint16(EH('e_phentsize'), true);
  const phnum = dv.getUint16(EH('e_phnum'), true);
  if (phnum === 0 || phentsize < Elf64_Phdr.size)
    throw new KernelImageError('the kernel ELF image has no program headers');
  need(phoff + phnum * phentsize, 'the program headers');
  const segments: ElfSegment[] = [];
  let pvhEntry: number | null = null;
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    const type = dv.getUint32(ph + PH('p_type'), true);
    const fileOffset = u64(ph + PH('p_offset'));
    const vaddr = dv.getBigUint64(ph + PH('p_vaddr'), true);
    const paddr = u64(ph + PH('p_paddr'));
    const fileSize = u64(ph + PH('p_filesz'));
    const memSize = u64(ph + PH('p_memsz'));
    if (type === PT_LOAD) {
      need(fileOffset + fileSize, `segment ${i}`);
      if (memSize < fileSize) throw new KernelImageError(`ELF segment ${i} is smaller in memory than in the file`);
      segments.push({ vaddr, paddr, fileOffset, fileSize, memSize });
    } else if (type === PT_NOTE) {
      need(fileOffset + fileSize, `note segment ${i}`);
      pvhEntry ??= findPvhNote(dv, fileOffset, fileSize);
    }
  }
  if (segments.length === 0)
    throw new KernelImageError('the kernel ELF image has nothing to load (no PT_LOAD segment)');
  return { entry, pvhEntry, segments, textEnd: findTextEnd(dv, segments) };
}

/** The end of section ".text", mapped to a physical address through the PT_LOAD segments. */
function findTextEnd(dv: DataView, segments: readonly ElfSegment[]): { vaddr: bigint; paddr: number } | null {
  const u64 = (at: number) => Number(dv.getBigUint64(at, true));
  const shoff = u64(EH('e_shoff'));
  const shentsize = dv.getUint16(EH('e_shentsize'), true);
  const shnum = dv.getUint16(EH('e_shnum'), true);
  const shstrndx = dv.getUint16(EH('e_shstrndx'), true);
  if (shoff === 0 || shentsize < Elf64_Shdr.size || shstrndx >= shnum || shoff + shnum * shentsize > dv.byteLength)
    return null;
  const strtab = u64(shoff + shstrndx * shentsize + SH('sh_offset'));
  const name = (offset: number) => {
    let s = '';
    for (let at = strtab + offset; at < dv.byteLength && dv.getUint8(at) !== 0 && s.length < 32; at++)
      s += String.fromCharCode(dv.getUint8(at));
    return s;
  };
  for (let i = 0; i < shnum; i++) {
    const sh = shoff + i * shentsize;
    if (name(dv.getUint32(sh + SH('sh_name'), true)) !== '.text') continue;
    const vaddr = dv.getBigUint64(sh + SH('sh_addr'), true) + dv.getBigUint64(sh + SH('sh_size'), true);
    const seg = segments.find((s) => vaddr > s.vaddr && vaddr <= s.vaddr + BigInt(s.memSize));
    return seg ? { vaddr, paddr: seg.paddr + Number(vaddr - seg.vaddr) } : null;
  }
  return null;
}

function findPvhNote(dv: DataView, start: number, size: number): number | null {
  const align4 = (n: number) => (n + 3) & ~3;
  for (let at = start; at + Elf64_Nhdr.size <= start + size;) {
    const namesz = dv.getUint32(at + NH('n_namesz'), true);
    const descsz = dv.getUint32(at + NH('n_descsz'), true);
    const type = dv.getUint32(at + NH('n_type'), true);
    const name = at + Elf64_Nhdr.size;
    const desc = name + align4(namesz);
    if (desc + descsz > start + size) return null;
    const isXen = namesz === 4 && dv.getUint32(name, true) === 0x006e6558; // "Xen\0"
    if (isXen && type === XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4) return dv.getUint32(desc, true);
    at = desc + align4(descsz);
  }
  return null;
}
