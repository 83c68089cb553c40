/* A small virtio 1.2 driver for kit guests: modern virtio-pci (4.1) and split
 * virtqueues (2.7), written from the specification. Polls the used ring; MSI-X
 * vectors are programmed so tests can see the interrupts arrive in the LAPIC IRR. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "kit.h"

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTIO_MSI_NO_VECTOR 0xffff

/* virtio_pci_common_cfg offsets (4.1.4.3). */
#define VCOMMON_DFSELECT 0x00
#define VCOMMON_DF 0x04
#define VCOMMON_GFSELECT 0x08
#define VCOMMON_GF 0x0c
#define VCOMMON_MSIX 0x10
#define VCOMMON_NUMQ 0x12
#define VCOMMON_STATUS 0x14
#define VCOMMON_CFGGEN 0x15
#define VCOMMON_Q_SELECT 0x16
#define VCOMMON_Q_SIZE 0x18
#define VCOMMON_Q_MSIX 0x1a
#define VCOMMON_Q_ENABLE 0x1c
#define VCOMMON_Q_NOFF 0x1e
#define VCOMMON_Q_DESCLO 0x20
#define VCOMMON_Q_AVAILLO 0x28
#define VCOMMON_Q_USEDLO 0x30

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };

struct vdev {
  int slot;
  u64 bar;
  u64 common, isr, device, notify;
  u32 notify_mult;
  int msix_cap;
  u64 msix_table;
  u64 features;
};

struct vq {
  struct vdev *dev;
  int index;
  u16 size;
  u16 free_head; /* descriptors are used in order, as a ring */
  u16 avail_idx;
  u16 last_used;
  u64 desc, avail, used;
  u64 notify_addr;
};

static inline u64 vdev_bar(int slot, int bar) { return pci_rd32(slot, 0x10 + 4 * bar) & ~0xfULL; }

/* Finds the virtio capabilities; enables memory decoding and bus mastering. */
static inline int vdev_find(struct vdev *d, int slot) {
  kit_memset(d, 0, sizeof *d);
  d->slot = slot;
  if (pci_rd16(slot, 0) != 0x1af4) return -1;
  pci_wr16(slot, 0x04, 0x6);
  for (int at = pci_rd8(slot, 0x34), hops = 0; at && hops < 48; at = pci_rd8(slot, at + 1), hops++) {
    u8 id = pci_rd8(slot, at);
    if (id == 0x11) {
      d->msix_cap = at;
      u32 table = pci_rd32(slot, at + 4);
      d->msix_table = vdev_bar(slot, table & 7) + (table & ~7u);
      continue;
    }
    if (id != 0x09) continue;
    u8 type = pci_rd8(slot, at + 3);
    u64 where = vdev_bar(slot, pci_rd8(slot, at + 4)) + pci_rd32(slot, at + 8);
    if (type == 1) d->common = where;
    else if (type == 2) { d->notify = where; d->notify_mult = pci_rd32(slot, at + 16); }
    else if (type == 3) d->isr = where;
    else if (type == 4) d->device = where;
  }
  d->bar = vdev_bar(slot, 0);
  return d->common && d->notify && d->isr ? 0 : -2;
}

static inline u8 vdev_status(struct vdev *d) { return rd8(d->common + VCOMMON_STATUS); }

static inline u64 vdev_device_features(struct vdev *d) {
  wr32(d->common + VCOMMON_DFSELECT, 0);
  u64 lo = rd32(d->common + VCOMMON_DF);
  wr32(d->common + VCOMMON_DFSELECT, 1);
  return lo | ((u64)rd32(d->common + VCOMMON_DF) << 32);
}

/* 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK. Returns the
 * status read back (FEATURES_OK clear: the device refused the features). */
static inline u8 vdev_negotiate(struct vdev *d, u64 wanted) {
  wr8(d->common + VCOMMON_STATUS, 0);
  wr8(d->common + VCOMMON_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
  wr8(d->common + VCOMMON_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
  d->features = vdev_device_features(d) & wanted;
  wr32(d->common + VCOMMON_GFSELECT, 0);
  wr32(d->common + VCOMMON_GF, (u32)d->features);
  wr32(d->common + VCOMMON_GFSELECT, 1);
  wr32(d->common + VCOMMON_GF, (u32)(d->features >> 32));
  wr8(d->common + VCOMMON_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
  return vdev_status(d);
}

static inline void vdev_driver_ok(struct vdev *d) {
  wr8(d->common + VCOMMON_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

/* MSI-X: enable the function, point table entry `entry` at this CPU (APIC ID 0) with
 * `vector`, and unmask it. */
static inline void vdev_msix_enable(struct vdev *d) {
  pci_wr16(d->slot, d->msix_cap + 2, 0x8000);
}
static inline void vdev_msix_route(struct vdev *d, int entry, int vector, int masked) {
  u64 e = d->msix_table + 16 * entry;
  wr32(e + 0, LAPIC_START);
  wr32(e + 4, 0);
  wr32(e + 8, vector);
  wr32(e + 12, masked ? 1 : 0);
}

/* 4.1.5.1.3: sets queue `index` up in freshly allocated memory and enables it. */
static inline int vq_setup(struct vdev *d, struct vq *q, int index, u16 size, u16 msix_vector) {
  kit_memset(q, 0, sizeof *q);
  q->dev = d;
  q->index = index;
  wr16(d->common + VCOMMON_Q_SELECT, index);
  u16 max = rd16(d->common + VCOMMON_Q_SIZE);
  if (max == 0) return -1;
  if (size == 0 || size > max) size = max;
  q->size = size;
  q->desc = kit_alloc(16 * size);
  q->avail = kit_alloc(6 + 2 * size);
  q->used = kit_alloc(6 + 8 * size);
  wr16(d->common + VCOMMON_Q_SIZE, size);
  wr16(d->common + VCOMMON_Q_MSIX, msix_vector);
  wr64(d->common + VCOMMON_Q_DESCLO, q->desc);
  wr64(d->common + VCOMMON_Q_AVAILLO, q->avail);
  wr64(d->common + VCOMMON_Q_USEDLO, q->used);
  q->notify_addr = d->notify + (u64)rd16(d->common + VCOMMON_Q_NOFF) * d->notify_mult;
  wr16(d->common + VCOMMON_Q_ENABLE, 1);
  return rd16(d->common + VCOMMON_Q_ENABLE) == 1 ? 0 : -2;
}

static inline struct virtq_desc *vq_desc(struct vq *q, u16 i) { return (struct virtq_desc *)(uptr)(q->desc + 16ULL * (i % q->size)); }

/* A buffer of a request: address, length, device-writable or not. */
struct vbuf { u64 addr; u32 len; int write; };

/* Puts a chain of `n` buffers in the descriptor table (or, with `indirect`, in a table
 * at `indirect` pointed to by one descriptor) and makes it available. Returns the head. */
static inline u16 vq_add(struct vq *q, const struct vbuf *b, int n, u64 indirect) {
  u16 head = q->free_head % q->size;
  if (indirect) {
    struct virtq_desc *t = (struct virtq_desc *)(uptr)indirect;
    for (int i = 0; i < n; i++) {
      t[i].addr = b[i].addr;
      t[i].len = b[i].len;
      t[i].flags = (b[i].write ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
      t[i].next = i + 1;
    }
    struct virtq_desc *dd = vq_desc(q, head);
    dd->addr = indirect;
    dd->len = 16 * n;
    dd->flags = VIRTQ_DESC_F_INDIRECT;
    dd->next = 0;
    q->free_head++;
  } else {
    for (int i = 0; i < n; i++) {
      u16 at = q->free_head % q->size;
      struct virtq_desc *dd = vq_desc(q, at);
      dd->addr = b[i].addr;
      dd->len = b[i].len;
      dd->flags = (b[i].write ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
      dd->next = (at + 1) % q->size;
      q->free_head++;
    }
  }
  wr16(q->avail + 4 + 2 * (q->avail_idx % q->size), head);
  barrier();
  q->avail_idx++;
  wr16(q->avail + 2, q->avail_idx);
  barrier();
  return head;
}

/* Kicks the device unless it asked not to be (used.flags NO_NOTIFY, 2.7.7.2). */
static inline void vq_kick(struct vq *q) {
  barrier();
  if (!(rd16(q->used) & 1)) wr16(q->notify_addr, q->index);
}

/* Waits for the next used entry; returns its id, or -1 after `spins` polls. */
static inline int vq_wait(struct vq *q, u32 *len, long spins) {
  while (spins-- > 0) {
    if (rd16(q->used + 2) != q->last_used) {
      barrier();
      u64 e = q->used + 4 + 8ULL * (q->last_used % q->size);
      q->last_used++;
      if (len) *len = rd32(e + 4);
      return (int)rd32(e);
    }
    __asm__ __volatile__("pause");
  }
  return -1;
}

/* EVENT_IDX: ask for an interrupt only once the used index passes `idx` (used_event). */
static inline void vq_set_used_event(struct vq *q, u16 idx) { wr16(q->avail + 4 + 2 * q->size, idx); }
static inline u16 vq_avail_event(struct vq *q) { return rd16(q->used + 4 + 8 * q->size); }

#endif
