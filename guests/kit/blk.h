/* virtio-blk requests for kit guests (virtio 1.2, 5.2.6), over virtio.h's queues. */
#ifndef BLK_H
#define BLK_H
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

struct virtio_blk_req { u32 type; u32 reserved; u64 sector; };

/* One request: the header, `len` bytes at `data` (device-writable when `data_writable`,
 * as for reads and get-id; no data buffer when `len` is 0), the status byte; through an
 * indirect table at `indirect` when it is not 0. Waits for the completion and returns
 * the status (the guest exits with 90 if none comes). */
static inline u8 blk_io(struct vq *q, u32 type, u64 sector, u64 data, u32 len, int data_writable, u64 indirect, u32 *used_len) {
  u64 hdr = kit_alloc(64);
  struct virtio_blk_req *r = (struct virtio_blk_req *)(uptr)hdr;
  r->type = type;
  r->sector = sector;
  u64 status = hdr + 32;
  wr8(status, 0xee);
  struct vbuf b[3] = { { hdr, 16, 0 }, { data, len, data_writable }, { status, 1, 1 } };
  if (len) vq_add(q, b, 3, indirect);
  else { b[1] = b[2]; vq_add(q, b, 2, indirect); }
  vq_kick(q);
  if (vq_wait(q, used_len, 100000000) < 0) kit_exit(90);
  return rd8(status);
}

#endif
