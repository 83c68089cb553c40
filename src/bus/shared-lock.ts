// A mutex over one Int32 of shared memory, usable from the main thread and every
// worker (futex-style: 0 free, 1 held, 2 held with waiters). Device state shared
// between vCPU threads is guarded by one of these, as a Mutex guards a device in
// Cloud Hypervisor or Firecracker.
const FREE = 0;
const HELD = 1;
const CONTENDED = 2;

export class SharedLock {
  constructor(
    private readonly cells: Int32Array,
    private readonly index: number,
  ) {}

  lock(): void {
    let c = Atomics.compareExchange(this.cells, this.index, FREE, HELD);
    if (c === FREE) return;
    if (c !== CONTENDED) c = Atomics.exchange(this.cells, this.index, CONTENDED);
    while (c !== FREE) {
      Atomics.wait(this.cells, this.index, CONTENDED);
      c = Atomics.exchange(this.cells, this.index, CONTENDED);
    }
  }

  unlock(): void {
    if (Atomics.sub(this.cells, this.index, 1) !== HELD) {
      Atomics.store(this.cells, this.index, FREE);
      Atomics.notify(this.cells, this.index, 1);
    }
  }
}
