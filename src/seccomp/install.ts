// Loading a compiled filter onto the calling thread (or, with TSYNC, every thread).
// no_new_privs first: the kernel refuses an unprivileged filter without it, and it keeps
// an exec'd program from gaining privileges the filter was meant to deny.
import * as libc from '../kvm/libc.js';
import { KilnError } from '../errors.js';

let processProgram: Uint8Array | null = null;

/**
 * Loads the process-wide program on every thread, once: kiln-vmm does it before it serves
 * the API (so /proc shows Seccomp: 2 from the start, as integrators check), Vm.start
 * otherwise; a second call with the same program does nothing.
 */
export function installProcessFilter(program: Uint8Array): void {
  if (processProgram !== null) {
    if (Buffer.compare(processProgram, program) !== 0)
      throw new KilnError('a different process-wide seccomp filter is already installed');
    return;
  }
  installProgram(program, { allThreads: true });
  processProgram = program;
}

/** Loads a program (encoded struct sock_filter array, policy.ts) on this thread, or on every thread. */
export function installProgram(program: Uint8Array, opts: { allThreads: boolean }): void {
  if (libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) !== 0)
    throw new KilnError(`prctl(PR_SET_NO_NEW_PRIVS) failed: ${libc.errnoName(libc.errno())}`);
  const bytes = Buffer.from(program.buffer, program.byteOffset, program.byteLength);
  const rc = libc.seccompSetFilter(bytes, opts.allThreads ? libc.SECCOMP_FILTER_FLAG_TSYNC : 0);
  // With TSYNC, a positive result is the id of a thread whose filters diverge.
  if (rc !== 0)
    throw new KilnError(
      rc > 0
        ? `seccomp: thread ${rc} already has its own filter; the process-wide filter goes on first`
        : `seccomp(SET_MODE_FILTER) failed: ${libc.errnoName(libc.errno())}`,
    );
}
