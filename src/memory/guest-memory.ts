// Guest RAM: anonymous host mappings (MAP_NORESERVE, so untouched guest pages cost
// nothing), or one shared guest memory file that a new VMM can take over
// (shared-memory.ts), or a snapshot's memory file mapped private; each region registered
// with KVM as one memory slot, and reachable from any thread
// as typed views over the same memory. A GuestMemoryDescriptor is plain data; a worker
// rebuilds the same views from it with GuestMemory.attach().
import { closeSync, readFileSync } from 'node:fs';
import { KilnError } from '../errors.js';
import { SyscallError } from '../kvm/errors.js';
import type { VmFd } from '../kvm/kvm.js';
import * as libc from '../kvm/libc.js';
import { createGuestMemoryFile, fileDataRanges } from './shared-memory.js';
import { GiB, HIGH_RAM_START, MMIO_HOLE_START, PAGE_SIZE, RAM_START } from '../layout.js';

/**
 * Largest single region (memory slot). koffi cannot view more than 4 GiB at once, and a
 * view per slot keeps translation a bounds check; 2 GiB slots keep well clear of that.
 */
export const MAX_REGION_SIZE = 2 * GiB;

export interface RegionDescriptor {
  readonly slot: number;
  readonly guestPhysAddr: number;
  readonly size: number;
  /** Host virtual address of the mapping (valid in every thread of this process). */
  readonly hostAddr: bigint;
}

export interface GuestMemoryDescriptor {
  readonly regions: readonly RegionDescriptor[];
  /**
   * Dirty-page tracking (diff snapshots, migration): 32-bit words, the first saying whether
   * Kiln is tracking, then one bit per page of RAM (the regions back to back as in the
   * memory file), set by every thread for each page Kiln itself writes while tracking (used
   * rings, block reads, received bytes, the software-KVM fix). KVM's dirty log sees only
   * the guest's writes.
   */
  readonly written?: SharedArrayBuffer;
  /**
   * The regions map one shared guest memory file (memory/shared-memory.ts) instead of
   * private memory: freeing a page (the balloon) must punch it out of that file.
   */
  readonly shared?: boolean;
}

export class GuestMemoryError extends KilnError {
  override readonly name: string = 'GuestMemoryError';
}

const hex = (n: number) => `0x${n.toString(16)}`;

/** Splits `size` bytes of RAM around the 32-bit MMIO hole into slot-sized ranges. */
export function ramRanges(size: number): Array<{ guestPhysAddr: number; size: number }> {
  const ranges: Array<{ guestPhysAddr: number; size: number }> = [];
  const low = Math.min(size, MMIO_HOLE_START - RAM_START);
  const push = (start: number, length: number) => {
    for (let at = 0; at < length; at += MAX_REGION_SIZE) {
      ranges.push({ guestPhysAddr: start + at, size: Math.min(MAX_REGION_SIZE, length - at) });
    }
  };
  push(RAM_START, low);
  if (size > low) push(HIGH_RAM_START, size - low);
  return ranges;
}

export interface HostMemoryLimits {
  /** KVM_CAP_NR_MEMSLOTS. */
  readonly memslots: number;
  /** Guest-physical address bits the host can back (the CPU's physical address width). */
  readonly physAddrBits: number;
  /**
   * Host RAM plus swap. One guest larger than this could never be backed, and KVM's own
   * per-slot bookkeeping for it (rmap arrays under shadow paging) can exhaust the host.
   */
  readonly hostBytes: number;
}

/** MemTotal + SwapTotal from /proc/meminfo (Infinity if it cannot be read). */
export { hostMemoryBytes } from '../host.js';

/**
 * The CPU's physical address width from /proc/cpuinfo; where there is no /proc (a jailed
 * VMM), from `fromCpuid` (KVM's CPUID leaf 0x80000008), else 46.
 */
export function hostPhysAddrBits(fromCpuid: () => number | null = () => null): number {
  let text: string | null = null;
  try {
    text = readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    // no /proc inside the jail: ask the CPU through KVM instead
  }
  const m = text === null ? null : /address sizes\s*:\s*(\d+) bits physical/.exec(text);
  if (m) return Number(m[1]);
  const bits = fromCpuid();
  if (bits !== null) return bits;
  process.emitWarning('cannot learn the physical address width; assuming 46 bits');
  return 46;
}

/**
 * Checks a requested guest RAM size before anything is mapped; throws one clear line
 * when it cannot be used.
 */
export function validateMemorySize(size: number, limits?: HostMemoryLimits): void {
  if (!Number.isSafeInteger(size) || size <= 0)
    throw new GuestMemoryError(`memory size must be a positive number of bytes (got ${size})`);
  if (size % PAGE_SIZE !== 0)
    throw new GuestMemoryError(`memory size ${size} bytes is not a multiple of the ${PAGE_SIZE}-byte page size`);
  if (!limits) return;
  const ranges = ramRanges(size);
  const last = ranges[ranges.length - 1]!;
  const top = last.guestPhysAddr + last.size;
  const mib = (n: number) => `${Math.floor(n / 2 ** 20)} MiB`;
  if (size > limits.hostBytes) {
    throw new GuestMemoryError(
      `memory size ${mib(size)} is larger than this host can map: it has ${mib(limits.hostBytes)} of RAM and swap`,
    );
  }
  if (top > 2 ** limits.physAddrBits) {
    const most = 2 ** limits.physAddrBits - (HIGH_RAM_START - MMIO_HOLE_START);
    throw new GuestMemoryError(
      `memory size ${mib(size)} is larger than this host can map: its ${limits.physAddrBits}-bit physical addresses allow at most ${mib(most)}`,
    );
  }
  if (ranges.length > limits.memslots) {
    throw new GuestMemoryError(
      `memory size ${mib(size)} needs ${ranges.length} KVM memory slots; this host allows ${limits.memslots}`,
    );
  }
}

/** Typed access to guest RAM. Every access is checked to lie inside one region. */
export class GuestMemory {
  readonly regions: readonly RegionDescriptor[];
  private readonly bytes: Uint8Array[];
  private readonly views: DataView[];
  private readonly halves: Uint16Array[];
  /** Kiln's own writes (descriptor.written), or null when not tracking. */
  private readonly written: Int32Array | null;
  /** Index of each region's first page among all pages (the bit of its first page). */
  private readonly firstPage: number[];
  /** Each region's host address as a number (exact: user addresses are below 2^47), for iovecs. */
  readonly hostBase: Float64Array;

  protected constructor(
    readonly descriptor: GuestMemoryDescriptor,
    /** The shared guest memory file the regions map, where this thread has it open; else null. */
    readonly memoryFd: number | null = null,
  ) {
    this.regions = descriptor.regions;
    const buffers = this.regions.map((r) => libc.view(r.hostAddr, r.size));
    this.bytes = buffers.map((b) => new Uint8Array(b));
    this.views = buffers.map((b) => new DataView(b));
    this.halves = buffers.map((b) => new Uint16Array(b));
    this.written = descriptor.written ? new Int32Array(descriptor.written) : null;
    this.hostBase = Float64Array.from(this.regions, (r) => Number(r.hostAddr));
    let page = 0;
    this.firstPage = this.regions.map((r) => {
      const first = page;
      page += r.size / PAGE_SIZE;
      return first;
    });
  }

  /** The size of descriptor.written for `size` bytes of RAM: the flag word, then whole 32-bit words of bits. */
  static writtenBitmapBytes(size: number): number {
    return 4 + Math.ceil(size / PAGE_SIZE / 32) * 4;
  }

  /** Whether RAM is a shared guest memory file (descriptor.shared). */
  get shared(): boolean {
    return this.descriptor.shared === true;
  }

  /** Whether Kiln's own writes are being recorded (by any thread: the flag is shared). */
  get recordingWrites(): boolean {
    return this.written !== null && Atomics.load(this.written, 0) !== 0;
  }

  /** Starts recording Kiln's own writes, for every thread, with a clean record. */
  startRecordingWrites(): void {
    const bits = this.written;
    if (bits === null) throw new GuestMemoryError('this guest memory cannot track writes');
    for (let w = 1; w < bits.length; w++) Atomics.store(bits, w, 0);
    Atomics.store(bits, 0, 1);
  }

  /**
   * Records that Kiln wrote [offset, offset+length) of region `region` (a no-op when not
   * tracking). The typed writers below call it; code that writes through regionBytes()
   * or slice() calls it itself.
   */
  markWritten(region: number, offset: number, length: number): void {
    const bits = this.written;
    if (bits === null || length <= 0 || Atomics.load(bits, 0) === 0) return;
    const base = this.firstPage[region]!;
    const last = base + Math.floor((offset + length - 1) / PAGE_SIZE);
    for (let p = base + Math.floor(offset / PAGE_SIZE); p <= last; p++) Atomics.or(bits, 1 + (p >>> 5), 1 << (p & 31));
  }

  /**
   * Takes region `region`'s record of Kiln's writes and clears it: one bit per page, in
   * `into` (bytes, least significant bit first, as KVM's dirty log), OR-ed in.
   */
  takeWritten(region: number, into: Uint8Array): void {
    const bits = this.written;
    if (bits === null) return;
    const base = this.firstPage[region]!;
    const pages = this.regions[region]!.size / PAGE_SIZE;
    for (let p = 0; p < pages;) {
      const at = base + p;
      const word = 1 + (at >>> 5);
      const shift = at & 31;
      const span = Math.min(32 - shift, pages - p);
      const mask = span === 32 ? -1 : ((1 << span) - 1) << shift;
      const taken = Atomics.and(bits, word, ~mask) & mask;
      if (taken !== 0)
        for (let b = 0; b < span; b++)
          if (taken & (1 << (shift + b))) into[(p + b) >>> 3] = into[(p + b) >>> 3]! | (1 << ((p + b) & 7));
      p += span;
    }
  }

  /**
   * The parts of region `i` that hold pages (offsets in the region), or null when every
   * page must be looked at. Only a shared memory file knows (its holes): reading a hole of
   * one allocates a page, where reading untouched private memory maps the zero page, so
   * whole-memory scans (a Full snapshot, a migration's first pass) skip what this leaves out.
   */
  allocatedRanges(i: number): Array<{ offset: number; length: number }> | null {
    if (this.memoryFd === null || this.closed) return null;
    const start = this.firstPage[i]! * PAGE_SIZE;
    return fileDataRanges(this.memoryFd, start, start + this.regions[i]!.size).map((r) => ({
      offset: r.offset - start,
      length: r.length,
    }));
  }

  /** Whether the memory is gone (OwnedGuestMemory.destroy). */
  protected get closed(): boolean {
    return false;
  }

  /**
   * Builds views over memory mapped elsewhere in this process (another thread), with the
   * shared guest memory file's fd where the caller has it (for allocatedRanges).
   */
  static attach(descriptor: GuestMemoryDescriptor, memoryFd: number | null = null): GuestMemory {
    return new GuestMemory(descriptor, memoryFd);
  }

  get totalSize(): number {
    return this.regions.reduce((sum, r) => sum + r.size, 0);
  }

  /** Index of the region holding [gpa, gpa+length), or -1. */
  findRegion(gpa: number, length: number): number {
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i]!;
      if (gpa >= r.guestPhysAddr && gpa < r.guestPhysAddr + r.size) {
        return gpa + length <= r.guestPhysAddr + r.size ? i : -1;
      }
    }
    return -1;
  }

  private locate(gpa: number, length: number): number {
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new GuestMemoryError(`bad guest memory access: ${length} bytes at ${gpa}`);
    }
    const index = this.findRegion(gpa, length);
    if (index >= 0) return index;
    const start = this.findRegion(gpa, 0);
    if (start >= 0) {
      throw new GuestMemoryError(
        `guest access of ${length} bytes at ${hex(gpa)} crosses the end of the RAM region at ${hex(this.regions[start]!.guestPhysAddr)}`,
      );
    }
    throw new GuestMemoryError(`guest address ${hex(gpa)} is not RAM`);
  }

  /** A zero-copy window onto [gpa, gpa+length). */
  slice(gpa: number, length: number): Uint8Array {
    const i = this.locate(gpa, length);
    const offset = gpa - this.regions[i]!.guestPhysAddr;
    return this.bytes[i]!.subarray(offset, offset + length);
  }

  /** A copy of [gpa, gpa+length). */
  read(gpa: number, length: number): Uint8Array {
    return Uint8Array.from(this.slice(gpa, length));
  }

  write(gpa: number, data: Uint8Array): void {
    this.slice(gpa, data.length).set(data);
    this.markWrittenAt(gpa, data.length);
  }

  fill(gpa: number, length: number, value: number): void {
    this.slice(gpa, length).fill(value);
    this.markWrittenAt(gpa, length);
  }

  /** markWritten for a guest-physical range already checked to lie in one region. */
  private markWrittenAt(gpa: number, length: number): void {
    if (!this.recordingWrites) return;
    const i = this.findRegion(gpa, length);
    this.markWritten(i, gpa - this.regions[i]!.guestPhysAddr, length);
  }

  /** The whole of region `i`, for zero-copy I/O at an offset found with findRegion. */
  regionBytes(i: number): Uint8Array {
    return this.bytes[i]!;
  }

  /**
   * A 16-bit load/store with a full barrier (Atomics), for ring indexes shared with the
   * guest: the device must see descriptors before it reads past avail.idx, and the
   * guest must see used entries before used.idx moves (virtio 1.2, 2.7.13.3.1).
   */
  loadU16Ordered(gpa: number): number {
    const i = this.locate(gpa, 2);
    if (gpa % 2 !== 0) throw new GuestMemoryError(`unaligned ring index at ${hex(gpa)}`);
    return Atomics.load(this.halves[i]!, this.offsetIn(i, gpa) >> 1);
  }

  storeU16Ordered(gpa: number, value: number): void {
    const i = this.locate(gpa, 2);
    if (gpa % 2 !== 0) throw new GuestMemoryError(`unaligned ring index at ${hex(gpa)}`);
    Atomics.store(this.halves[i]!, this.offsetIn(i, gpa) >> 1, value);
    this.markWritten(i, this.offsetIn(i, gpa), 2);
  }

  // The scalar accessors below allocate nothing: virtqueue processing calls them per descriptor.
  private offsetIn(i: number, gpa: number): number {
    return gpa - this.regions[i]!.guestPhysAddr;
  }

  readU8(gpa: number): number {
    const i = this.locate(gpa, 1);
    return this.views[i]!.getUint8(this.offsetIn(i, gpa));
  }
  readU16(gpa: number): number {
    const i = this.locate(gpa, 2);
    return this.views[i]!.getUint16(this.offsetIn(i, gpa), true);
  }
  readU32(gpa: number): number {
    const i = this.locate(gpa, 4);
    return this.views[i]!.getUint32(this.offsetIn(i, gpa), true);
  }
  readU64(gpa: number): bigint {
    const i = this.locate(gpa, 8);
    return this.views[i]!.getBigUint64(this.offsetIn(i, gpa), true);
  }
  writeU8(gpa: number, value: number): void {
    const i = this.locate(gpa, 1);
    this.views[i]!.setUint8(this.offsetIn(i, gpa), value);
    this.markWritten(i, this.offsetIn(i, gpa), 1);
  }
  writeU16(gpa: number, value: number): void {
    const i = this.locate(gpa, 2);
    this.views[i]!.setUint16(this.offsetIn(i, gpa), value, true);
    this.markWritten(i, this.offsetIn(i, gpa), 2);
  }
  writeU32(gpa: number, value: number): void {
    const i = this.locate(gpa, 4);
    this.views[i]!.setUint32(this.offsetIn(i, gpa), value, true);
    this.markWritten(i, this.offsetIn(i, gpa), 4);
  }
  writeU64(gpa: number, value: bigint): void {
    const i = this.locate(gpa, 8);
    this.views[i]!.setBigUint64(this.offsetIn(i, gpa), BigInt.asUintN(64, value), true);
    this.markWritten(i, this.offsetIn(i, gpa), 8);
  }
}

/** kvm_userspace_memory_region.flags: log the guest's writes to this slot (KVM_GET_DIRTY_LOG). */
export const KVM_MEM_LOG_DIRTY_PAGES = 1;

/** Guest memory this thread mapped and registered; destroy() unmaps it. */
/** Huge pages for guest RAM (Firecracker's huge_pages). */
export type HugePages = 'None' | 'Transparent' | '2M';

export class OwnedGuestMemory extends GuestMemory {
  private destroyed = false;

  private constructor(
    descriptor: GuestMemoryDescriptor,
    private readonly vm: VmFd,
    /** The shared guest memory file the regions map (open while they are, closed by destroy), or null. */
    memoryFd: number | null,
  ) {
    super(descriptor, memoryFd);
  }

  protected override get closed(): boolean {
    return this.destroyed;
  }

  /**
   * Whether KVM logs the guest's writes and Kiln records its own (create's trackDirty, or
   * startTracking): the two start together, so the shared flag says it for both.
   */
  get tracking(): boolean {
    return this.recordingWrites;
  }

  /**
   * Starts tracking dirty pages on a running VM (its vCPUs outside KVM_RUN): each slot
   * registered again with KVM_MEM_LOG_DIRTY_PAGES (KVM allows a slot's flags to change),
   * Kiln's own record started clean. From here on, takeDirtyPages-style reads see every
   * write.
   */
  startTracking(): void {
    if (this.tracking) return;
    for (const r of this.regions)
      this.vm.setUserMemoryRegion({
        slot: r.slot,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guestPhysAddr: BigInt(r.guestPhysAddr),
        memorySize: BigInt(r.size),
        userspaceAddr: r.hostAddr,
      });
    this.startRecordingWrites();
  }

  /**
   * Maps `size` bytes of RAM (split around the MMIO hole) and registers each region
   * with the VM. On any failure, everything mapped so far is unmapped again. With
   * `backingFd`, the regions map that file back to back (a snapshot's memory file). With
   * `trackDirty`, KVM logs the guest's writes to each slot (KVM_MEM_LOG_DIRTY_PAGES) and
   * Kiln's own writes are recorded beside (descriptor.written): diff snapshots. With
   * `shared`, RAM is a shared guest memory file instead of private memory: `sharedFd`'s
   * (another VMM's, handed over by kiln upgrade; this memory keeps it open), or a new one.
   */
  static create(
    vm: VmFd,
    size: number,
    limits: HostMemoryLimits,
    opts: {
      backingFd?: number;
      trackDirty?: boolean;
      hugePages?: HugePages;
      shared?: boolean;
      sharedFd?: number;
    } = {},
  ): OwnedGuestMemory {
    validateMemorySize(size, limits);
    const shared = (opts.shared === true || opts.sharedFd !== undefined) && (opts.backingFd ?? -1) < 0;
    let memoryFd: number | null = null;
    if (shared) memoryFd = opts.sharedFd ?? createGuestMemoryFile(size, opts.hugePages === '2M');
    const backingFd = memoryFd ?? opts.backingFd ?? -1;
    const regions: RegionDescriptor[] = [];
    let fileOffset = 0;
    try {
      ramRanges(size).forEach((range, slot) => {
        // From a snapshot's memory file: a private mapping, so pages come in as the guest
        // touches them and its writes never reach the file.
        // Explicit 2 MiB pages come from the host's hugetlb pool (anonymous memory only: a
        // snapshot's memory file is an ordinary file).
        // A shared guest memory file is a memfd: MAP_SHARED, its own hugetlb flag at creation.
        const hugetlb = opts.hugePages === '2M' && backingFd < 0;
        const hostAddr = libc.mmap(
          null,
          range.size,
          libc.PROT_READ | libc.PROT_WRITE,
          (shared ? libc.MAP_SHARED : libc.MAP_PRIVATE) |
            libc.MAP_NORESERVE |
            (backingFd < 0 ? libc.MAP_ANONYMOUS : 0) |
            (hugetlb ? libc.MAP_HUGETLB | libc.MAP_HUGE_2MB : 0),
          backingFd,
          backingFd < 0 ? 0 : fileOffset,
        );
        fileOffset += range.size;
        if (hostAddr === libc.MAP_FAILED) {
          const e = libc.errno();
          if (e === libc.ENOMEM) {
            throw new GuestMemoryError(
              hugetlb
                ? `cannot map ${size} bytes of guest memory in 2 MiB huge pages: the host's pool has too few free (ENOMEM; see vm.nr_hugepages)`
                : `cannot map ${size} bytes of guest memory: the host has no room for it (ENOMEM)`,
            );
          }
          throw new SyscallError('mmap', e, `${range.size} bytes of guest memory`);
        }
        // Transparent huge pages: the host may back the guest's RAM with 2 MiB pages where
        // it can (THP in "madvise" mode needs asking; in "always" it does so anyway).
        // (For a shared file, when the host's shmem_enabled allows it.)
        if (opts.hugePages === 'Transparent' && (backingFd < 0 || shared))
          libc.madvise(hostAddr, range.size, libc.MADV_HUGEPAGE);
        regions.push({ slot, guestPhysAddr: range.guestPhysAddr, size: range.size, hostAddr });
        vm.setUserMemoryRegion({
          slot,
          flags: opts.trackDirty ? KVM_MEM_LOG_DIRTY_PAGES : 0,
          guestPhysAddr: BigInt(range.guestPhysAddr),
          memorySize: BigInt(range.size),
          userspaceAddr: hostAddr,
        });
      });
    } catch (err) {
      for (const r of regions) libc.munmap(r.hostAddr, r.size);
      if (memoryFd !== null) closeSync(memoryFd);
      throw err;
    }
    const memory = new OwnedGuestMemory(
      { regions, written: new SharedArrayBuffer(GuestMemory.writtenBitmapBytes(size)), shared },
      vm,
      memoryFd,
    );
    if (opts.trackDirty) memory.startRecordingWrites();
    return memory;
  }

  /** Unmaps every region. The VM must be closed (or the slots removed) first. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const r of this.regions) libc.munmap(r.hostAddr, r.size);
    if (this.memoryFd !== null) closeSync(this.memoryFd);
  }
}
