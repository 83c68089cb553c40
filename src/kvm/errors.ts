// Errors of kernel calls: they name the call and the errno, with the C library's text
// for it (which is why they live beside the FFI, not in src/errors.ts).
import { KilnError } from '../errors.js';
import { errnoName, strerror } from './libc.js';

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
