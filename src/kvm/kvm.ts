// Thin, typed wrappers over the three kinds of KVM file descriptor: the system
// (/dev/kvm), a VM and a vCPU. Every failing ioctl becomes a KvmIoctlError that names it.
import { KilnError } from '../errors.js';
import { KvmIoctlError, SyscallError } from './errors.js';
import { KVM, KVM_API_VERSION, KVM_CAP, KVM_PIT_SPEAKER_DUMMY, KVM_STATE_BYTES, type KvmIoctlName } from './ioctl.js';
import * as libc from './libc.js';
import { dataView, type Decoded, type StructType } from './struct.js';
import * as s from './structs.js';

/** Where Kiln looks for KVM; KILN_KVM_DEVICE overrides it (used by tests of bad hosts). */
export function kvmDevicePath(): string {
  return process.env.KILN_KVM_DEVICE ?? '/dev/kvm';
}

/** Rejects any KVM API version but the stable one (12, since Linux 2.6.22). */
export function checkApiVersion(version: number, path: string): void {
  if (version !== KVM_API_VERSION) {
    throw new KilnError(`${path} speaks KVM API version ${version}; Kiln needs version ${KVM_API_VERSION}`);
  }
}

function ioctlFailed(name: KvmIoctlName, context?: string): never {
  throw new KvmIoctlError(`KVM_${name}`, libc.errno(), context);
}

/** ioctl with an integer argument; returns the kernel's non-negative result. */
export function ioctlInt(fd: number, name: KvmIoctlName, arg = 0): number {
  const r = libc.ioctlInt(fd, KVM[name], arg);
  if (r < 0) ioctlFailed(name);
  return r;
}

/** ioctl with a pointer to a buffer the kernel reads and/or fills. */
export function ioctlBuf(fd: number, name: KvmIoctlName, buf: libc.PointerArg, context?: string): number {
  const r = libc.ioctlPtr(fd, KVM[name], buf);
  if (r < 0) ioctlFailed(name, context);
  return r;
}

/** Encodes `value` into a fresh struct buffer and passes it to the ioctl. */
function ioctlIn(fd: number, name: KvmIoctlName, type: StructType, value: Decoded): void {
  const buf = type.alloc();
  type.encode(dataView(buf), 0, value);
  ioctlBuf(fd, name, buf);
}

/** Passes a zeroed struct buffer to the ioctl and decodes what the kernel wrote. */
function ioctlOut(fd: number, name: KvmIoctlName, type: StructType): Decoded {
  const buf = type.alloc();
  ioctlBuf(fd, name, buf);
  return type.decode(dataView(buf));
}

/** An ioctl that fills `bytes` bytes of state Kiln keeps opaque (snapshots). */
export function ioctlGetBytes(fd: number, name: KvmIoctlName, bytes: number, prefix?: Uint8Array): Uint8Array {
  const buf = Buffer.alloc(bytes);
  if (prefix) buf.set(prefix);
  ioctlBuf(fd, name, buf);
  return new Uint8Array(buf.buffer, buf.byteOffset, bytes);
}

/** An ioctl that reads `data` (state saved by ioctlGetBytes). */
export function ioctlSetBytes(fd: number, name: KvmIoctlName, data: Uint8Array, bytes: number): void {
  if (data.length !== bytes) throw new KilnError(`KVM_${name}: ${data.length} bytes of state, expected ${bytes}`);
  ioctlBuf(fd, name, Buffer.from(data));
}

/** What the host's KVM answers the same way all process long, asked once (a VMM waiting for its API asks ahead). */
const hostAnswers: { mmapSize?: number; msrs?: readonly number[] } = {};

export class KvmSystem {
  private constructor(
    readonly fd: number,
    readonly path: string,
  ) {}

  static open(path = kvmDevicePath()): KvmSystem {
    const fd = libc.open(path, libc.O_RDWR | libc.O_CLOEXEC, 0);
    if (fd < 0) {
      const e = libc.errno();
      if (e === libc.ENOENT) {
        throw new KilnError(
          `${path} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable virtualization in the firmware)`,
        );
      }
      if (e === libc.EACCES || e === libc.EPERM) {
        throw new KilnError(
          `permission denied opening ${path}: run as root or add your user to the group that owns it (usually 'kvm')`,
        );
      }
      throw new SyscallError('open', e, path);
    }
    const system = new KvmSystem(fd, path);
    try {
      const version = libc.ioctlInt(fd, KVM.GET_API_VERSION, 0);
      if (version < 0) {
        const e = libc.errno();
        if (e === libc.ENOTTY || e === libc.EINVAL)
          throw new KilnError(`${path} is not a KVM device (it does not answer KVM_GET_API_VERSION)`);
        throw new KvmIoctlError('KVM_GET_API_VERSION', e, path);
      }
      checkApiVersion(version, path);
    } catch (err) {
      system.close();
      throw err;
    }
    return system;
  }

  checkExtension(cap: number): number {
    const r = libc.ioctlInt(this.fd, KVM.CHECK_EXTENSION, cap);
    return r < 0 ? 0 : r;
  }

  /** Recommended and hard vCPU limits per VM (KVM_CAP_NR_VCPUS, KVM_CAP_MAX_VCPUS). */
  vcpuLimits(): { recommended: number; max: number } {
    const recommended = this.checkExtension(KVM_CAP.NR_VCPUS) || 4;
    const max = this.checkExtension(KVM_CAP.MAX_VCPUS) || recommended;
    return { recommended, max };
  }

  vcpuMmapSize(): number {
    hostAnswers.mmapSize ??= ioctlInt(this.fd, 'GET_VCPU_MMAP_SIZE');
    return hostAnswers.mmapSize;
  }

  /** KVM_GET_MSR_INDEX_LIST: every MSR KVM saves and restores for a vCPU (asked once a process). */
  msrIndexList(): number[] {
    hostAnswers.msrs ??= this.queryMsrIndexList();
    return [...hostAnswers.msrs];
  }

  private queryMsrIndexList(): number[] {
    const probe = s.kvm_msr_list.alloc();
    // E2BIG, with nmsrs set to the count, when the buffer is too small.
    libc.ioctlPtr(this.fd, KVM.GET_MSR_INDEX_LIST, probe);
    const count = probe.readUInt32LE(0);
    const buf = s.kvm_msr_list.alloc(count);
    buf.writeUInt32LE(count, 0);
    ioctlBuf(this.fd, 'GET_MSR_INDEX_LIST', buf);
    const n = buf.readUInt32LE(0);
    return Array.from({ length: n }, (_, i) => buf.readUInt32LE(s.kvm_msr_list.flexOffset + 4 * i));
  }

  createVm(): VmFd {
    return new VmFd(ioctlInt(this.fd, 'CREATE_VM'));
  }

  close(): void {
    libc.close(this.fd);
  }
}

export class VmFd {
  constructor(readonly fd: number) {}

  setUserMemoryRegion(region: {
    slot: number;
    flags: number;
    guestPhysAddr: bigint;
    memorySize: bigint;
    userspaceAddr: bigint;
  }): void {
    const buf = s.kvm_userspace_memory_region.alloc();
    s.kvm_userspace_memory_region.encode(dataView(buf), 0, {
      slot: region.slot,
      flags: region.flags,
      guest_phys_addr: region.guestPhysAddr,
      memory_size: region.memorySize,
      userspace_addr: region.userspaceAddr,
    });
    ioctlBuf(this.fd, 'SET_USER_MEMORY_REGION', buf, `slot ${region.slot} at 0x${region.guestPhysAddr.toString(16)}`);
  }

  /**
   * KVM_GET_DIRTY_LOG: the pages of memory slot `slot` the guest wrote since the last
   * call (or since the slot was registered with KVM_MEM_LOG_DIRTY_PAGES), one bit per
   * page, written at `bitmap` (host memory of at least ceil(pages / 64) * 8 bytes); KVM
   * clears its log as it reports it.
   */
  getDirtyLog(slot: number, bitmap: bigint): void {
    // struct kvm_dirty_log { __u32 slot; __u32 padding1; union { void *dirty_bitmap; __u64 padding2; }; }
    const buf = Buffer.alloc(16);
    buf.writeUInt32LE(slot, 0);
    buf.writeBigUInt64LE(bitmap, 8);
    ioctlBuf(this.fd, 'GET_DIRTY_LOG', buf, `slot ${slot}`);
  }

  createVcpu(id: number): number {
    return ioctlInt(this.fd, 'CREATE_VCPU', id);
  }

  setTssAddr(addr: number): void {
    ioctlInt(this.fd, 'SET_TSS_ADDR', addr);
  }

  createIrqchip(): void {
    ioctlInt(this.fd, 'CREATE_IRQCHIP');
  }

  /** The in-kernel PIT; with KVM_PIT_SPEAKER_DUMMY KVM also answers port 0x61 itself. */
  createPit2(): void {
    ioctlIn(this.fd, 'CREATE_PIT2', s.kvm_pit_config, { flags: KVM_PIT_SPEAKER_DUMMY });
  }

  irqLine(irq: number, level: 0 | 1): void {
    ioctlIn(this.fd, 'IRQ_LINE', s.kvm_irq_level, { irq, level });
  }

  irqfd(fd: number, gsi: number, flags = 0): void {
    ioctlIn(this.fd, 'IRQFD', s.kvm_irqfd, { fd, gsi, flags });
  }

  ioeventfd(value: { fd: number; addr: bigint; len: number; flags: number; datamatch?: bigint }): void {
    ioctlIn(this.fd, 'IOEVENTFD', s.kvm_ioeventfd, {
      fd: value.fd,
      addr: value.addr,
      len: value.len,
      flags: value.flags,
      datamatch: value.datamatch ?? 0n,
    });
  }

  /** KVM_GET_IRQCHIP: chip 0 the master PIC, 1 the slave, 2 the IOAPIC (kvm_irqchip bytes). */
  getIrqchip(chip: 0 | 1 | 2): Uint8Array {
    return ioctlGetBytes(this.fd, 'GET_IRQCHIP', KVM_STATE_BYTES.irqchip, new Uint8Array([chip]));
  }

  setIrqchip(state: Uint8Array): void {
    ioctlSetBytes(this.fd, 'SET_IRQCHIP', state, KVM_STATE_BYTES.irqchip);
  }

  getPit2(): Uint8Array {
    return ioctlGetBytes(this.fd, 'GET_PIT2', KVM_STATE_BYTES.pit2);
  }

  setPit2(state: Uint8Array): void {
    ioctlSetBytes(this.fd, 'SET_PIT2', state, KVM_STATE_BYTES.pit2);
  }

  /** KVM_GET_CLOCK (kvm_clock_data: the kvmclock's ns, flags, realtime, host TSC). */
  getClock(): Uint8Array {
    return ioctlGetBytes(this.fd, 'GET_CLOCK', KVM_STATE_BYTES.clock);
  }

  /** KVM_SET_CLOCK with the saved clock value moved on by `advanceNs`; flags cleared (no KVM_CLOCK_REALTIME). */
  setClock(state: Uint8Array, advanceNs = 0n): void {
    const data = Buffer.from(state);
    data.writeBigUInt64LE(BigInt.asUintN(64, data.readBigUInt64LE(0) + advanceNs), 0);
    data.writeUInt32LE(0, 8);
    ioctlSetBytes(this.fd, 'SET_CLOCK', data, KVM_STATE_BYTES.clock);
  }

  signalMsi(addressLo: number, addressHi: number, data: number): number {
    const buf = s.kvm_msi.alloc();
    s.kvm_msi.encode(dataView(buf), 0, { address_lo: addressLo, address_hi: addressHi, data });
    return ioctlBuf(this.fd, 'SIGNAL_MSI', buf);
  }

  close(): void {
    libc.close(this.fd);
  }
}

/** Register-level access to a vCPU; used while its thread is not inside KVM_RUN. */
export class VcpuFd {
  constructor(readonly fd: number) {}

  getRegs(): Decoded {
    return ioctlOut(this.fd, 'GET_REGS', s.kvm_regs);
  }

  setRegs(regs: Decoded): void {
    ioctlIn(this.fd, 'SET_REGS', s.kvm_regs, regs);
  }

  getSregs(): Decoded {
    return ioctlOut(this.fd, 'GET_SREGS', s.kvm_sregs);
  }

  /** Read-modify-write: fields not given keep the values KVM reports. */
  updateSregs(change: (sregs: Decoded) => Decoded): void {
    ioctlIn(this.fd, 'SET_SREGS', s.kvm_sregs, change(this.getSregs()));
  }

  getFpu(): Decoded {
    return ioctlOut(this.fd, 'GET_FPU', s.kvm_fpu);
  }

  setFpu(fpu: Decoded): void {
    ioctlIn(this.fd, 'SET_FPU', s.kvm_fpu, fpu);
  }

  getVcpuEvents(): Decoded {
    return ioctlOut(this.fd, 'GET_VCPU_EVENTS', s.kvm_vcpu_events);
  }

  setVcpuEvents(events: Decoded): void {
    ioctlIn(this.fd, 'SET_VCPU_EVENTS', s.kvm_vcpu_events, events);
  }

  /** A state struct as bytes (snapshots): its ioctl and size. */
  getBytes(name: KvmIoctlName, bytes: number): Uint8Array {
    return ioctlGetBytes(this.fd, name, bytes);
  }

  setBytes(name: KvmIoctlName, data: Uint8Array, bytes: number): void {
    ioctlSetBytes(this.fd, name, data, bytes);
  }

  /** KVM_GET_TSC_KHZ: the guest's TSC frequency. */
  tscKhz(): number {
    return ioctlInt(this.fd, 'GET_TSC_KHZ');
  }

  setTscKhz(khz: number): void {
    ioctlInt(this.fd, 'SET_TSC_KHZ', khz);
  }

  /** KVM_KVMCLOCK_CTRL: tells a kvmclock guest it was stopped (no soft-lockup reports); false where it does not use kvmclock. */
  kvmclockCtrl(): boolean {
    return libc.ioctlInt(this.fd, KVM.KVMCLOCK_CTRL, 0) === 0;
  }

  getMpState(): number {
    return Number(ioctlOut(this.fd, 'GET_MP_STATE', s.kvm_mp_state).mp_state);
  }

  /** Guest-virtual to guest-physical translation under the vCPU's current paging. */
  translate(linear: bigint): { physical: bigint; valid: boolean; writeable: boolean; usermode: boolean } {
    const buf = s.kvm_translation.alloc();
    s.kvm_translation.encode(dataView(buf), 0, { linear_address: linear });
    ioctlBuf(this.fd, 'TRANSLATE', buf);
    const t = s.kvm_translation.decode(dataView(buf));
    return {
      physical: t.physical_address as bigint,
      valid: t.valid === 1,
      writeable: t.writeable === 1,
      usermode: t.usermode === 1,
    };
  }

  getMsrs(indices: readonly number[]): Map<number, bigint> {
    const buf = s.kvm_msrs.alloc(indices.length);
    const dv = dataView(buf);
    s.kvm_msrs.encode(dv, 0, { nmsrs: indices.length });
    indices.forEach((index, i) =>
      s.kvm_msr_entry.encode(dv, s.kvm_msrs.flexOffset + i * s.kvm_msr_entry.size, { index }),
    );
    const got = ioctlBuf(this.fd, 'GET_MSRS', buf);
    const out = new Map<number, bigint>();
    for (let i = 0; i < got; i++) {
      const entry = s.kvm_msr_entry.decode(dv, s.kvm_msrs.flexOffset + i * s.kvm_msr_entry.size);
      out.set(Number(entry.index), entry.data as bigint);
    }
    return out;
  }

  setMsrs(values: ReadonlyMap<number, bigint>): void {
    const buf = s.kvm_msrs.alloc(values.size);
    const dv = dataView(buf);
    s.kvm_msrs.encode(dv, 0, { nmsrs: values.size });
    let i = 0;
    for (const [index, data] of values) {
      s.kvm_msr_entry.encode(dv, s.kvm_msrs.flexOffset + i++ * s.kvm_msr_entry.size, { index, data });
    }
    const set = ioctlBuf(this.fd, 'SET_MSRS', buf);
    if (set !== values.size) throw new KilnError(`KVM_SET_MSRS set ${set} of ${values.size} MSRs`);
  }

  close(): void {
    libc.close(this.fd);
  }
}
