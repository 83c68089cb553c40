/* The host's own side of `npm run bench -- blk`: pread or pwrite a file in REQ-byte
 * requests, TOTAL bytes in all (wrapping around the file), one buffer, timed inside the
 * process so start-up does not count. Usage: blk-host read|write|randread FILE REQ TOTAL
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
  char *buf = aligned_alloc(4096, req);
  memset(buf, 0xa5, req);
  unsigned long long x = 0x9e3779b97f4a7c15ULL;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  long n = 0;
  for (long done = 0; done < total; done += req, n++) {
    long block = n % blocks;
    if (random_mode) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; block = x % blocks; }
    ssize_t r = write_mode ? pwrite(fd, buf, req, block * req) : pread(fd, buf, req, block * req);
    if (r != req) { perror("io"); return 1; }
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("bytes=%ld ns=%lld requests=%ld\n", total, (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec), n);
  return 0;
}
