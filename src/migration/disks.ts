// Disk images copied by a live migration (`copy_disks`): the source streams each disk in
// DISK_CHUNK_BYTES chunks while the guest runs, then, iteration by iteration, the chunks
// the guest changed meanwhile (the I/O thread records them: BlkOptions.written), and the
// last ones while paused; the destination writes them into an empty image of the same
// size. A DISK frame's payload: disk index (u32), length (u32), offset (two u32, low
// first), then the bytes.
import { fdatasyncSync, fstatSync, readSync, writeSync } from 'node:fs';
import * as libc from '../kvm/libc.js';
import type { AttachedVirtio } from '../platform/virtio.js';
import { DISK_CHUNK_BYTES, type BlkOptions } from '../virtio/blk.js';
import type { VirtioPciOptions } from '../virtio/pci.js';
import { MigrationError } from './wire.js';

const HEADER = 16;

/** The disks of a built VM, in configuration order (ids from `ids`). */
export function diskOptions(virtio: AttachedVirtio, ids: readonly string[]): BlkOptions[] {
  return ids.map((id) => {
    const device = virtio.disks.get(id);
    if (!device) throw new MigrationError(`the VM has no disk ${id}`);
    return (device.spec.options as VirtioPciOptions).device.options as BlkOptions;
  });
}

export const diskBytes = (d: BlkOptions): number => d.sectors * 512;

/** The source's side: which chunks to send, and the frames that carry them. */
export class DiskSource {
  private readonly records: Array<Int32Array | null>;
  private readonly zero = new Uint8Array(DISK_CHUNK_BYTES);

  constructor(private readonly disks: readonly BlkOptions[]) {
    this.records = disks.map((d) => (d.written ? new Int32Array(d.written) : null));
  }

  /** Starts recording the guest's writes (before the first pass reads anything). */
  startTracking(): void {
    for (const r of this.records) {
      if (!r) continue;
      for (let w = 1; w < r.length; w++) Atomics.store(r, w, 0);
      Atomics.store(r, 0, 1);
    }
  }

  stopTracking(): void {
    for (const r of this.records) if (r) Atomics.store(r, 0, 0);
  }

  /** Every chunk of every disk (the first pass; the sender skips those that read as zeros). */
  allChunks(): number[][] {
    return this.disks.map((d) => Array.from({ length: Math.ceil(diskBytes(d) / DISK_CHUNK_BYTES) }, (_, i) => i));
  }

  /** The chunks written since the last call (or since tracking started), cleared as read. */
  takeDirty(): number[][] {
    return this.records.map((r, disk) => {
      const out: number[] = [];
      if (!r) return out;
      const chunks = Math.ceil(diskBytes(this.disks[disk]!) / DISK_CHUNK_BYTES);
      for (let w = 1; w < r.length; w++) {
        const bits = Atomics.exchange(r, w, 0);
        if (bits === 0) continue;
        for (let b = 0; b < 32; b++) if (bits & (1 << b) && (w - 1) * 32 + b < chunks) out.push((w - 1) * 32 + b);
      }
      return out;
    });
  }

  /** The frame payload for one chunk, or null for a chunk of zeros when `skipZero` (the destination starts empty). */
  chunk(disk: number, index: number, skipZero: boolean): Buffer | null {
    const d = this.disks[disk]!;
    const offset = index * DISK_CHUNK_BYTES;
    const length = Math.min(DISK_CHUNK_BYTES, diskBytes(d) - offset);
    const out = Buffer.allocUnsafe(HEADER + length);
    let done = 0;
    while (done < length) {
      const n = readSync(d.fd, out, HEADER + done, length - done, offset + done);
      if (n <= 0) throw new MigrationError(`disk ${d.path} is shorter than the guest's disk`);
      done += n;
    }
    if (skipZero && Buffer.compare(out.subarray(HEADER), this.zero.subarray(0, length)) === 0) return null;
    out.writeUInt32LE(disk, 0);
    out.writeUInt32LE(length, 4);
    out.writeUInt32LE(offset % 2 ** 32, 8);
    out.writeUInt32LE(Math.floor(offset / 2 ** 32), 12);
    return out;
  }
}

/**
 * Checks the destination's disks can take the copy: each the source's size, and empty
 * (a sparse file with no data), so a copy never overwrites an image by mistake (the
 * source's own, on shared storage, above all).
 */
export function checkCopyTargets(disks: readonly BlkOptions[], sizes: readonly number[]): void {
  if (sizes.length !== disks.length)
    throw new MigrationError(`the source copies ${sizes.length} disk(s); this VM has ${disks.length}`);
  disks.forEach((d, i) => {
    if (d.readOnly) throw new MigrationError(`disk ${d.path} is read-only here: a copy must be written into it`);
    if (diskBytes(d) !== sizes[i])
      throw new MigrationError(`disk ${d.path} is ${diskBytes(d)} bytes here; the source's is ${sizes[i]}`);
    const data = libc.lseek(d.fd, 0, libc.SEEK_DATA);
    if (data >= 0 || libc.errno() !== libc.ENXIO)
      throw new MigrationError(
        `disk ${d.path} is not empty: a copied disk goes into an empty image of its size (truncate -s SIZE a new file)`,
      );
  });
}

/** Bytes written into a copy since it was last synced: synced along the way, so the last sync (in the downtime) is short. */
const SYNC_EVERY = 16 * 1024 * 1024;
const unsynced = new WeakMap<BlkOptions, number>();

/** Writes one DISK frame into the destination's disk, checked against its size. */
export function writeChunk(disks: readonly BlkOptions[], payload: Buffer): void {
  if (payload.length < HEADER) throw new MigrationError('a DISK frame is too short');
  const disk = payload.readUInt32LE(0);
  const length = payload.readUInt32LE(4);
  const offset = payload.readUInt32LE(8) + payload.readUInt32LE(12) * 2 ** 32;
  const d = disks[disk];
  if (!d) throw new MigrationError(`a DISK frame names disk ${disk} (of ${disks.length})`);
  if (length !== payload.length - HEADER || length > DISK_CHUNK_BYTES || offset + length > diskBytes(d))
    throw new MigrationError(`a DISK frame does not fit disk ${disk}`);
  for (let done = 0; done < length;) done += writeSync(d.fd, payload, HEADER + done, length - done, offset + done);
  const pending = (unsynced.get(d) ?? 0) + length;
  if (pending >= SYNC_EVERY) {
    fdatasyncSync(d.fd);
    unsynced.set(d, 0);
  } else unsynced.set(d, pending);
}

/** The copies on stable storage before the destination says it is ready. */
export function syncDisks(disks: readonly BlkOptions[]): void {
  for (const d of disks) if (fstatSync(d.fd).isFile()) fdatasyncSync(d.fd);
}
