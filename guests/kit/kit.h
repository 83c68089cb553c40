/* The guest kit for freestanding C test guests (64-bit, ring 3, identity-mapped).
 * Every address comes from Kiln's layout through -D definitions (src/guest/asm.ts). */
#ifndef KIT_H
#define KIT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;

#define barrier() __asm__ __volatile__("mfence" ::: "memory")

static inline u8 rd8(u64 a) { return *(volatile u8 *)(uptr)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)(uptr)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)(uptr)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)(uptr)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)(uptr)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)(uptr)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)(uptr)a = v; }
static inline void wr64(u64 a, u64 v) { *(volatile u64 *)(uptr)a = v; }

/* Results for the host: 64-bit slots at KIT_DATA. */
#define RESULT(i) (((volatile u64 *)(uptr)KIT_DATA)[i])

/* Ends the VM with exit status `code` (debug-exit on MMIO). */
static inline __attribute__((noreturn)) void kit_exit(int code) {
  wr8(DEBUG_EXIT_MMIO_BASE, (u8)code);
  for (;;) __asm__ __volatile__("pause");
}

static inline void *kit_memset(void *d, int c, u64 n) {
  u8 *p = d;
  while (n--) *p++ = (u8)c;
  return d;
}
static inline void kit_memcpy(void *d, const void *s, u64 n) {
  u8 *p = d;
  const u8 *q = s;
  while (n--) *p++ = *q++;
}

/* Bump allocator over KIT_HEAP: page-aligned blocks that stay zeroed. */
static u64 kit_heap_next = KIT_HEAP;
static inline u64 kit_alloc(u64 bytes) {
  u64 at = (kit_heap_next + 4095) & ~4095ULL;
  kit_heap_next = at + bytes;
  kit_memset((void *)(uptr)at, 0, bytes);
  return at;
}

/* PCI configuration space through ECAM (bus 0, function 0). */
static inline u64 ecam(int slot, int reg) { return (u64)PCI_ECAM_START + ((u64)slot << 15) + (u64)reg; }
static inline u32 pci_rd32(int slot, int reg) { return rd32(ecam(slot, reg)); }
static inline u16 pci_rd16(int slot, int reg) { return rd16(ecam(slot, reg)); }
static inline u8 pci_rd8(int slot, int reg) { return rd8(ecam(slot, reg)); }
static inline void pci_wr16(int slot, int reg, u16 v) { wr16(ecam(slot, reg), v); }
static inline void pci_wr32(int slot, int reg, u32 v) { wr32(ecam(slot, reg), v); }

/* The local APIC (xAPIC MMIO): software-enable it, and see which vectors are pending.
 * Ring-3 code runs with interrupts off, so a delivered MSI stays in the IRR where the
 * test can see it, with no interrupt handler (and no emulated ring-0 code) involved. */
#define LAPIC_SVR 0xf0
#define LAPIC_IRR 0x200
static inline void lapic_enable(void) { wr32(LAPIC_START + LAPIC_SVR, 0x1ff); }
static inline int lapic_pending(int vector) {
  return (rd32(LAPIC_START + LAPIC_IRR + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}
/* Spins until `vector` is pending or `spins` polls pass; returns whether it arrived. */
static inline int lapic_wait(int vector, long spins) {
  while (spins-- > 0)
    if (lapic_pending(vector)) return 1;
  return 0;
}

#endif
