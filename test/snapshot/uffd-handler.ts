// A page-fault handler as Firecracker's users write them, for the Uffd backend's test: it
// listens on a Unix socket, receives the userfaultfd and the regions' layout from
// kiln-vmm's /snapshot/load, maps the memory file, and fills each faulting page with
// UFFDIO_COPY from it. It prints "ready" once listening and keeps the number of pages it
// served in a file (argv[3]); it runs until killed.
import { closeSync, openSync, fstatSync, writeFileSync } from 'node:fs';
import * as libc from '../../src/kvm/libc.js';
import {
  receiveWithFd,
  UFFD_EVENT_PAGEFAULT,
  UFFD_MSG_BYTES,
  UFFDIO_COPY,
  type UffdRegion,
} from '../../src/snapshot/uffd.js';

const [socketPath, memPath, countPath] = process.argv.slice(2) as [string, string, string];
const PAGE = 4096n;

const listener = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
if (libc.bind(listener, libc.sockaddrUn(socketPath), libc.sockaddr_un.size) < 0 || libc.listen(listener, 1) < 0)
  throw new Error(`cannot listen on ${socketPath}: ${libc.errnoName(libc.errno())}`);
process.stdout.write('ready\n');
const conn = libc.accept4(listener, null, null, libc.SOCK_CLOEXEC);
if (conn < 0) throw new Error(`accept: ${libc.errnoName(libc.errno())}`);
const { data, fd: uffd } = receiveWithFd(conn);
if (uffd < 0) throw new Error('no userfaultfd came with the message');
const regions = JSON.parse(data.toString()) as UffdRegion[];

const memFd = openSync(memPath, 'r');
const size = fstatSync(memFd).size;
const file = libc.mmap(null, size, libc.PROT_READ, libc.MAP_PRIVATE, memFd, 0);
closeSync(memFd);
if (file === libc.MAP_FAILED) throw new Error('cannot map the memory file');

const epoll = libc.epollCreate1(libc.EPOLL_CLOEXEC);
const event = Buffer.alloc(libc.EPOLL_EVENT_BYTES);
event.writeUInt32LE(libc.EPOLLIN, libc.EPOLL_EVENT_EVENTS);
libc.epollCtl(epoll, libc.EPOLL_CTL_ADD, uffd, event);
const events = Buffer.alloc(libc.EPOLL_EVENT_BYTES);
const msg = Buffer.alloc(UFFD_MSG_BYTES);
const copy = Buffer.alloc(40);
let served = 0;
for (;;) {
  if (libc.epollWait(epoll, events, 1, 1000) <= 0) continue;
  while (libc.read(uffd, msg, UFFD_MSG_BYTES) === UFFD_MSG_BYTES) {
    if (msg[0] !== UFFD_EVENT_PAGEFAULT) continue;
    const address = msg.readBigUInt64LE(16) & ~(PAGE - 1n);
    const region = regions.find(
      (r) => address >= BigInt(r.base_host_virt_addr) && address < BigInt(r.base_host_virt_addr + r.size),
    );
    if (!region) throw new Error(`a fault outside guest memory at 0x${address.toString(16)}`);
    copy.writeBigUInt64LE(address, 0);
    copy.writeBigUInt64LE(file + BigInt(region.offset) + (address - BigInt(region.base_host_virt_addr)), 8);
    copy.writeBigUInt64LE(PAGE, 16);
    copy.writeBigUInt64LE(0n, 24);
    // EEXIST: another thread's fault on the same page was served first.
    if (libc.ioctlPtr(uffd, UFFDIO_COPY, copy) < 0 && libc.errno() !== 17)
      throw new Error(`UFFDIO_COPY: ${libc.errnoName(libc.errno())}`);
    served++;
  }
  writeFileSync(countPath, String(served));
}
