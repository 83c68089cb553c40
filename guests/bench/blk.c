/* The blk benchmark's guest: a ring-3 virtio-blk driver that keeps QD requests in
 * flight (no interrupts: it polls the used ring, and sets VIRTQ_AVAIL_F_NO_INTERRUPT).
 * Defines: SLOT0, OP (0 read, 1 write), REQ_BYTES, REQUESTS, DISK_BYTES, RANDOM. */
#include "virtio.h"
#ifndef QD
#define QD 8
#endif

static u64 rng_state = 0x9e3779b97f4a7c15ULL;
static u64 next_offset(u64 i) {
  if (!RANDOM) return (i * (u64)REQ_BYTES) % (u64)DISK_BYTES;
  rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
  return (rng_state % ((u64)DISK_BYTES / REQ_BYTES)) * REQ_BYTES;
}

void kit_main(void) {
  struct vdev d; struct vq q;
  if (vdev_find(&d, SLOT0)) kit_exit(10);
  if (!(vdev_negotiate(&d, 1ULL << VIRTIO_F_VERSION_1) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(11);
  if (vq_setup(&d, &q, 0, 64, VIRTIO_MSI_NO_VECTOR)) kit_exit(12);
  wr16(q.avail, 1); /* VIRTQ_AVAIL_F_NO_INTERRUPT */
  vdev_driver_ok(&d);
  u64 hdr[QD], data[QD];
  int slot_of[64];
  for (int i = 0; i < QD; i++) { hdr[i] = kit_alloc(4096); data[i] = kit_alloc(REQ_BYTES); }
  u64 submitted = 0, completed = 0, errors = 0;
  for (int s = 0; s < QD && submitted < REQUESTS; s++, submitted++) {
    wr32(hdr[s], OP); wr64(hdr[s] + 8, next_offset(submitted) / 512); wr8(hdr[s] + 64, 0xee);
    struct vbuf b[3] = { { hdr[s], 16, 0 }, { data[s], REQ_BYTES, OP == 0 }, { hdr[s] + 64, 1, 1 } };
    slot_of[q.free_head % q.size] = s;
    vq_add(&q, b, 3, 0);
  }
  vq_kick(&q);
  while (completed < REQUESTS) {
    int head = vq_wait(&q, 0, 1000000000L);
    if (head < 0) kit_exit(13);
    int s = slot_of[head];
    if (rd8(hdr[s] + 64) != 0) errors++;
    completed++;
    if (submitted < REQUESTS) {
      wr32(hdr[s], OP); wr64(hdr[s] + 8, next_offset(submitted) / 512); wr8(hdr[s] + 64, 0xee);
      struct vbuf b[3] = { { hdr[s], 16, 0 }, { data[s], REQ_BYTES, OP == 0 }, { hdr[s] + 64, 1, 1 } };
      slot_of[q.free_head % q.size] = s;
      vq_add(&q, b, 3, 0);
      submitted++;
      vq_kick(&q);
    }
  }
  RESULT(0) = completed;
  RESULT(1) = errors;
  kit_exit(errors ? 14 : 0);
}
