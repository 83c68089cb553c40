// Errors a user sees. A KilnError's message is one complete line meant for the
// terminal or an API fault_message; the CLI prints it without a stack trace.
import { errnoName, strerror } from './kvm/libc.js';

export class KilnError extends Error {
  override readonly name: string = 'KilnError';
}

/** A kernel call failed: names the call and the errno, e.g. "KVM_RUN failed: EFAULT (Bad address)". */
export class SyscallError extends KilnError {
  override readonly name: string = 'SyscallError';
  readonly code: string;

  constructor(
    readonly call: string,
    readonly errno: number,
    context?: string,
  ) {
    super(`${call} failed${context ? ` (${context})` : ''}: ${errnoName(errno)} (${strerror(errno)})`);
    this.code = errnoName(errno);
  }
}

/** An ioctl on a KVM file descriptor failed. `call` is the ioctl's <linux/kvm.h> name. */
export class KvmIoctlError extends SyscallError {
  override readonly name: string = 'KvmIoctlError';
}
