// Host -> I/O-thread requests for one device (a disk's new backing file, a balloon's
// new target): a typed mailbox in the device's shared state, declared with the struct
// codec. The one rule for such requests (docs/ARCHITECTURE.md, shared memory):
// the host writes the payload, then publishes it with an Atomics.store of a sequence
// word, then signals the device's control eventfd. The sequence is a seqlock: odd while
// the host writes, so the I/O thread never reads half a payload, and a changed value
// tells the I/O thread there is something new. The host is the only writer.
import { struct, type Scalar, type StructType } from '../kvm/struct.js';

type Payload<F extends Record<string, Scalar>> = { [K in keyof F]: F[K] extends 'u64' | 'i64' ? bigint : number };

export class MailboxLayout<F extends Record<string, Scalar>> {
  readonly type: StructType;

  constructor(
    name: string,
    readonly fields: F,
  ) {
    // The sequence word first: Atomics need an aligned Int32Array element.
    this.type = struct(name, [['sequence', 'i32'], ['_pad', 'u32'], ...Object.entries(fields)]);
  }

  get bytes(): number {
    return this.type.size;
  }

  /** A mailbox over `bytes` of shared state at `offset` (8-byte aligned). */
  open(state: SharedArrayBuffer, offset: number): Mailbox<F> {
    return new Mailbox(this, state, offset);
  }
}

export class Mailbox<F extends Record<string, Scalar>> {
  private readonly sequence: Int32Array;
  private readonly view: DataView;
  /** The reader's last sequence seen. */
  private seen = 0;

  constructor(
    private readonly layout: MailboxLayout<F>,
    state: SharedArrayBuffer,
    offset: number,
  ) {
    if (offset % 8 !== 0) throw new RangeError(`a mailbox must be 8-byte aligned (offset ${offset})`);
    this.sequence = new Int32Array(state, offset, 1);
    this.view = new DataView(state, offset, layout.bytes);
  }

  /** Host side: publishes `payload` (the caller then signals the control eventfd). */
  post(payload: Payload<F>): void {
    const s = Atomics.load(this.sequence, 0);
    Atomics.store(this.sequence, 0, s + 1); // odd: being written
    this.layout.type.encode(this.view, 0, payload);
    Atomics.store(this.sequence, 0, s + 2); // even: published
  }

  /** I/O side: the newest payload posted since the last take, or null. */
  take(): Payload<F> | null {
    for (;;) {
      const before = Atomics.load(this.sequence, 0);
      if (before === this.seen) return null;
      if (before & 1) continue; // the host is writing (a few stores): wait for it
      const decoded = this.layout.type.decode(this.view, 0) as unknown as Payload<F>;
      if (Atomics.load(this.sequence, 0) !== before) continue;
      this.seen = before;
      return decoded;
    }
  }

  /** I/O side: whether something was posted that has not been taken. */
  get pending(): boolean {
    return Atomics.load(this.sequence, 0) !== this.seen;
  }
}
