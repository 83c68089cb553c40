// The control block shared by the main thread and every vCPU thread: one
// SharedArrayBuffer of Int32 cells, read with Atomics. The main thread writes a vCPU's
// request cell and kicks the thread; the thread reports its state in its state cell.

export const VM_STATUS = 0;
export const VM_EXIT_CODE = 1;
/** Set once by the vCPU thread that installs a VM-wide compatibility fix (compat/pvm.ts). */
export const VM_COMPAT_CLAIM = 2;
/** How the guest asked to end: EXIT_KIND_EXIT (status in VM_EXIT_CODE) or EXIT_KIND_RESET. */
export const VM_EXIT_KIND = 3;
export const EXIT_KIND_EXIT = 0;
export const EXIT_KIND_RESET = 1;
const FIRST_VCPU_CELL = 4;
const CELLS_PER_VCPU = 2;

export const VM_RUNNING = 0;
export const VM_EXIT_REQUESTED = 1;

export const REQ_RUN = 0;
export const REQ_PAUSE = 1;
export const REQ_STOP = 2;
/** While paused: save the vCPU's state (snapshot/vcpu-state.ts), post it, and stay paused. */
export const REQ_SAVE = 3;

export const STATE_STARTING = 0;
export const STATE_RUNNING = 1;
export const STATE_PAUSED = 2;
export const STATE_STOPPED = 3;

export const requestCell = (vcpu: number) => FIRST_VCPU_CELL + vcpu * CELLS_PER_VCPU;
export const stateCell = (vcpu: number) => FIRST_VCPU_CELL + vcpu * CELLS_PER_VCPU + 1;

export function allocateControl(vcpus: number): SharedArrayBuffer {
  return new SharedArrayBuffer((FIRST_VCPU_CELL + vcpus * CELLS_PER_VCPU) * 4);
}

/**
 * Records that the guest asked the VM to end with `code`. The first request wins;
 * returns whether this one was it.
 */
export function requestVmExit(cells: Int32Array, code: number, kind = EXIT_KIND_EXIT): boolean {
  if (Atomics.compareExchange(cells, VM_STATUS, VM_RUNNING, VM_EXIT_REQUESTED) !== VM_RUNNING) return false;
  Atomics.store(cells, VM_EXIT_CODE, code);
  Atomics.store(cells, VM_EXIT_KIND, kind);
  return true;
}
