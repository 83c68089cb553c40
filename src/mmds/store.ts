// MMDS's data store: one JSON value the API replaces (PUT /mmds) or merges into (PATCH
// /mmds, RFC 7396), which the guest reads over its NICs through the VMM's own small
// network stack (stack.ts, on the I/O thread). It lives in shared memory as JSON text
// under a sequence lock: the API thread is its only writer; a reader copies the text
// and retries if a write overlapped, so it sees the old value or the new, never a mix.
// Not saved in snapshots (as in Firecracker: a clone's metadata is seeded afresh).
import { KilnError } from '../errors.js';

// Layout: Int32 [0] the sequence (odd while a write is under way), [1] the text's length; then the text.
const SEQ = 0;
const LENGTH = 1;
const HEADER_BYTES = 8;

/** Firecracker's default limit on the data store (the API's payload limit). */
export const DEFAULT_MMDS_SIZE_LIMIT = 51200;

export class MmdsError extends KilnError {}

/** RFC 7396 JSON Merge Patch: `patch` applied to `target` (neither is changed). */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (!isObject(patch)) return patch;
  const out: Record<string, unknown> = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete out[key];
    else out[key] = mergePatch(out[key], value);
  }
  return out;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The writer's side (the VMM's API): owns the shared memory the NICs' MMDS stacks read. */
export class MmdsStore {
  readonly shared: SharedArrayBuffer;
  private readonly cells: Int32Array;
  private readonly bytes: Uint8Array;
  private value: unknown = {};

  constructor(readonly limitBytes = DEFAULT_MMDS_SIZE_LIMIT) {
    this.shared = new SharedArrayBuffer(HEADER_BYTES + limitBytes);
    this.cells = new Int32Array(this.shared, 0, 2);
    this.bytes = new Uint8Array(this.shared, HEADER_BYTES);
    this.write({});
  }

  /** The data store's whole value (GET /mmds). */
  get(): unknown {
    return this.value;
  }

  /** PUT /mmds: replaces the whole value; throws MmdsError (and changes nothing) when it does not fit. */
  put(value: unknown): void {
    this.write(value);
  }

  /** PATCH /mmds: merges `patch` into the value (RFC 7396); throws MmdsError when the result does not fit. */
  patch(patch: unknown): void {
    this.write(mergePatch(this.value, patch));
  }

  private write(value: unknown): void {
    const text = Buffer.from(JSON.stringify(value), 'utf8');
    if (text.length > this.limitBytes)
      throw new MmdsError(
        `The MMDS data store would be ${text.length} bytes, over its limit of ${this.limitBytes} bytes (--mmds-size-limit).`,
      );
    Atomics.add(this.cells, SEQ, 1);
    this.bytes.set(text);
    Atomics.store(this.cells, LENGTH, text.length);
    Atomics.add(this.cells, SEQ, 1);
    this.value = value;
  }
}

/**
 * The reader's side (a NIC's MMDS stack, on the I/O thread): the current value, parsed
 * again only when it changed.
 */
export class MmdsReader {
  private readonly cells: Int32Array;
  private readonly bytes: Uint8Array;
  private seq = -1;
  private value: unknown = {};

  constructor(shared: SharedArrayBuffer) {
    this.cells = new Int32Array(shared, 0, 2);
    this.bytes = new Uint8Array(shared, HEADER_BYTES);
  }

  get(): unknown {
    for (;;) {
      const before = Atomics.load(this.cells, SEQ);
      if (before === this.seq) return this.value;
      if (before % 2 !== 0) continue;
      const length = Atomics.load(this.cells, LENGTH);
      if (length < 0 || length > this.bytes.length) continue;
      const copy = Buffer.from(this.bytes.slice(0, length));
      if (Atomics.load(this.cells, SEQ) !== before) continue;
      this.value = JSON.parse(copy.toString('utf8')) as unknown;
      this.seq = before;
      return this.value;
    }
  }
}
