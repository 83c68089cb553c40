// The kernel loaders, on synthetic images built here byte by byte from the ELF and
// Linux boot-protocol specifications.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { decompressBzImage } from '../../src/boot/decompress.js';
import { buildE820, E820_RAM, E820_RESERVED } from '../../src/boot/e820.js';
import { loadKernel, type BootImage } from '../../src/boot/loader.js';
import {
  boot_params,
  hvm_memmap_table_entry,
  hvm_modlist_entry,
  hvm_start_info,
  setup_header,
  XEN_HVM_START_MAGIC_VALUE,
} from '../../src/boot/structs.js';
import { dataView } from '../../src/kvm/struct.js';
import {
  ACPI_START,
  CMDLINE_START,
  GiB,
  HIGH_RAM_START,
  HIMEM_START,
  MiB,
  MMIO_HOLE_START,
  PVH_MEMMAP,
  PVH_MODLIST,
  PVH_START_INFO,
  ZERO_PAGE,
} from '../../src/layout.js';
import { ramRanges } from '../../src/memory/guest-memory.js';

const ram = ramRanges(64 * MiB);

/** A minimal ELF64 vmlinux: one PT_LOAD of `code` at `paddr`, optionally a Xen PVH note. */
function elfKernel(opts: { paddr: number; code: Uint8Array; pvhEntry?: number; memExtra?: number }): Uint8Array {
  const note = new Uint8Array(opts.pvhEntry === undefined ? 0 : 20);
  if (opts.pvhEntry !== undefined) {
    const n = new DataView(note.buffer);
    n.setUint32(0, 4, true); // namesz
    n.setUint32(4, 4, true); // descsz
    n.setUint32(8, 18, true); // XEN_ELFNOTE_PHYS32_ENTRY
    note.set(new TextEncoder().encode('Xen\0'), 12);
    n.setUint32(16, opts.pvhEntry, true);
  }
  const phnum = opts.pvhEntry === undefined ? 1 : 2;
  const phoff = 64;
  const codeOff = 0x1000;
  const noteOff = codeOff + opts.code.length;
  const image = new Uint8Array(noteOff + note.length);
  const dv = new DataView(image.buffer);
  image.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0);
  dv.setUint16(16, 2, true); // ET_EXEC
  dv.setUint16(18, 62, true); // EM_X86_64
  dv.setBigUint64(24, BigInt(opts.paddr), true); // e_entry
  dv.setBigUint64(32, BigInt(phoff), true);
  dv.setUint16(54, 56, true);
  dv.setUint16(56, phnum, true);
  const ph = (i: number, type: number, off: number, paddr: number, filesz: number, memsz: number) => {
    const at = phoff + i * 56;
    dv.setUint32(at, type, true);
    dv.setBigUint64(at + 8, BigInt(off), true);
    dv.setBigUint64(at + 16, 0xffffffff80000000n + BigInt(paddr), true);
    dv.setBigUint64(at + 24, BigInt(paddr), true);
    dv.setBigUint64(at + 32, BigInt(filesz), true);
    dv.setBigUint64(at + 40, BigInt(memsz), true);
  };
  ph(0, 1, codeOff, opts.paddr, opts.code.length, opts.code.length + (opts.memExtra ?? 0));
  if (opts.pvhEntry !== undefined) ph(1, 4, noteOff, 0, note.length, note.length);
  image.set(opts.code, codeOff);
  image.set(note, noteOff);
  return image;
}

/** A minimal bzImage: setup sectors with a setup header, then `payload` as the protected-mode part. */
function bzImage(opts: {
  payload: Uint8Array;
  version?: number;
  xloadflags?: number;
  cmdlineSize?: number;
  initSize?: number;
}): Uint8Array {
  const setupSects = 4;
  const image = new Uint8Array((setupSects + 1) * 512 + opts.payload.length);
  const dv = dataView(image);
  setup_header.encode(dv, 0x1f1, {
    setup_sects: setupSects,
    syssize: Math.ceil(opts.payload.length / 16),
    boot_flag: 0xaa55,
    header: 0x53726448,
    version: opts.version ?? 0x20f,
    loadflags: 1,
    initrd_addr_max: 0x7fffffff,
    kernel_alignment: 0x200000,
    relocatable_kernel: 1,
    xloadflags: opts.xloadflags ?? 1,
    cmdline_size: opts.cmdlineSize ?? 2047,
    init_size: opts.initSize ?? 4 * MiB,
  });
  image.set(opts.payload, (setupSects + 1) * 512);
  return image;
}

const writeAt = (img: BootImage, gpa: number) => img.writes.find((w) => w.gpa === gpa)?.bytes;

test('e820: low RAM, the legacy area and the MMIO hole reserved, RAM from 1 MiB and above 4 GiB', () => {
  assert.deepEqual(buildE820(ramRanges(5 * GiB)), [
    { addr: 0, size: 0xa0000, type: E820_RAM },
    { addr: ACPI_START, size: HIMEM_START - ACPI_START, type: E820_RESERVED },
    { addr: HIMEM_START, size: MMIO_HOLE_START - HIMEM_START, type: E820_RAM },
    { addr: MMIO_HOLE_START, size: HIGH_RAM_START - MMIO_HOLE_START, type: E820_RESERVED },
    { addr: HIGH_RAM_START, size: 2 * GiB, type: E820_RAM },
  ]);
});

test('ELF with a Xen PVH note: 32-bit entry, hvm_start_info with cmdline, initrd module, memmap, RSDP', () => {
  const code = Uint8Array.from({ length: 0x3000 }, (_, i) => i & 0xff);
  const initrd = new Uint8Array(0x2345).fill(0xab);
  const img = loadKernel({
    kernel: elfKernel({ paddr: 0x100_0000, code, pvhEntry: 0x100_0400, memExtra: 0x1000 }),
    initrd,
    cmdline: 'console=ttyS0',
    ram,
    rsdp: ACPI_START,
  });
  assert.equal(img.format, 'pvh');
  assert.deepEqual(img.entry, { mode: 'pvh32', rip: 0x100_0400, rbx: PVH_START_INFO });
  const seg = writeAt(img, 0x100_0000)!;
  assert.equal(seg.length, 0x4000, 'memsz, with the bss zero-filled');
  assert.deepEqual([...seg.subarray(0, 4)], [0, 1, 2, 3]);
  assert.equal(seg[0x3fff], 0);
  assert.equal(new TextDecoder().decode(writeAt(img, CMDLINE_START)), 'console=ttyS0\0');
  const info = hvm_start_info.decode(dataView(writeAt(img, PVH_START_INFO)!));
  assert.equal(info.magic, XEN_HVM_START_MAGIC_VALUE);
  assert.equal(info.version, 1);
  assert.equal(info.nr_modules, 1);
  assert.equal(info.cmdline_paddr, BigInt(CMDLINE_START));
  assert.equal(info.rsdp_paddr, BigInt(ACPI_START));
  assert.equal(info.memmap_paddr, BigInt(PVH_MEMMAP));
  assert.equal(info.memmap_entries, img.e820.length);
  const mod = hvm_modlist_entry.decode(dataView(writeAt(img, PVH_MODLIST)!));
  assert.equal(mod.size, BigInt(initrd.length));
  assert.equal(Number(mod.paddr) % 4096, 0);
  assert.ok(Number(mod.paddr) + initrd.length <= 64 * MiB, 'initrd inside RAM');
  assert.ok(Number(mod.paddr) >= 0x100_4000, 'initrd above the kernel');
  const memmap = writeAt(img, PVH_MEMMAP)!;
  const first = hvm_memmap_table_entry.decode(dataView(memmap));
  assert.deepEqual([first.addr, first.size, first.type], [0n, 0xa0000n, 1]);
  assert.equal(memmap.length, img.e820.length * hvm_memmap_table_entry.size);
});

test('ELF without the note: 64-bit entry at e_entry with a zero page', () => {
  const img = loadKernel({
    kernel: elfKernel({ paddr: 0x100_0000, code: new Uint8Array(0x100) }),
    cmdline: 'quiet',
    ram,
  });
  assert.equal(img.format, 'elf64');
  assert.deepEqual(img.entry, { mode: 'linux64', rip: 0x100_0000, rsi: ZERO_PAGE });
  const bp = dataView(writeAt(img, ZERO_PAGE)!);
  const hdr = setup_header.decode(bp, boot_params.offsetOf('hdr'));
  assert.equal(hdr.type_of_loader, 0xff);
  assert.equal(hdr.cmd_line_ptr, CMDLINE_START);
  assert.equal(hdr.header, 0x53726448);
  assert.equal(boot_params.decode(bp).e820_entries, img.e820.length);
});

test('bzImage: protected-mode code at 1 MiB, 64-bit entry at +0x200, setup header copied and amended', () => {
  const payload = Uint8Array.from({ length: 0x1000 }, (_, i) => (i * 7) & 0xff);
  const initrd = new Uint8Array(0x1000).fill(1);
  const img = loadKernel({ kernel: bzImage({ payload }), initrd, cmdline: 'root=/dev/vda', ram, rsdp: ACPI_START });
  assert.equal(img.format, 'bzimage');
  assert.equal(img.protocol, 0x20f);
  assert.deepEqual(img.entry, { mode: 'linux64', rip: HIMEM_START + 0x200, rsi: ZERO_PAGE });
  assert.deepEqual(writeAt(img, HIMEM_START)!.subarray(0, payload.length), payload);
  const bp = dataView(writeAt(img, ZERO_PAGE)!);
  const params = boot_params.decode(bp);
  const hdr = setup_header.decode(bp, boot_params.offsetOf('hdr'));
  assert.equal(params.acpi_rsdp_addr, BigInt(ACPI_START));
  assert.equal(hdr.type_of_loader, 0xff);
  assert.equal(hdr.version, 0x20f, 'copied from the image');
  assert.equal(hdr.cmd_line_ptr, CMDLINE_START);
  assert.equal(hdr.ramdisk_size, initrd.length);
  assert.equal(hdr.ramdisk_image, img.initrd!.gpa);
  assert.ok(img.initrd!.gpa >= HIMEM_START + 4 * MiB, "initrd beyond the kernel's init_size");
  assert.equal(Number(hdr.loadflags) & 0x80, 0x80, 'CAN_USE_HEAP');
});

test('bad kernels, initrds and command lines are refused with one clear line each', () => {
  assert.throws(
    () => loadKernel({ kernel: new Uint8Array(4096).fill(0x90), cmdline: '', ram }),
    /not a Linux kernel: neither an ELF vmlinux nor a bzImage/,
  );
  const good = bzImage({ payload: new Uint8Array(0x1000) });
  assert.throws(
    () => loadKernel({ kernel: good.subarray(0, good.length - 100), cmdline: '', ram }),
    /bzImage is truncated: its header promises/,
  );
  assert.throws(
    () => loadKernel({ kernel: bzImage({ payload: new Uint8Array(16), version: 0x20a }), cmdline: '', ram }),
    /boot protocol 2\.10 without a 64-bit entry; Kiln needs 2\.12/,
  );
  assert.throws(
    () => loadKernel({ kernel: bzImage({ payload: new Uint8Array(16), xloadflags: 0 }), cmdline: '', ram }),
    /without a 64-bit entry/,
  );
  assert.throws(
    () => loadKernel({ kernel: bzImage({ payload: new Uint8Array(16), initSize: 100 * MiB }), cmdline: '', ram }),
    /the kernel needs 100\.0 MiB from 0x100000; the guest has 64\.0 MiB/,
  );
  assert.throws(
    () =>
      loadKernel({ kernel: bzImage({ payload: new Uint8Array(16), cmdlineSize: 16 }), cmdline: 'x'.repeat(16), ram }),
    /command line is 16 bytes; this kernel accepts at most 15/,
  );
  assert.throws(
    () => loadKernel({ kernel: good, cmdline: '', initrd: new Uint8Array(62 * MiB), ram }),
    /the initrd \(62\.0 MiB\) does not fit in guest memory/,
  );
  const elf = elfKernel({ paddr: 0x100_0000, code: new Uint8Array(0x1000) });
  assert.throws(
    () => loadKernel({ kernel: elf.subarray(0, 0x1800), cmdline: '', ram }),
    /kernel ELF image is truncated: segment 0 ends at byte 8192/,
  );
  assert.throws(
    () =>
      loadKernel({
        kernel: elfKernel({ paddr: 0x100_0000, code: new Uint8Array(16), memExtra: 64 * MiB }),
        cmdline: '',
        ram,
      }),
    /does not fit in 64\.0 MiB of guest memory/,
  );
  assert.throws(() => loadKernel({ kernel: elf, cmdline: 'y'.repeat(2048), ram }), /accepts at most 2047/);
});

test('host decompression finds a bzImage payload, gzip or xz (with the appended size), and boots the ELF inside', () => {
  const elf = elfKernel({ paddr: 0x100_0000, code: new Uint8Array(0x800).fill(0x90), pvhEntry: 0x100_0000 });
  const withPayload = (payload: Uint8Array) => {
    const head = new Uint8Array(0x100);
    const image = bzImage({ payload: new Uint8Array([...head, ...payload]) });
    setup_header.encode(dataView(image), 0x1f1, { payload_offset: head.length, payload_length: payload.length });
    return image;
  };
  const size = new Uint8Array(4);
  new DataView(size.buffer).setUint32(0, elf.length, true);
  const gz = withPayload(new Uint8Array(gzipSync(elf)));
  const xz = withPayload(new Uint8Array([...execFileSync('xz', ['-c', '--check=crc32'], { input: elf }), ...size]));
  for (const [image, format] of [
    [gz, 'gzip'],
    [xz, 'xz'],
  ] as const) {
    const out = decompressBzImage(image);
    assert.equal(out.format, format);
    assert.deepEqual(out.elf, elf);
    assert.equal(loadKernel({ kernel: out.elf, cmdline: '', ram }).format, 'pvh');
  }
  assert.throws(
    () => decompressBzImage(withPayload(Uint8Array.of(1, 2, 3, 4, 5))),
    /compressed in a format Kiln does not know \(magic 01 02 03 04\)/,
  );
  assert.throws(() => decompressBzImage(elf), /only a bzImage can be decompressed/);
});
