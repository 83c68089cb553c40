// The libc entry points Kiln calls through koffi. Each is declared with fixed
// argument types: variadic ioctl(2) is declared twice (pointer argument and integer
// argument), which is sound on x86-64 SysV because only integer registers carry them.
import koffi from 'koffi';
import { constants as osConstants } from 'node:os';
import { array, packedStruct, sizeOf, struct } from './struct.js';

const libc = koffi.load('libc.so.6');

/** A pointer as koffi 3 represents one: a BigInt address, or null. */
export type Pointer = bigint;

/** Anything koffi can pass for a `void *` parameter: guest views, Buffers, raw addresses. */
export type PointerArg = Buffer | Uint8Array | ArrayBuffer | bigint | null;

export const open = libc.func('int open(const char *path, int flags, uint32_t mode)') as (
  path: string,
  flags: number,
  mode: number,
) => number;
export const close = libc.func('int close(int fd)') as (fd: number) => number;
export const read = libc.func('intptr_t read(int fd, _Out_ void *buf, size_t count)') as (
  fd: number,
  buf: PointerArg,
  count: number,
) => number;
export const write = libc.func('intptr_t write(int fd, const void *buf, size_t count)') as (
  fd: number,
  buf: PointerArg,
  count: number,
) => number;
/** Vectored I/O: `iov` holds `iovcnt` struct iovec {void *base; size_t len}. */
export const readv = libc.func('intptr_t readv(int fd, const void *iov, int iovcnt)') as (
  fd: number,
  iov: PointerArg,
  iovcnt: number,
) => number;
export const writev = libc.func('intptr_t writev(int fd, const void *iov, int iovcnt)') as (
  fd: number,
  iov: PointerArg,
  iovcnt: number,
) => number;
/** Vectored positioned I/O, the same iovecs. */
export const preadv = libc.func('intptr_t preadv(int fd, const void *iov, int iovcnt, int64_t offset)') as (
  fd: number,
  iov: PointerArg,
  iovcnt: number,
  offset: number,
) => number;
export const pwritev = libc.func('intptr_t pwritev(int fd, const void *iov, int iovcnt, int64_t offset)') as (
  fd: number,
  iov: PointerArg,
  iovcnt: number,
  offset: number,
) => number;
export const ioctlPtr = libc.func('int ioctl(int fd, unsigned long request, _Inout_ void *arg)') as (
  fd: number,
  request: number,
  arg: PointerArg,
) => number;
export const ioctlInt = libc.func('int ioctl(int fd, unsigned long request, unsigned long arg)') as (
  fd: number,
  request: number,
  arg: number,
) => number;
export const mmap = libc.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)') as (
  addr: PointerArg,
  length: number,
  prot: number,
  flags: number,
  fd: number,
  offset: number,
) => Pointer;
export const munmap = libc.func('int munmap(void *addr, size_t length)') as (addr: Pointer, length: number) => number;
export const madvise = libc.func('int madvise(void *addr, size_t length, int advice)') as (
  addr: Pointer,
  length: number,
  advice: number,
) => number;
export const eventfd = libc.func('int eventfd(unsigned int initval, int flags)') as (
  initval: number,
  flags: number,
) => number;
// epoll: the I/O thread waits on queue notifications (ioeventfds) and backend fds.
export const epollCreate1 = libc.func('int epoll_create1(int flags)') as (flags: number) => number;
export const epollCtl = libc.func('int epoll_ctl(int epfd, int op, int fd, void *event)') as (
  epfd: number,
  op: number,
  fd: number,
  event: PointerArg,
) => number;
export const epollWait = libc.func('int epoll_wait(int epfd, _Out_ void *events, int maxevents, int timeout)') as (
  epfd: number,
  events: PointerArg,
  maxevents: number,
  timeout: number,
) => number;
export const fallocate = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)') as (
  fd: number,
  mode: number,
  offset: number,
  len: number,
) => number;
export const lseek = libc.func('int64_t lseek(int fd, int64_t offset, int whence)') as (
  fd: number,
  offset: number,
  whence: number,
) => number;
export const getrandom = libc.func('intptr_t getrandom(_Out_ void *buf, size_t buflen, unsigned int flags)') as (
  buf: PointerArg,
  buflen: number,
  flags: number,
) => number;
// Unix sockets for backends on the I/O thread (passt, vsock): fds it can epoll.
export const socket = libc.func('int socket(int domain, int type, int protocol)') as (
  domain: number,
  type: number,
  protocol: number,
) => number;
export const connect = libc.func('int connect(int fd, const void *addr, uint32_t len)') as (
  fd: number,
  addr: PointerArg,
  len: number,
) => number;
export const bind = libc.func('int bind(int fd, const void *addr, uint32_t len)') as (
  fd: number,
  addr: PointerArg,
  len: number,
) => number;
export const fcntlInt = libc.func('int fcntl(int fd, int cmd, int arg)') as (
  fd: number,
  cmd: number,
  arg: number,
) => number;
export const memfdCreate = libc.func('int memfd_create(const char *name, unsigned int flags)') as (
  name: string,
  flags: number,
) => number;
export const pipe2 = libc.func('int pipe2(_Out_ int *fds, int flags)') as (fds: Int32Array, flags: number) => number;
export const socketpair = libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)') as (
  domain: number,
  type: number,
  protocol: number,
  sv: Int32Array,
) => number;
export const sendmsg = libc.func('intptr_t sendmsg(int fd, const void *msg, int flags)') as (
  fd: number,
  msg: PointerArg,
  flags: number,
) => number;
export const recvmsg = libc.func('intptr_t recvmsg(int fd, void *msg, int flags)') as (
  fd: number,
  msg: PointerArg,
  flags: number,
) => number;
export const listen = libc.func('int listen(int fd, int backlog)') as (fd: number, backlog: number) => number;
export const accept4 = libc.func('int accept4(int fd, void *addr, void *len, int flags)') as (
  fd: number,
  addr: PointerArg,
  len: PointerArg,
  flags: number,
) => number;
/** <sys/un.h>'s struct sockaddr_un. */
export const sockaddr_un = struct('sockaddr_un', [
  ['sun_family', 'u16'],
  ['sun_path', array('u8', 108)],
]);
/** struct sockaddr_un for `path` (sun_family AF_UNIX, then the NUL-terminated path); pass sockaddr_un.size as its length. */
export function sockaddrUn(path: string): Buffer {
  const bytes = Buffer.from(path);
  const room = sizeOf(sockaddr_un.typeOf('sun_path'));
  if (bytes.length >= room)
    throw new Error(`Unix socket path too long (${bytes.length} bytes, at most ${room - 1}): ${path}`);
  const addr = Buffer.alloc(sockaddr_un.size);
  addr.writeUInt16LE(AF_UNIX, sockaddr_un.offsetOf('sun_family'));
  bytes.copy(addr, sockaddr_un.offsetOf('sun_path'));
  return addr;
}
/** The 8-byte counter eventfd(2) reads and writes; preallocated, so signalling allocates nothing. */
const EVENTFD_ONE = Uint8Array.of(1, 0, 0, 0, 0, 0, 0, 0);
const EVENTFD_SINK = new Uint8Array(8);

/** Adds 1 to an eventfd's counter (wakes whoever polls it). */
export function signalEventfd(fd: number): void {
  write(fd, EVENTFD_ONE, 8);
}

// timerfd: the I/O thread's wake-ups for rate-limited devices (one per device).
export const timerfdCreate = libc.func('int timerfd_create(int clockid, int flags)') as (
  clockid: number,
  flags: number,
) => number;
export const timerfdSettime = libc.func(
  'int timerfd_settime(int fd, int flags, const void *new_value, void *old_value)',
) as (fd: number, flags: number, newValue: Buffer, oldValue: null) => number;
export const CLOCK_MONOTONIC = 1;
export const TFD_NONBLOCK = 0o4000;
export const TFD_CLOEXEC = 0o2000000;

/** Arms a timerfd to fire once, `ms` from now (0 disarms it). */
export function armTimerfd(fd: number, ms: number): void {
  const spec = Buffer.alloc(32); // struct itimerspec: interval {0, 0}, value {s, ns}
  const whole = Math.max(0, Math.ceil(ms * 1e6));
  spec.writeBigInt64LE(BigInt(Math.floor(whole / 1e9)), 16);
  spec.writeBigInt64LE(BigInt(whole % 1e9), 24);
  timerfdSettime(fd, 0, spec, null);
}

/** Resets a nonblocking eventfd's counter after it polled readable. */
export function drainEventfd(fd: number): void {
  read(fd, EVENTFD_SINK, 8);
}

export const strerror = libc.func('const char *strerror(int errnum)') as (errnum: number) => string;

// Threads and signals: used to kick a vCPU thread out of KVM_RUN.
export const pthreadSelf = libc.func('unsigned long pthread_self(void)') as () => number | bigint;
export const pthreadKill = libc.func('int pthread_kill(unsigned long thread, int sig)') as (
  thread: number | bigint,
  sig: number,
) => number;
export const pthreadSigmask = libc.func('int pthread_sigmask(int how, const void *set, _Out_ void *oldset)') as (
  how: number,
  set: PointerArg,
  oldset: PointerArg,
) => number;
export const sigemptyset = libc.func('int sigemptyset(_Out_ void *set)') as (set: PointerArg) => number;
export const sigaddset = libc.func('int sigaddset(_Inout_ void *set, int signum)') as (
  set: PointerArg,
  signum: number,
) => number;
export const sigtimedwait = libc.func('int sigtimedwait(const void *set, _Out_ void *info, const void *timeout)') as (
  set: PointerArg,
  info: PointerArg,
  timeout: PointerArg,
) => number;
export const gettid = libc.func('int gettid(void)') as () => number;
// The terminal's foreground process group, and this process's group (kiln-vmm takes its
// terminal's input only in the foreground: a background job reading it would be stopped).
export const tcgetpgrp = libc.func('int tcgetpgrp(int fd)') as (fd: number) => number;
export const getpgrp = libc.func('int getpgrp(void)') as () => number;
export const pthreadSetnameNp = libc.func('int pthread_setname_np(unsigned long thread, const char *name)') as (
  thread: number | bigint,
  name: string,
) => number;

/** errno of the last failed libc call made on this thread through koffi. */
export function errno(): number {
  return koffi.errno();
}

/**
 * Anonymous private memory whose address is known (for structs that point at other
 * memory, and buffers an ioctl writes through a pointer): the address and a view of it.
 * munmap(addr, bytes.length) frees it. Throws with errno's name on failure.
 */
export function mapAnonymous(size: number): { addr: Pointer; bytes: Uint8Array } {
  const addr = mmap(null, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (addr === MAP_FAILED) throw new Error(`cannot map ${size} bytes: ${errnoName(errno())}`);
  return { addr, bytes: new Uint8Array(view(addr, size)) };
}

/** Maps an address to an ArrayBuffer without copying (valid until munmap). */
export function view(address: Pointer, length: number): ArrayBuffer {
  return koffi.view(address, length);
}

export const O_RDONLY = 0o0;
export const O_WRONLY = 0o1;
export const O_RDWR = 0o2;
export const O_CLOEXEC = 0o2000000;
export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_HUGETLB = 0x40000;
/** MAP_HUGETLB's page size: log2(2 MiB) << MAP_HUGE_SHIFT (26). */
export const MAP_HUGE_2MB = 21 << 26;
export const MADV_HUGEPAGE = 14;
/** mmap(2) returns this on failure; koffi hands it back as an address. */
export const MAP_FAILED = 0xffff_ffff_ffff_ffffn;
export const MADV_DONTNEED = 4;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const SIG_BLOCK = 0;
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const O_NONBLOCK = 0o4000;
export const EPOLL_CTL_MOD = 3;
export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLLIN = 0x1;
export const EPOLLOUT = 0x4;
/** struct epoll_event is packed on x86-64: u32 events, u64 data. */
/** <sys/epoll.h>'s struct epoll_event: packed on x86-64 (12 bytes). Kiln keeps a slot number in data's low half. */
export const epoll_event = packedStruct('epoll_event', [
  ['events', 'u32'],
  ['data', 'u64'],
]);
export const EPOLL_EVENT_BYTES = epoll_event.size;
export const EPOLL_EVENT_EVENTS = epoll_event.offsetOf('events');
export const EPOLL_EVENT_DATA = epoll_event.offsetOf('data');
export const FALLOC_FL_KEEP_SIZE = 0x1;
export const FALLOC_FL_PUNCH_HOLE = 0x2;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const MADV_REMOVE = 9;
export const MFD_CLOEXEC = 0x1;
export const MFD_ALLOW_SEALING = 0x2;
export const MFD_HUGETLB = 0x4;
/** MFD_HUGE_2MB: log2(2 MiB) in the flags' top 6 bits, as for mmap's MAP_HUGE_2MB. */
export const MFD_HUGE_2MB = 21 << 26;
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
/** glibc's sigset_t is 1024 bits; the kernel's (what KVM_SET_SIGNAL_MASK takes) is 64. */
export const GLIBC_SIGSET_BYTES = 128;
export const KERNEL_SIGSET_BYTES = 8;

const errnoNames = new Map<number, string>(Object.entries(osConstants.errno).map(([name, value]) => [value, name]));

/** "EINVAL" for 22, or "errno 1234" for numbers this platform has no name for. */
export function errnoName(code: number): string {
  return errnoNames.get(code) ?? `errno ${code}`;
}

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const ENXIO = osConstants.errno.ENXIO;
export const EINTR = osConstants.errno.EINTR;
export const EAGAIN = osConstants.errno.EAGAIN;
export const EBUSY = osConstants.errno.EBUSY;
export const ENOENT = osConstants.errno.ENOENT;
export const EACCES = osConstants.errno.EACCES;
export const EPERM = osConstants.errno.EPERM;
export const ENOMEM = osConstants.errno.ENOMEM;
export const ENOTTY = osConstants.errno.ENOTTY;
export const EINVAL = osConstants.errno.EINVAL;

/** Pins thread `tid` (0: the caller) to the CPUs set in `mask` (a cpu_set_t). */
export const schedSetaffinity = libc.func('int sched_setaffinity(int pid, size_t cpusetsize, const void *mask)') as (
  tid: number,
  size: number,
  mask: PointerArg,
) => number;
export const schedGetaffinity = libc.func('int sched_getaffinity(int pid, size_t cpusetsize, _Out_ void *mask)') as (
  tid: number,
  size: number,
  mask: PointerArg,
) => number;

// Open file description locks (fcntl(2), F_OFD_*): held by an open file, not a process,
// so two opens in one process conflict too, and closing the fd releases them.
export const fcntlPtr = libc.func('int fcntl(int fd, int cmd, _Inout_ void *arg)') as (
  fd: number,
  cmd: number,
  arg: PointerArg,
) => number;
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
export const SEEK_SET = 0;
/** <fcntl.h>'s struct flock (x86-64). */
export const flock = struct('flock', [
  ['l_type', 'i16'],
  ['l_whence', 'i16'],
  ['l_start', 'i64'],
  ['l_len', 'i64'],
  ['l_pid', 'i32'],
]);

/** A struct flock over the whole file (start 0, length 0 = to the end) of lock type `type`. */
function wholeFileFlock(type: number): { buffer: Buffer; view: DataView } {
  const buffer = Buffer.alloc(flock.size);
  const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.length);
  flock.encode(view, 0, { l_type: type, l_whence: SEEK_SET, l_start: 0n, l_len: 0n, l_pid: 0 });
  return { buffer, view };
}

/** Takes an OFD lock of `type` (F_RDLCK, F_WRLCK) on the whole file without waiting: 0, or the errno (EAGAIN or EACCES: held elsewhere). */
export function ofdLockWholeFile(fd: number, type: number): number {
  return fcntlPtr(fd, F_OFD_SETLK, wholeFileFlock(type).buffer) === 0 ? 0 : errno();
}

/** The lock that keeps `type` from `fd`'s file: its type (F_UNLCK: none, or unknown) and pid (-1 for an OFD lock, which has no owner process). */
export function ofdConflict(fd: number, type: number): { type: number; pid: number } {
  const { buffer, view } = wholeFileFlock(type);
  if (fcntlPtr(fd, F_OFD_GETLK, buffer) !== 0) return { type: F_UNLCK, pid: -1 };
  return { type: view.getInt16(flock.offsetOf('l_type'), true), pid: view.getInt32(flock.offsetOf('l_pid'), true) };
}

// ---- seccomp (linux/seccomp.h, linux/prctl.h) ----
export const PR_SET_NO_NEW_PRIVS = 38;
export const PR_GET_NO_NEW_PRIVS = 39;
export const SECCOMP_SET_MODE_FILTER = 1;
/** Put the filter on every thread of the process, not just the caller. */
export const SECCOMP_FILTER_FLAG_TSYNC = 1;
const SYS_seccomp = 317;
koffi.struct('sock_fprog', { len: 'uint16_t', filter: 'void *' });
export const prctl = libc.func(
  'int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)',
) as (option: number, arg2: number, arg3: number, arg4: number, arg5: number) => number;
const seccompFilter = libc.func(
  'long syscall(long nr, unsigned int op, unsigned int flags, const sock_fprog *prog)',
) as (nr: number, op: number, flags: number, prog: { len: number; filter: Buffer }) => number;
/** seccomp(SECCOMP_SET_MODE_FILTER, flags, &{len, program}): 0 or -1 with errno. */
export function seccompSetFilter(program: Buffer, flags: number): number {
  return seccompFilter(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, { len: program.length / 8, filter: program });
}

// ---- jails (kiln-jailer): namespaces, mounts, credentials, exec ----
export const MS_RDONLY = 0x1;
export const MS_NOSUID = 0x2;
export const MS_NODEV = 0x4;
export const MS_NOEXEC = 0x8;
export const MS_REMOUNT = 0x20;
export const MS_BIND = 0x1000;
export const MS_REC = 0x4000;
export const MS_PRIVATE = 0x40000;
export const MS_SHARED = 0x100000;
export const MNT_DETACH = 0x2;
export const CLONE_NEWNET = 0x40000000;
export const S_IFCHR = 0o020000;
export const RLIMIT_FSIZE = 1;
export const RLIMIT_NOFILE = 7;
export const CLOSE_RANGE_CLOEXEC = 1 << 2;
const SYS_pivot_root = 155;
const SYS_close_range = 436;
const SYS_userfaultfd = 323;
export const mount = libc.func(
  'int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)',
) as (source: string | null, target: string, fstype: string | null, flags: number, data: string | null) => number;
export const umount2 = libc.func('int umount2(const char *target, int flags)') as (
  target: string,
  flags: number,
) => number;
const syscallPaths = libc.func('long syscall(long nr, const char *a, const char *b)') as (
  nr: number,
  a: string,
  b: string,
) => number;
/** pivot_root(2) (glibc has no wrapper). */
export const pivotRoot = (newRoot: string, putOld: string): number => syscallPaths(SYS_pivot_root, newRoot, putOld);
const syscallUint3 = libc.func('long syscall(long nr, unsigned int a, unsigned int b, unsigned int c)') as (
  nr: number,
  a: number,
  b: number,
  c: number,
) => number;
const syscallUintPtr = libc.func('long syscall(long nr, unsigned int a, _Inout_ void *p)') as (
  nr: number,
  a: number,
  p: Buffer,
) => number;
const syscallEnter = libc.func(
  'long syscall(long nr, int fd, unsigned int submit, unsigned int complete, unsigned int flags, void *sig, size_t size)',
) as (nr: number, fd: number, submit: number, complete: number, flags: number, sig: null, size: number) => number;
const syscallRegister = libc.func('long syscall(long nr, int fd, unsigned int op, void *arg, unsigned int count)') as (
  nr: number,
  fd: number,
  op: number,
  arg: Buffer | null,
  count: number,
) => number;
/** io_uring_setup(2), io_uring_enter(2) without a signal mask, io_uring_register(2) (glibc has no wrappers). */
export const ioUringSetup = (entries: number, params: Buffer): number => syscallUintPtr(425, entries, params);
export const ioUringEnter = (fd: number, submit: number, complete: number, flags: number): number =>
  syscallEnter(426, fd, submit, complete, flags, null, 0);
export const ioUringRegister = (fd: number, op: number, arg: Buffer | null, count: number): number =>
  syscallRegister(427, fd, op, arg, count);
/** userfaultfd(2) (glibc has no wrapper). */
export const userfaultfd = (flags: number): number => syscallUint3(SYS_userfaultfd, flags, 0, 0);
export const F_SETFD = 2;
/**
 * Makes stdin, stdout and stderr survive an execve(2): Node marks them close-on-exec at
 * startup (its child_process re-dups them; a raw exec from Node must clear the flag).
 */
export function keepStdioAcrossExec(): void {
  for (const fd of [0, 1, 2]) fcntlInt(fd, F_SETFD, 0);
}
/** close_range(2): here, to mark every fd from `first` on close-on-exec. */
export const closeRange = (first: number, last: number, flags: number): number =>
  syscallUint3(SYS_close_range, first, last, flags);
export const chroot = libc.func('int chroot(const char *path)') as (path: string) => number;
export const chdir = libc.func('int chdir(const char *path)') as (path: string) => number;
export const mknod = libc.func('int mknod(const char *path, uint32_t mode, uint64_t dev)') as (
  path: string,
  mode: number,
  dev: bigint,
) => number;
export const setns = libc.func('int setns(int fd, int nstype)') as (fd: number, nstype: number) => number;
export const setsid = libc.func('int setsid(void)') as () => number;
export const dup2 = libc.func('int dup2(int oldfd, int newfd)') as (oldfd: number, newfd: number) => number;
export const setgroups = libc.func('int setgroups(size_t size, const uint32_t *list)') as (
  size: number,
  list: Uint32Array | null,
) => number;
export const setresgid = libc.func('int setresgid(uint32_t r, uint32_t e, uint32_t s)') as (
  r: number,
  e: number,
  s: number,
) => number;
export const setresuid = libc.func('int setresuid(uint32_t r, uint32_t e, uint32_t s)') as (
  r: number,
  e: number,
  s: number,
) => number;
koffi.struct('rlimit', { rlim_cur: 'uint64_t', rlim_max: 'uint64_t' });
export const setrlimit = libc.func('int setrlimit(int resource, const rlimit *rlim)') as (
  resource: number,
  rlim: { rlim_cur: bigint; rlim_max: bigint },
) => number;
export const execve = libc.func('int execve(const char *path, const char **argv, const char **envp)') as (
  path: string,
  argv: Array<string | null>,
  envp: Array<string | null>,
) => number;
const getsockopt = libc.func(
  'int getsockopt(int fd, int level, int name, _Out_ void *value, _Inout_ uint32_t *len)',
) as (fd: number, level: number, name: number, value: Buffer, len: Uint32Array) => number;
const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
/** The credentials of a Unix socket's peer (SO_PEERCRED: struct ucred {pid, uid, gid}), or null. */
export function peerCredentials(fd: number): { pid: number; uid: number; gid: number } | null {
  const cred = Buffer.alloc(12);
  const len = Uint32Array.of(12);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, len) < 0) return null;
  return { pid: cred.readInt32LE(0), uid: cred.readUInt32LE(4), gid: cred.readUInt32LE(8) };
}
/** glibc's major(3) and minor(3) of a dev_t (as fs.Stats.rdev gives it): makedev's inverse. */
export function deviceNumbers(dev: number): { major: number; minor: number } {
  const d = BigInt(dev);
  return {
    major: Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & 0xfffff000n)),
    minor: Number((d & 0xffn) | ((d >> 12n) & 0xffffff00n)),
  };
}
/** glibc's makedev(3): minor bits 0-7 and 20-43, major bits 8-19 and 44-63. */
export const makedev = (major: number, minor: number): bigint =>
  BigInt(minor & 0xff) |
  (BigInt(major & 0xfff) << 8n) |
  (BigInt(minor & ~0xff) << 12n) |
  (BigInt(major & ~0xfff) << 32n);

const F_GETFL = 3;
const F_SETFL = 4;
/**
 * An fd for `fd`'s output that never blocks: the same fd when it is a regular file (a
 * write to one does not wait on a reader), else a private open file description via
 * /proc/self/fd (so O_NONBLOCK does not change the caller's shared stdout), else — with no
 * /proc, as in a jail, or for a socket — `fd` itself with O_NONBLOCK set.
 */
export function nonBlockingOutput(fd: number, isRegularFile: boolean): number {
  if (fd < 0 || isRegularFile) return fd;
  const own = open(`/proc/self/fd/${fd}`, O_WRONLY | O_NONBLOCK | O_CLOEXEC, 0);
  if (own >= 0) return own;
  const flags = fcntlInt(fd, F_GETFL, 0);
  if (flags >= 0) fcntlInt(fd, F_SETFL, flags | O_NONBLOCK);
  return fd;
}
