// Kiln's seccomp policy: which system calls each kind of thread may make, and the file
// format `kiln-vmm --seccomp-filter FILE` reads.
//
// Three filters, stacked as the kernel stacks them (every filter runs; the strictest
// answer wins):
// - process: a deny-list on every thread (TSYNC), installed from the main thread once the
//   VM is built and before any vCPU runs. It covers what per-thread filters cannot: the
//   main (API) thread, V8's platform threads and libuv's threadpool. Denied calls get
//   EPERM: none of them has a use in a running VMM.
// - vcpu: an allow-list on each vCPU thread, before its first KVM_RUN.
// - io: an allow-list on the I/O thread, before its first epoll_wait.
// The two allow-lists are the threads that parse guest-controlled data (port I/O, MMIO,
// virtqueues). Anything off their list kills the process (SIGSYS, exit status 159): a
// VMM that makes a call it never makes is a VMM to stop.
import * as v from 'valibot';
import { KilnError } from '../errors.js';
import { KVM } from '../kvm/ioctl.js';
import { compileFilter, encodeProgram, type ArgCondition, type FilterSpec, type SeccompAction } from './bpf.js';

export const THREAD_CATEGORIES = ['process', 'vcpu', 'io'] as const;
export type ThreadCategory = (typeof THREAD_CATEGORIES)[number];
export type SeccompPolicy = Readonly<Record<ThreadCategory, FilterSpec>>;
/** Compiled programs (struct sock_filter arrays), ready to hand to worker threads. */
export type SeccompPrograms = Readonly<Record<ThreadCategory, Uint8Array>>;

const EPERM = 1;

/** Calls a running VMM never needs; a compromised one would want them first. */
const PROCESS_DENIED = [
  'execve',
  'execveat',
  'ptrace',
  'process_vm_readv',
  'process_vm_writev',
  'mount',
  'umount2',
  'pivot_root',
  'chroot',
  'fsopen',
  'fsmount',
  'fsconfig',
  'fspick',
  'move_mount',
  'open_tree',
  'mount_setattr',
  'unshare',
  'setns',
  'kexec_load',
  'kexec_file_load',
  'init_module',
  'finit_module',
  'delete_module',
  'bpf',
  'perf_event_open',
  'keyctl',
  'add_key',
  'request_key',
  'open_by_handle_at',
  'name_to_handle_at',
  'reboot',
  'swapon',
  'swapoff',
  'acct',
  'settimeofday',
  'clock_settime',
  'adjtimex',
  'clock_adjtime',
  'iopl',
  'ioperm',
  'personality',
  // userfaultfd is not here: the API thread creates one for /snapshot/load's Uffd backend
  // (as Firecracker's VMM thread may); the vCPU and I/O threads' allow-lists lack it.
  'quotactl',
  'lookup_dcookie',
  'setuid',
  'setgid',
  'setreuid',
  'setregid',
  'setresuid',
  'setresgid',
  'setgroups',
  'setfsuid',
  'setfsgid',
  'capset',
] as const;

/** What every Node worker thread does under the hood: JS, GC, Atomics.wait, MessagePort, exit. */
const WORKER_RUNTIME = [
  'read',
  'write',
  'close',
  'futex',
  'mmap',
  'munmap',
  'mprotect',
  'madvise',
  'mremap',
  'brk',
  'epoll_wait',
  'epoll_pwait',
  'epoll_ctl',
  'getpid',
  'gettid',
  'tgkill',
  'rt_sigprocmask',
  'rt_sigreturn',
  'sched_yield',
  'sched_getaffinity',
  'clock_gettime',
  'clock_nanosleep',
  'nanosleep',
  'getrandom',
  'exit',
  'exit_group',
] as const;

const ioctlIs = (...requests: number[]) =>
  requests.map((request): { syscall: string; args: ArgCondition[] } => ({
    syscall: 'ioctl',
    args: [{ index: 1, type: 'dword', op: 'eq', val: BigInt(request) }],
  }));

/**
 * vCPU-fd ioctls (run, register state for pause and snapshots), interrupt injection from
 * devices, and ioeventfd (de)registration when the guest moves a virtio function's BAR
 * (PCI configuration writes are handled on the vCPU thread that makes them).
 */
const VCPU_IOCTLS = [
  KVM.RUN,
  KVM.GET_REGS,
  KVM.SET_REGS,
  KVM.GET_SREGS,
  KVM.SET_SREGS,
  KVM.TRANSLATE,
  KVM.GET_MSRS,
  KVM.SET_MSRS,
  KVM.GET_FPU,
  KVM.SET_FPU,
  KVM.GET_LAPIC,
  KVM.SET_LAPIC,
  KVM.GET_MP_STATE,
  KVM.SET_MP_STATE,
  KVM.GET_VCPU_EVENTS,
  KVM.SET_VCPU_EVENTS,
  // The rest of a vCPU's state, which a snapshot saves on the vCPU's thread (snapshot/vcpu-state.ts).
  KVM.GET_XSAVE,
  KVM.SET_XSAVE,
  KVM.GET_XCRS,
  KVM.SET_XCRS,
  KVM.GET_DEBUGREGS,
  KVM.SET_DEBUGREGS,
  KVM.GET_TSC_KHZ,
  KVM.SET_TSC_KHZ,
  KVM.KVMCLOCK_CTRL,
  KVM.IRQ_LINE,
  KVM.SIGNAL_MSI,
  KVM.IOEVENTFD,
];

const TUNSETOFFLOAD = 0x400454d0;

export const DEFAULT_POLICY: SeccompPolicy = {
  process: {
    mismatchAction: 'allow',
    matchAction: { errno: EPERM },
    rules: PROCESS_DENIED.map((syscall) => ({ syscall })),
  },
  vcpu: {
    mismatchAction: 'kill_process',
    matchAction: 'allow',
    rules: [
      ...WORKER_RUNTIME.map((syscall) => ({ syscall })),
      // Consuming a kick (the vCPU thread's pending SIGUSR2).
      { syscall: 'rt_sigtimedwait' },
      // The boot timer's CPU time (--boot-timer; the guest's write arrives on a vCPU thread).
      { syscall: 'getrusage' },
      ...ioctlIs(...VCPU_IOCTLS),
    ],
  },
  io: {
    mismatchAction: 'kill_process',
    matchAction: 'allow',
    rules: [
      ...WORKER_RUNTIME.map((syscall) => ({ syscall })),
      // Disk images: positioned reads and writes, flushes, discard and write-zeroes.
      ...['pread64', 'pwrite64', 'preadv', 'pwritev', 'readv', 'writev', 'fsync', 'fdatasync', 'fallocate'].map(
        (syscall) => ({ syscall }),
      ),
      // vsock's host side (connections to and from Unix sockets), passt's socket, TAP.
      ...['socket', 'connect', 'accept4', 'getsockopt', 'shutdown', 'sendmsg', 'recvmsg', 'sendto', 'recvfrom'].map(
        (syscall) => ({ syscall }),
      ),
      { syscall: 'fcntl' },
      // TAP's batches (virtio/uring.ts): entering a ring made, restricted and enabled before
      // this filter; io_uring_setup and io_uring_register stay off the list.
      { syscall: 'io_uring_enter' },
      // Rate limiters' wake-ups (each device's timerfd, made before the filter).
      { syscall: 'timerfd_settime' },
      ...ioctlIs(KVM.IRQ_LINE, KVM.SIGNAL_MSI, TUNSETOFFLOAD),
    ],
  },
};

export function compilePolicy(policy: SeccompPolicy): SeccompPrograms {
  return {
    process: encodeProgram(compileFilter(policy.process)),
    vcpu: encodeProgram(compileFilter(policy.vcpu)),
    io: encodeProgram(compileFilter(policy.io)),
  };
}

/** The default policy's programs, base64, compiled by the build into kiln-vmm's bundle (scripts/bundle.mjs). */
declare const __KILN_DEFAULT_SECCOMP__: Readonly<Record<ThreadCategory, string>> | undefined;

/**
 * The default policy compiled: kiln-vmm's bundle carries it compiled at build time
 * (compiling ~530 instructions of cold code was 5-10 ms of every start, on the main thread
 * before anything else), and unbundled code compiles it here.
 */
export function defaultPrograms(): SeccompPrograms {
  if (typeof __KILN_DEFAULT_SECCOMP__ === 'undefined') return compilePolicy(DEFAULT_POLICY);
  const built = __KILN_DEFAULT_SECCOMP__;
  return {
    process: Buffer.from(built.process, 'base64'),
    vcpu: Buffer.from(built.vcpu, 'base64'),
    io: Buffer.from(built.io, 'base64'),
  };
}

// ---- the --seccomp-filter file ----
// Firecracker's seccompiler JSON (docs/seccomp.md), with Kiln's thread categories as its
// top-level keys. Firecracker itself loads the compiled (bincode) output of
// seccompiler-bin, which is tied to its Rust types; Kiln reads the JSON and compiles it.

const actionSchema = v.union([
  v.picklist(['allow', 'kill_process', 'kill_thread', 'kill', 'trap', 'log']),
  v.strictObject({ errno: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(0xffff)) }),
  v.strictObject({ trace: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(0xffff)) }),
]);
const valueSchema = v.union([
  v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(Number.MAX_SAFE_INTEGER)),
  v.pipe(v.string(), v.regex(/^(0x[0-9a-fA-F]{1,16}|\d{1,20})$/, 'a number or a 0x hex string')),
]);
const conditionSchema = v.strictObject({
  index: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(5)),
  type: v.picklist(['dword', 'qword']),
  op: v.union([v.picklist(['eq', 'ne', 'lt', 'le', 'gt', 'ge']), v.strictObject({ masked_eq: valueSchema })]),
  val: valueSchema,
  comment: v.optional(v.string()),
});
const ruleSchema = v.strictObject({
  syscall: v.string(),
  args: v.optional(v.array(conditionSchema)),
  comment: v.optional(v.string()),
});
const filterSchema = v.strictObject({
  default_action: actionSchema,
  filter_action: actionSchema,
  filter: v.array(ruleSchema),
});
const fileSchema = v.strictObject({ process: filterSchema, vcpu: filterSchema, io: filterSchema });

const toAction = (a: v.InferOutput<typeof actionSchema>): SeccompAction => (a === 'kill' ? 'kill_thread' : a);
const toBig = (x: number | string): bigint => BigInt(x);

/** Reads a --seccomp-filter file's text into a policy; throws a KilnError naming what is wrong. */
export function parseFilterFile(text: string, path: string): SeccompPolicy {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new KilnError(
      `${path}: not a JSON seccomp filter (${(err as Error).message}); Kiln reads seccompiler's JSON format, not its compiled output`,
    );
  }
  const parsed = v.safeParse(fileSchema, json);
  if (!parsed.success) {
    const issue = parsed.issues[0];
    const where = v.getDotPath(issue) ?? '(top level)';
    throw new KilnError(
      `${path}: ${where}: ${issue.message} (a filter file has "process", "vcpu" and "io", each with default_action, filter_action and filter)`,
    );
  }
  const policy = {} as Record<ThreadCategory, FilterSpec>;
  for (const category of THREAD_CATEGORIES) {
    const f = parsed.output[category];
    policy[category] = {
      mismatchAction: toAction(f.default_action),
      matchAction: toAction(f.filter_action),
      rules: f.filter.map((rule) => ({
        syscall: rule.syscall,
        args: (rule.args ?? []).map((c) => ({
          index: c.index,
          type: c.type,
          op: typeof c.op === 'object' ? { masked_eq: toBig(c.op.masked_eq) } : c.op,
          val: toBig(c.val),
        })),
      })),
    };
    try {
      compileFilter(policy[category]);
    } catch (err) {
      throw new KilnError(`${path}: ${category}: ${(err as Error).message}`);
    }
  }
  return policy;
}

/** A policy in the --seccomp-filter file format (for `kiln-vmm --print-seccomp-filter`, a starting point for a custom one). */
export function policyToJson(policy: SeccompPolicy): string {
  const action = (a: SeccompAction) => a;
  const out: Record<string, unknown> = {};
  for (const category of THREAD_CATEGORIES) {
    const f = policy[category];
    out[category] = {
      default_action: action(f.mismatchAction),
      filter_action: action(f.matchAction),
      filter: f.rules.map((r) => ({
        syscall: r.syscall,
        ...(r.args?.length
          ? {
              args: r.args.map((c) => ({
                index: c.index,
                type: c.type,
                op: typeof c.op === 'object' ? { masked_eq: `0x${c.op.masked_eq.toString(16)}` } : c.op,
                val: `0x${c.val.toString(16)}`,
              })),
            }
          : {}),
      })),
    };
  }
  return `${JSON.stringify(out, null, 2)}\n`;
}
