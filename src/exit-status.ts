// The exit statuses of `kiln run` and `kiln-vmm`: one table, so a script reads the same
// number for the same guest ending whichever of the two ran it.
import type { VmResult } from './vm.js';

export const EXIT_OK = 0;
/** An error Kiln reports in one line (a missing file, a KVM it cannot use). */
export const EXIT_ERROR = 1;
/** A usage error: unknown flag or verb, or a configuration that does not check. */
export const EXIT_USAGE = 2;
/** The VM failed: triple fault, KVM internal error, failed entry, an unhandled exit. */
export const EXIT_VM_FAILED = 3;

/**
 * How a VM's end becomes the process's status: the guest's own (0 after an ACPI
 * poweroff or a reboot), 0 when the host stopped it or a guest without interrupts
 * halted for good, EXIT_VM_FAILED for everything else.
 */
export function vmExitStatus(result: Pick<VmResult, 'reason' | 'exitCode'>): number {
  switch (result.reason) {
    case 'guest-exit':
      return result.exitCode ?? EXIT_OK;
    case 'stopped':
    case 'hlt':
      return EXIT_OK;
    default:
      return EXIT_VM_FAILED;
  }
}
