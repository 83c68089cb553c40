// The Uffd memory backend of PUT /snapshot/load, as Firecracker's: guest RAM is mapped
// anonymous and registered with a userfaultfd (missing-page mode), and the userfaultfd,
// with the regions' layout as JSON, is sent over the Unix socket at backend_path to the
// page-fault handler listening there (SCM_RIGHTS). From then on every first touch of a
// guest page, by the guest or by Kiln, waits until the handler fills it (UFFDIO_COPY
// from wherever it keeps the memory file), so Firecracker's page-fault handlers serve
// Kiln unchanged. The layout: [{"base_host_virt_addr", "size", "offset", "page_size",
// "page_size_kib"}], one per region, `offset` being the region's place in the memory file.
import { ioc } from '../kvm/ioctl.js';
import * as libc from '../kvm/libc.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { PAGE_SIZE } from '../layout.js';
import { SnapshotError } from './format.js';

const UFFDIO = 0xaa;
const IOC_READ_WRITE = 3;
export const UFFD_API = 0xaa;
/** _IOWR(UFFDIO, 0x3F, struct uffdio_api { u64 api; u64 features; u64 ioctls; }). */
export const UFFDIO_API = ioc(IOC_READ_WRITE, UFFDIO, 0x3f, 24);
/** _IOWR(UFFDIO, 0x00, struct uffdio_register { u64 start; u64 len; u64 mode; u64 ioctls; }). */
export const UFFDIO_REGISTER = ioc(IOC_READ_WRITE, UFFDIO, 0x00, 32);
/** _IOWR(UFFDIO, 0x03, struct uffdio_copy { u64 dst; u64 src; u64 len; u64 mode; s64 copy; }). */
export const UFFDIO_COPY = ioc(IOC_READ_WRITE, UFFDIO, 0x03, 40);
const UFFDIO_REGISTER_MODE_MISSING = 1n;
/** uffd_msg.event of a page fault; the message is 32 bytes, the address at byte 16. */
export const UFFD_EVENT_PAGEFAULT = 0x12;
export const UFFD_MSG_BYTES = 32;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_CMSG_CLOEXEC = 0x40000000;

/** What the handler receives, per region. */
export interface UffdRegion {
  readonly base_host_virt_addr: number;
  readonly size: number;
  readonly offset: number;
  readonly page_size: number;
  readonly page_size_kib: number;
}

function failed(what: string): never {
  throw new SnapshotError(`${what}: ${libc.errnoName(libc.errno())}`);
}

/**
 * Registers every region of `memory` (mapped anonymous, not yet touched) with a new
 * userfaultfd and hands it, with the layout, to the handler at `socketPath`. Returns the
 * layout sent. Nothing may touch guest memory before this: a page touched before it is
 * registered would be a zero page the handler never fills.
 */
export function handOverToUffd(memory: GuestMemory, socketPath: string): UffdRegion[] {
  const uffd = libc.userfaultfd(libc.O_CLOEXEC | libc.O_NONBLOCK);
  if (uffd < 0)
    failed(
      'cannot create a userfaultfd for the Uffd backend (it needs root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)',
    );
  try {
    const api = Buffer.alloc(24);
    api.writeBigUInt64LE(BigInt(UFFD_API), 0);
    if (libc.ioctlPtr(uffd, UFFDIO_API, api) < 0) failed('UFFDIO_API');
    const regions: UffdRegion[] = [];
    let offset = 0;
    for (const r of memory.regions) {
      const reg = Buffer.alloc(32);
      reg.writeBigUInt64LE(r.hostAddr, 0);
      reg.writeBigUInt64LE(BigInt(r.size), 8);
      reg.writeBigUInt64LE(UFFDIO_REGISTER_MODE_MISSING, 16);
      if (libc.ioctlPtr(uffd, UFFDIO_REGISTER, reg) < 0) failed('UFFDIO_REGISTER');
      regions.push({
        base_host_virt_addr: Number(r.hostAddr),
        size: r.size,
        offset,
        page_size: PAGE_SIZE,
        page_size_kib: PAGE_SIZE / 1024,
      });
      offset += r.size;
    }
    const sock = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
    if (sock < 0) failed('socket');
    try {
      if (libc.connect(sock, libc.sockaddrUn(socketPath), libc.sockaddr_un.size) < 0)
        failed(`cannot connect to the page-fault handler at ${socketPath}`);
      sendWithFd(sock, Buffer.from(JSON.stringify(regions)), uffd);
    } finally {
      libc.close(sock);
    }
    return regions;
  } finally {
    // The handler has its own copy of the descriptor; the registration lives on with the mm.
    libc.close(uffd);
  }
}

/**
 * A scratch page for a struct whose fields point at other memory (msghdr): its address
 * is known, unlike a Buffer's. Freed after `use`.
 */
function withScratch<T>(use: (addr: bigint, bytes: Buffer) => T): T {
  const { addr, bytes } = libc.mapAnonymous(PAGE_SIZE);
  try {
    return use(addr, Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length));
  } finally {
    libc.munmap(addr, PAGE_SIZE);
  }
}

// struct msghdr (56 bytes), then struct iovec (16), then the cmsg (24: header 16 + one int, aligned), then the data.
const MSGHDR = 0;
const IOV = 64;
const CMSG = 80;
const DATA = 128;

/**
 * Lays out, in the scratch page at `addr`, a msghdr with one iovec over `dataBytes` bytes
 * at DATA and room for one SCM_RIGHTS descriptor at CMSG; returns the msghdr's address.
 */
function layoutMessage(addr: bigint, b: Buffer, dataBytes: number): bigint {
  b.writeBigUInt64LE(addr + BigInt(DATA), IOV);
  b.writeBigUInt64LE(BigInt(dataBytes), IOV + 8);
  b.writeBigUInt64LE(addr + BigInt(IOV), MSGHDR + 16); // msg_iov
  b.writeBigUInt64LE(1n, MSGHDR + 24); // msg_iovlen
  b.writeBigUInt64LE(addr + BigInt(CMSG), MSGHDR + 32); // msg_control
  b.writeBigUInt64LE(24n, MSGHDR + 40); // msg_controllen: CMSG_SPACE(sizeof(int))
  return addr + BigInt(MSGHDR);
}

/** sendmsg(2) of `data` with `fd` as SCM_RIGHTS, whole (a short send is an error). */
export function sendWithFd(sock: number, data: Buffer, fd: number): void {
  if (data.length > PAGE_SIZE - DATA) throw new SnapshotError(`the message is too long (${data.length} bytes)`);
  withScratch((addr, b) => {
    data.copy(b, DATA);
    b.writeBigUInt64LE(20n, CMSG); // CMSG_LEN(sizeof(int))
    b.writeInt32LE(SOL_SOCKET, CMSG + 8);
    b.writeInt32LE(SCM_RIGHTS, CMSG + 12);
    b.writeInt32LE(fd, CMSG + 16);
    const n = libc.sendmsg(sock, layoutMessage(addr, b, data.length), 0);
    if (n < 0) failed('cannot send the userfaultfd to the page-fault handler');
    if (n !== data.length) throw new SnapshotError(`the page-fault handler took ${n} of ${data.length} bytes`);
  });
}

/** recvmsg(2) of up to a page of data and one SCM_RIGHTS descriptor (-1 if none came). */
export function receiveWithFd(sock: number): { data: Buffer; fd: number } {
  return withScratch((addr, b) => {
    const n = libc.recvmsg(sock, layoutMessage(addr, b, PAGE_SIZE - DATA), MSG_CMSG_CLOEXEC);
    if (n < 0) failed('recvmsg');
    const controlLen = Number(b.readBigUInt64LE(MSGHDR + 40));
    const hasFd = controlLen >= 20 && b.readInt32LE(CMSG + 8) === SOL_SOCKET && b.readInt32LE(CMSG + 12) === SCM_RIGHTS;
    return { data: Buffer.from(b.subarray(DATA, DATA + n)), fd: hasFd ? b.readInt32LE(CMSG + 16) : -1 };
  });
}
