/* The host's own side of `npm run bench -- net`, on the same TAP as the guest:
 *   tx N        write N frames (12-byte virtio_net_hdr + 1514-byte frame) to fd 3
 *   send IF N   send N frames into interface IF with an AF_PACKET socket (they come
 *               out of the TAP's fd: the receive direction)
 *   read MS     read frames from fd 3 until none came for MS milliseconds
 *   drain       read the frames fd 3 (nonblocking) holds now, until it holds none
 *   drain-spread  the same, each frame into the next slot of an 8 MiB region (touched
 *               first), as a device fills a guest's receive buffers, not one hot buffer
 * Prints "frames=<n> bytes=<b> ns=<elapsed>". */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME 1514
#define HDR 12

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void fill(unsigned char *f) {
  memset(f, 0, FRAME);
  memcpy(f, "\x02\x00\x00\x00\x00\x99", 6); /* a MAC nobody has: the kernel drops it early */
  memcpy(f + 6, "\x02\x00\x00\x00\x00\x01", 6);
  f[12] = 0x08; f[13] = 0x00;
  for (int i = 14; i < FRAME; i++) f[i] = (unsigned char)i;
}

int main(int argc, char **argv) {
  static unsigned char buf[HDR + 65536];
  if (argc >= 3 && !strcmp(argv[1], "tx")) {
    long n = atol(argv[2]);
    memset(buf, 0, HDR);
    fill(buf + HDR);
    long long t0 = now_ns();
    long sent = 0;
    for (long i = 0; i < n; i++) {
      if (write(3, buf, HDR + FRAME) == HDR + FRAME) sent++;
      else if (errno != EAGAIN) { perror("write"); return 1; }
    }
    printf("frames=%ld bytes=%ld ns=%lld\n", sent, sent * (long)FRAME, now_ns() - t0);
    return 0;
  }
  if (argc >= 4 && !strcmp(argv[1], "send")) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(0x0800));
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_ll a = { .sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(argv[2]), .sll_halen = 6 };
    memcpy(a.sll_addr, "\x02\x00\x00\x00\x00\x99", 6);
    long n = atol(argv[3]);
    fill(buf);
    long long t0 = now_ns();
    long sent = 0;
    for (long i = 0; i < n; i++)
      if (sendto(s, buf, FRAME, 0, (struct sockaddr *)&a, sizeof a) == FRAME) sent++;
    printf("frames=%ld bytes=%ld ns=%lld\n", sent, sent * (long)FRAME, now_ns() - t0);
    return 0;
  }
  if (argc >= 3 && !strcmp(argv[1], "read")) {
    int idle = atoi(argv[2]);
    long frames = 0, bytes = 0;
    long long first = 0, last = 0;
    struct pollfd p = { .fd = 3, .events = POLLIN };
    while (poll(&p, 1, frames ? idle : 10000) > 0) {
      ssize_t r = read(3, buf, sizeof buf);
      if (r <= 0) continue;
      if (!frames) first = now_ns();
      last = now_ns();
      frames++;
      bytes += r - HDR;
    }
    printf("frames=%ld bytes=%ld ns=%lld\n", frames, bytes, last - first);
    return 0;
  }
  if (argc >= 2 && (!strcmp(argv[1], "drain") || !strcmp(argv[1], "drain-spread"))) {
    /* fd 3 is nonblocking: read what the TAP holds, until it holds nothing. */
    int spread = !strcmp(argv[1], "drain-spread");
    enum { REGION = 8 << 20, SLOT = HDR + FRAME + 64 };
    unsigned char *region = spread ? malloc(REGION) : NULL;
    if (spread) memset(region, 0, REGION);
    long frames = 0, bytes = 0, at = 0;
    long long t0 = now_ns();
    for (;;) {
      unsigned char *into = buf;
      if (spread) {
        if (at + SLOT > REGION) at = 0;
        into = region + at;
        at += SLOT;
      }
      ssize_t r = read(3, into, spread ? SLOT : sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      frames++;
      bytes += r - HDR;
    }
    printf("frames=%ld bytes=%ld ns=%lld\n", frames, bytes, now_ns() - t0);
    return 0;
  }
  fprintf(stderr, "usage: net-host tx N | send IF N | read IDLE_MS | drain | drain-spread\n");
  return 2;
}
