// Errors a user sees. A KilnError's message is one complete line meant for the
// terminal or an API fault_message; the CLI prints it without a stack trace. This
// module loads nothing else (no FFI): every layer, the manager's included, imports it.
// Kernel-call errors, which need the C library, are in src/kvm/errors.ts.

export class KilnError extends Error {
  override readonly name: string = 'KilnError';
}
