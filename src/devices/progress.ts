// Boot-progress port. Test guests (and, from the Linux issue on, a test init) write
// progress codes here; the VMM keeps the last value, a count and the most recent
// values, which tests and `kiln` read from the shared state.
import { accessValue, setAccessValue, type BusDevice } from '../bus/bus.js';
import { STATE_HEADER_BYTES, type DeviceModel, type NoOptions } from './device.js';

/** How many recent values are kept, oldest overwritten first. */
export const PROGRESS_HISTORY = 64;

// Layout of the shared state, as Uint32 indexes after the header.
const COUNT = 0;
const LAST = 1;
const HISTORY = 2;
const WORDS = HISTORY + PROGRESS_HISTORY;

const words = (state: SharedArrayBuffer) => new Uint32Array(state, STATE_HEADER_BYTES, WORDS);

export const progressModel: DeviceModel<NoOptions> = {
  stateBytes: () => WORDS * 4,
  create(state): BusDevice {
    const w = words(state);
    return {
      read(_offset, data) {
        setAccessValue(data, w[LAST]!);
      },
      write(_offset, data) {
        const value = accessValue(data) >>> 0;
        w[HISTORY + (w[COUNT]! % PROGRESS_HISTORY)] = value;
        w[LAST] = value;
        Atomics.add(w, COUNT, 1);
      },
    };
  },
};

export interface ProgressSnapshot {
  readonly count: number;
  readonly last: number;
  /** The most recent values, oldest first (at most PROGRESS_HISTORY). */
  readonly recent: number[];
}

/** Reads the progress port's state from any thread. */
export function readProgress(state: SharedArrayBuffer): ProgressSnapshot {
  const w = words(state);
  const count = Atomics.load(w, COUNT);
  const kept = Math.min(count, PROGRESS_HISTORY);
  const recent: number[] = [];
  for (let i = count - kept; i < count; i++) recent.push(w[HISTORY + (i % PROGRESS_HISTORY)]!);
  return { count, last: w[LAST]!, recent };
}
