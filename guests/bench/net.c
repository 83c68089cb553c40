/* The net benchmark's guest: a ring-3 virtio-net driver that polls (no interrupts).
 * MODE 0 (transmit): sends FRAMES frames of 1514 bytes to a MAC nobody has, keeping the
 * ring full. MODE 1 (receive): keeps 256 buffers posted and counts frames until none
 * has come for a while. RESULT(0) frames, RESULT(1) bytes. Define: SLOT0, MODE, FRAMES. */
#include "virtio.h"
#define FRAME 1514
#define HDR 12
#define QSIZE 256

void kit_main(void) {
  struct vdev d; struct vq rx, tx;
  if (vdev_find(&d, SLOT0)) kit_exit(10);
  if (!(vdev_negotiate(&d, (1ULL << VIRTIO_F_VERSION_1) | (1ULL << 5)) & VIRTIO_STATUS_FEATURES_OK)) kit_exit(11);
  if (vq_setup(&d, &rx, 0, QSIZE, VIRTIO_MSI_NO_VECTOR) || vq_setup(&d, &tx, 1, QSIZE, VIRTIO_MSI_NO_VECTOR)) kit_exit(12);
  wr16(rx.avail, 1); wr16(tx.avail, 1); /* VIRTQ_AVAIL_F_NO_INTERRUPT */
  vdev_driver_ok(&d);
  u64 frames = 0, bytes = 0;
  if (MODE == 0) {
    u64 bufs = kit_alloc(QSIZE * 2048ULL);
    for (int i = 0; i < QSIZE; i++) {
      u64 f = bufs + 2048ULL * i + HDR;
      for (int b = 0; b < 6; b++) wr8(f + b, b == 5 ? 0x99 : (b == 0 ? 2 : 0));
      for (int b = 6; b < 12; b++) wr8(f + b, rd8(d.device + b - 6));
      wr8(f + 12, 0x08); wr8(f + 13, 0x00);
    }
    u64 submitted = 0;
    for (; submitted < QSIZE && submitted < FRAMES; submitted++) {
      struct vbuf b = { bufs + 2048ULL * (submitted % QSIZE), HDR + FRAME, 0 };
      vq_add(&tx, &b, 1, 0);
    }
    vq_kick(&tx);
    while (frames < FRAMES) {
      int id = vq_wait(&tx, 0, 1000000000L);
      if (id < 0) kit_exit(13);
      frames++;
      bytes += FRAME;
      if (submitted < FRAMES) {
        struct vbuf b = { bufs + 2048ULL * (id % QSIZE), HDR + FRAME, 0 };
        vq_add(&tx, &b, 1, 0);
        submitted++;
        if ((submitted & 15) == 0 || submitted == FRAMES) vq_kick(&tx);
      }
    }
  } else {
    u64 bufs = kit_alloc(QSIZE * 2048ULL);
    int buf_of[QSIZE];
    for (int i = 0; i < QSIZE; i++) { struct vbuf b = { bufs + 2048ULL * i, 2048, 1 }; buf_of[rx.free_head % QSIZE] = i; vq_add(&rx, &b, 1, 0); }
    vq_kick(&rx);
    RESULT(9) = 1;
    long idle = 3000000000L; /* until the first frame */
    for (;;) {
      u32 len = 0;
      int id = vq_wait(&rx, &len, idle);
      if (id < 0) break;
      idle = 30000000L; /* then: stop once the sender has gone quiet */
      frames++;
      bytes += len - HDR;
      int i = buf_of[id % QSIZE];
      struct vbuf b = { bufs + 2048ULL * i, 2048, 1 };
      buf_of[rx.free_head % QSIZE] = i;
      vq_add(&rx, &b, 1, 0);
      if ((frames & 15) == 0) vq_kick(&rx);
    }
  }
  RESULT(0) = frames;
  RESULT(1) = bytes;
  kit_exit(0);
}
