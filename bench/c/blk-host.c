/* The host's own side of `npm run bench -- blk`: pread or pwrite a file in REQ-byte
 * requests, TOTAL bytes in all (wrapping around the file), one buffer, timed inside the
 * process so start-up does not count. Usage: blk-host read|write|randread FILE REQ TOTAL [spread]
 * With `spread`, each request uses the next slot of an 8 MiB region (touched first), as a
 * device uses a guest's buffers, instead of one hot buffer.
 * Prints "bytes=<b> ns=<elapsed> requests=<n>". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 5) { fprintf(stderr, "usage: blk-host read|write|randread FILE REQ TOTAL\n"); return 2; }
  int write_mode = !strcmp(argv[1], "write"), random_mode = !strcmp(argv[1], "randread");
  int fd = open(argv[2], write_mode ? O_RDWR : O_RDONLY);
  if (fd < 0) { perror("open"); return 1; }
  struct stat st;
  fstat(fd, &st);
  long req = atol(argv[3]), total = atol(argv[4]), blocks = st.st_size / req;
  int spread = argc > 5 && !strcmp(argv[5], "spread");
  long region = spread && req < (8L << 20) ? 8L << 20 : req, at = 0;
  char *buf = aligned_alloc(4096, region);
  memset(buf, 0xa5, region);
  unsigned long long x = 0x9e3779b97f4a7c15ULL;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  long n = 0;
  for (long done = 0; done < total; done += req, n++) {
    long block = n % blocks;
    if (random_mode) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; block = x % blocks; }
    if (at + req > region) at = 0;
    char *into = buf + at;
    if (spread) at += req;
    ssize_t r = write_mode ? pwrite(fd, into, req, block * req) : pread(fd, into, req, block * req);
    if (r != req) { perror("io"); return 1; }
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("bytes=%ld ns=%lld requests=%ld\n", total, (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec), n);
  return 0;
}
