// The smallest Linux-shaped kernel a VMM boots: an ELF vmlinux whose PVH entry (32-bit
// protected mode, flat) runs a few instructions. The launch benchmark and the pool tests
// boot it to reach a guest's first instruction without a real kernel; a waiting kiln-vmm
// builds a VM around it in its rehearsal (rehearsal.ts).

// mov dx,0x3f8; mov al,'K'; out dx,al: 'K' on the serial console.
export const SAY_K = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4b, 0xee];
// mov al,0xfe; out 0x64,al: the i8042 reset (the VMM ends); hlt; jmp back.
export const THEN_EXIT = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
// cli; hlt; jmp back: idle for good, its vCPU asleep in KVM.
export const THEN_IDLE = [0xfa, 0xf4, 0xeb, 0xfd];

/** A minimal vmlinux: one PT_LOAD of `code` at 1 MiB and the Xen PVH entry note pointing at it. */
export function pvhKernel(code: readonly number[]): Uint8Array {
  const paddr = 0x10_0000;
  const image = new Uint8Array(0x1000 + code.length + 20);
  const dv = new DataView(image.buffer);
  image.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0);
  dv.setUint16(16, 2, true); // ET_EXEC
  dv.setUint16(18, 62, true); // EM_X86_64
  dv.setBigUint64(24, BigInt(paddr), true);
  dv.setBigUint64(32, 64n, true); // e_phoff
  dv.setUint16(54, 56, true);
  dv.setUint16(56, 2, true);
  const ph = (i: number, type: number, off: number, at: number, size: number) => {
    const p = 64 + i * 56;
    dv.setUint32(p, type, true);
    dv.setBigUint64(p + 8, BigInt(off), true);
    dv.setBigUint64(p + 16, BigInt(at), true);
    dv.setBigUint64(p + 24, BigInt(at), true);
    dv.setBigUint64(p + 32, BigInt(size), true);
    dv.setBigUint64(p + 40, BigInt(size), true);
  };
  const noteAt = 0x1000 + code.length;
  ph(0, 1, 0x1000, paddr, code.length);
  ph(1, 4, noteAt, 0, 20);
  image.set(code, 0x1000);
  dv.setUint32(noteAt, 4, true); // namesz
  dv.setUint32(noteAt + 4, 4, true); // descsz
  dv.setUint32(noteAt + 8, 18, true); // XEN_ELFNOTE_PHYS32_ENTRY
  image.set([0x58, 0x65, 0x6e, 0], noteAt + 12); // "Xen\0"
  dv.setUint32(noteAt + 16, paddr, true);
  return image;
}
