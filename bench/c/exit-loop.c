/*
 * C reference for `npm run bench -- exits`: runs the same guest as Kiln from the same
 * state (memory image, kvm_sregs and kvm_regs written by the bench) and handles its
 * port-I/O exits in the tightest loop C allows. Prints "exits=N ns=T".
 * Usage: exit-loop IMAGE SREGS REGS PROGRESS_PORT EXIT_PORT
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static size_t slurp(const char *path, void *buf, size_t max) {
	FILE *f = fopen(path, "rb");
	if (!f) die(path);
	size_t n = fread(buf, 1, max, f);
	fclose(f);
	return n;
}

int main(int argc, char **argv) {
	if (argc != 6) { fprintf(stderr, "usage: %s IMAGE SREGS REGS PROGRESS_PORT EXIT_PORT\n", argv[0]); return 2; }
	unsigned progress_port = strtoul(argv[4], 0, 0), exit_port = strtoul(argv[5], 0, 0);
	size_t mem_size = 4 << 20;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	uint8_t *mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	slurp(argv[1], mem, mem_size);
	struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	if (slurp(argv[2], &sregs, sizeof sregs) != sizeof sregs || slurp(argv[3], &regs, sizeof regs) != sizeof regs) {
		fprintf(stderr, "register files have the wrong size\n");
		return 1;
	}
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");

	/* What Kiln's progress device does with a write: keep the value and count it. */
	volatile uint32_t last = 0, count = 0;
	unsigned long exits = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "unexpected exit %u\n", run->exit_reason); return 1; }
		exits++;
		uint8_t *data = (uint8_t *)run + run->io.data_offset;
		if (run->io.port == progress_port) {
			uint32_t v = 0;
			memcpy(&v, data, run->io.size);
			last = v;
			count++;
		} else if (run->io.port == exit_port) {
			break;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("exits=%lu ns=%lld\n", exits, (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
