// A virtual machine: KVM VM and vCPU file descriptors, guest memory, devices, and one
// thread per vCPU. Lifecycle: create -> (load guest, set registers, add devices) ->
// start -> pause/resume -> stop or guest exit -> destroy.
import type { CompatConfig } from './compat/pvm.js';
import { KilnError } from './errors.js';
import { createDeviceState, type DeviceKind, type DeviceRequest, type DeviceSpec } from './devices/catalogue.js';
import { KVM_CAP } from './kvm/ioctl.js';
import { findLeaf, supportedCpuid } from './cpu/cpuid.js';
import { KvmSystem, VcpuFd, type VmFd } from './kvm/kvm.js';
import { KVM_TSS_ADDRESS, PAGE_SIZE } from './layout.js';
import { hostMemoryBytes, hostPhysAddrBits, OwnedGuestMemory, type HugePages } from './memory/guest-memory.js';
import * as ctl from './vcpu/control.js';
import { VCPU_EXIT_COUNTERS, type VcpuExit } from './vcpu/messages.js';
import { KICK_SIGNAL, VcpuThread } from './vcpu/vcpu-thread.js';
import * as libc from './kvm/libc.js';
import { IoThread } from './virtio/io-thread.js';
import { LogSink } from './log.js';
import { installProcessFilter } from './seccomp/install.js';
import { restoreDevice, saveDevice, type SavedDevice } from './devices/catalogue.js';
import { PciRoot } from './pci/root.js';
import { reattachEventfds, type VirtioPciOptions } from './virtio/pci.js';
import type { SavedVcpu } from './snapshot/vcpu-state.js';
import { restoreVmState, saveVmState, type SavedVmState } from './snapshot/vm-state.js';
import type { SeccompPrograms } from './seccomp/policy.js';

export interface VmConfig {
  readonly memoryBytes: number;
  readonly vcpus: number;
  /** Log each unhandled port/MMIO address once (default: off, guests probe a lot). */
  readonly logUnhandled?: boolean;
  /**
   * In-kernel interrupt controllers (PIC, IOAPIC, a LAPIC per vCPU) and PIT. An OS
   * needs them; with them, HLT waits for an interrupt instead of exiting, and every
   * vCPU but the first waits for INIT/SIPI. Default: off (test guests).
   */
  readonly irqchip?: boolean;
  /** Software-KVM compatibility for the vCPU threads (compat/pvm.ts). */
  readonly compat?: CompatConfig | null;
  /** Where the VM's log lines go, every thread's (default: stderr, "kiln: " first). */
  readonly log?: (line: string) => void;
  /** Guest RAM from a snapshot's memory file (an open fd), mapped private instead of anonymous. */
  readonly memoryFileFd?: number;
  /** Track which pages change (KVM's dirty log and Kiln's own writes), for diff snapshots. */
  readonly trackDirtyPages?: boolean;
  /** Huge pages for anonymous guest RAM: transparent ones asked for, or the hugetlb pool's 2 MiB pages. */
  readonly hugePages?: HugePages;
  /** Guest RAM is a shared guest memory file (memory/shared-memory.ts), not private memory. */
  readonly sharedMemory?: boolean;
  /** That file, another VMM's, handed over (kiln upgrade): the VM maps it and owns the fd. */
  readonly sharedMemoryFd?: number;
}

/** What a snapshot holds of a running machine, besides its memory (snapshot/). */
export interface MachineState {
  readonly vcpus: readonly SavedVcpu[];
  /** The in-kernel irqchip, PIT and clock (null: a VM without the in-kernel irqchip). */
  readonly vm: SavedVmState | null;
  readonly devices: readonly SavedDevice[];
  /** The software-KVM fix is in guest memory already (compat/pvm.ts): a restore must not install it again. */
  readonly compatInstalled: boolean;
}

export interface VmResult {
  /** The guest's requested exit status, or null if the VM did not end that way. */
  readonly exitCode: number | null;
  /** The guest reset the machine (reboot) rather than exiting. */
  readonly reset: boolean;
  /** Why the VM ended: the first vCPU exit that was not a plain stop, else 'stopped'. */
  readonly reason: VcpuExit['reason'];
  readonly detail: string;
  readonly vcpus: readonly VcpuExit[];
}

const FATAL: ReadonlySet<VcpuExit['reason']> = new Set([
  'shutdown',
  'fail-entry',
  'internal-error',
  'unhandled-exit',
  'error',
  'guest-exit',
]);

/**
 * A KVM VM made before anyone asked for it: /dev/kvm open, the VM with its TSS, in-kernel
 * irqchip and PIT, and vCPU 0 — what every Linux VM needs whatever its configuration.
 * kiln-vmm makes one while it waits for its API; the next Vm.create with the irqchip
 * takes it instead of making its own (10-17 ms on the development machine).
 */
interface SpareVm {
  readonly kvm: KvmSystem;
  readonly vmFd: VmFd;
  readonly vcpu0: number;
}
let spare: SpareVm | null = null;

/** A new KVM VM with its TSS and, with `irqchip`, the in-kernel irqchip and PIT (both before any vCPU). */
function createKvmVm(kvm: KvmSystem, irqchip: boolean): VmFd {
  const vmFd = kvm.createVm();
  try {
    if (kvm.checkExtension(KVM_CAP.SET_TSS_ADDR)) vmFd.setTssAddr(KVM_TSS_ADDRESS);
    if (irqchip) {
      vmFd.createIrqchip();
      vmFd.createPit2();
    }
    return vmFd;
  } catch (err) {
    vmFd.close();
    throw err;
  }
}

/** Makes the spare VM (see SpareVm), if there is none; a failure is left for Vm.create to report. */
export function prepareSpareVm(): void {
  if (spare) return;
  let kvm: KvmSystem | null = null;
  let vmFd: VmFd | null = null;
  try {
    kvm = KvmSystem.open();
    vmFd = createKvmVm(kvm, true);
    spare = { kvm, vmFd, vcpu0: vmFd.createVcpu(0) };
  } catch {
    vmFd?.close();
    kvm?.close();
  }
}

export class Vm {
  readonly memory: OwnedGuestMemory;
  readonly vcpus: readonly VcpuFd[];
  readonly devices: DeviceSpec[] = [];
  private readonly control: SharedArrayBuffer;
  /** Each vCPU's exit counters (VCPU_EXIT_COUNTERS), written by its thread, read for the metrics. */
  private readonly exitCounters: SharedArrayBuffer[];
  private readonly cells: Int32Array;
  private threads: VcpuThread[] = [];
  private io: IoThread | null = null;
  private readonly ownedFds: number[] = [];
  private result: Promise<VmResult> | null = null;
  private destroyed = false;
  /** The one log sink of this VM's threads (log.ts). */
  readonly logSink: LogSink;

  private constructor(
    private readonly kvm: KvmSystem,
    readonly vmFd: VmFd,
    memory: OwnedGuestMemory,
    vcpus: VcpuFd[],
    private readonly config: VmConfig,
  ) {
    this.memory = memory;
    this.vcpus = vcpus;
    this.control = ctl.allocateControl(vcpus.length);
    this.exitCounters = vcpus.map(() => new SharedArrayBuffer(8 * VCPU_EXIT_COUNTERS.length));
    this.logSink = new LogSink(config.log ?? ((line) => process.stderr.write(`kiln: ${line}\n`)));
    this.cells = new Int32Array(this.control);
  }

  /** Opens KVM, creates the VM, its memory and its vCPUs. Undoes everything on failure. */
  static create(config: VmConfig): Vm {
    // The spare VM has the irqchip: a VM without one (test guests) makes its own.
    const made = config.irqchip ? spare : null;
    if (made) spare = null;
    const kvm = made?.kvm ?? KvmSystem.open();
    let vmFd: VmFd | null = made?.vmFd ?? null;
    let memory: OwnedGuestMemory | null = null;
    const vcpus: VcpuFd[] = made ? [new VcpuFd(made.vcpu0)] : [];
    try {
      const { max } = kvm.vcpuLimits();
      if (!Number.isInteger(config.vcpus) || config.vcpus < 1 || config.vcpus > max) {
        throw new KilnError(`vCPU count must be between 1 and ${max} (this host's KVM limit); got ${config.vcpus}`);
      }
      vmFd ??= createKvmVm(kvm, config.irqchip ?? false);
      memory = OwnedGuestMemory.create(
        vmFd,
        config.memoryBytes,
        {
          memslots: kvm.checkExtension(KVM_CAP.NR_MEMSLOTS) || 32,
          physAddrBits: hostPhysAddrBits(() => {
            const leaf = findLeaf(supportedCpuid(kvm), 0x80000008);
            return leaf ? leaf.eax & 0xff : null;
          }),
          hostBytes: hostMemoryBytes(),
        },
        {
          backingFd: config.memoryFileFd ?? -1,
          trackDirty: config.trackDirtyPages ?? false,
          hugePages: config.hugePages ?? 'None',
          shared: config.sharedMemory ?? false,
          ...(config.sharedMemoryFd !== undefined ? { sharedFd: config.sharedMemoryFd } : {}),
        },
      );
      for (let i = vcpus.length; i < config.vcpus; i++) vcpus.push(new VcpuFd(vmFd.createVcpu(i)));
      return new Vm(kvm, vmFd, memory, vcpus, config);
    } catch (err) {
      vcpus.forEach((v) => v.close());
      vmFd?.close();
      memory?.destroy();
      kvm.close();
      throw err;
    }
  }

  /**
   * Adds a device; returns its spec (its `state` is readable from the host). The state
   * is allocated and initialised here, on the main thread, before any vCPU runs.
   * `shareStateWith` maps a second range onto an existing device's state (one device
   * reached two ways, as PCI configuration space is through ports and through ECAM).
   */
  addDevice<K extends DeviceKind>(device: DeviceRequest<K>, shareStateWith?: DeviceSpec<K>): DeviceSpec<K> {
    if (this.threads.length > 0) throw new KilnError('devices must be added before the VM starts');
    if (this.devices.some((d) => d.id === device.id))
      throw new KilnError(`a device named '${device.id}' already exists`);
    const options = device.options ?? {};
    const spec = {
      ...device,
      options,
      state: shareStateWith?.state ?? createDeviceState(device.kind, options),
    } as unknown as DeviceSpec<K>;
    this.devices.push(spec as DeviceSpec);
    return spec;
  }

  /** Closes `fd` when the VM is destroyed (eventfds and files its devices use). */
  adoptFd(fd: number): void {
    this.ownedFds.push(fd);
  }

  /** Linux thread id of the I/O thread, or 0 when the VM has no virtio devices. */
  ioThreadId = 0;
  /** Why the I/O thread died under the running VM, if it did. */
  private ioDied: string | null = null;

  /** Ends the I/O thread as a crash would look to the VM (for tests of what a VM does then). */
  async crashIoThread(): Promise<void> {
    await this.io?.endUnexpectedly();
  }

  private readonly emit = (source: string, line: string) => this.logSink.emit(source, line);

  /**
   * Starts the I/O thread (if any device needs it) and one thread per vCPU; resolves when
   * every one is running. With `seccomp`, the process-wide filter goes on every thread
   * first, then each worker loads its own before it touches guest data (seccomp/policy.ts).
   */
  async start(
    opts: {
      seccomp?: SeccompPrograms | null;
      /**
       * A snapshot's state to continue from (restoreMachine first), and whether to stay
       * paused. `kickLater`: the queues are not looked at until kickQueues() (a migration's
       * destination does no device work before the source has let go).
       */
      restore?: { vcpus: readonly SavedVcpu[]; paused: boolean; kickLater?: boolean };
    } = {},
  ): Promise<void> {
    if (this.threads.length > 0) throw new KilnError('the VM has already started');
    const restore = opts.restore;
    if (restore && restore.vcpus.length !== this.vcpus.length)
      throw new KilnError(`the snapshot has ${restore.vcpus.length} vCPU(s), the VM ${this.vcpus.length}`);
    const seccomp = opts.seccomp ?? null;
    if (seccomp) installProcessFilter(seccomp.process);
    if (restore?.paused)
      for (let i = 0; i < this.vcpus.length; i++) Atomics.store(this.cells, ctl.requestCell(i), ctl.REQ_PAUSE);
    const virtio = this.devices.filter((d): d is DeviceSpec<'virtio-pci'> => d.kind === 'virtio-pci');
    // The I/O thread and the vCPU threads take their VM at the same time (each isolate's
    // set-up is milliseconds, and a load waits for all of them). A vCPU may run before the
    // I/O thread is ready: what it does to a device is in shared state, and a notification
    // waits in its eventfd until the I/O thread reads it.
    const io =
      virtio.length > 0
        ? new IoThread(
            {
              memory: this.memory.descriptor,
              vmFd: this.vmFd.fd,
              devices: virtio,
              seccomp: seccomp?.io ?? null,
              ...(restore ? { restored: restore.kickLater ? ('on-kick' as const) : ('now' as const) } : {}),
            },
            this.emit,
          )
        : null;
    this.io = io;
    // After a restore every queue is looked at once, as if kicked: a notification the old
    // VM's ioeventfd took but its I/O thread had not served is otherwise lost.
    if (restore && !restore.kickLater) this.kickQueues();
    const runMmapSize = this.kvm.vcpuMmapSize();
    const msrIndices = this.kvm.msrIndexList();
    this.threads = this.vcpus.map(
      (vcpu, id) =>
        new VcpuThread(
          {
            id,
            vcpuFd: vcpu.fd,
            runMmapSize,
            control: this.control,
            memory: this.memory.descriptor,
            devices: this.devices,
            vmFd: this.vmFd.fd,
            kickSignal: KICK_SIGNAL,
            logUnhandled: this.config.logUnhandled ?? false,
            compat: this.config.compat ?? null,
            seccomp: seccomp?.vcpu ?? null,
            msrIndices,
            exitCounters: this.exitCounters[id]!,
            ...(restore ? { restore: restore.vcpus[id]! } : {}),
          },
          this.emit,
        ),
    );
    this.result = this.collect();
    try {
      [this.ioThreadId] = await Promise.all([io?.ready ?? 0, ...this.threads.map((t) => t.ready)]);
    } catch (err) {
      // One thread could not start: none is left running.
      await Promise.all(this.threads.map((t) => t.stop().catch(() => undefined)));
      await this.stopIo();
      throw err;
    }
    if (io) {
      // The I/O thread dying under a running VM (not stopped by us) fails the VM visibly:
      // its virtio devices would otherwise hang the guest without a word.
      void io.exited.then((failure) => {
        if (this.io !== io) return;
        this.ioDied = failure ?? 'it ended without an error';
        this.logSink.emit(
          'io',
          `the I/O thread died (${this.ioDied}); stopping the VM: its virtio devices cannot work`,
        );
        Atomics.compareExchange(this.cells, ctl.VM_STATUS, ctl.VM_RUNNING, ctl.VM_EXIT_REQUESTED);
        for (const t of this.threads) void t.stop();
      });
    }
  }

  /** Has the I/O thread look at every virtio queue once, as if the guest had kicked it. */
  kickQueues(): void {
    if (!this.io) return;
    for (const d of this.devices)
      if (d.kind === 'virtio-pci') (d.options as VirtioPciOptions).notifyFds.forEach((fd) => libc.signalEventfd(fd));
  }

  /** The KVM system handle (for CPUID queries and limits). */
  get kvmSystem(): KvmSystem {
    return this.kvm;
  }

  /** Epoch milliseconds of the first KVM_RUN on any vCPU (valid once started). */
  get firstRunAt(): number {
    return Math.min(...this.threads.map((t) => t.firstRunAt));
  }

  /** Linux thread ids of the vCPU threads (valid once started). */
  get vcpuThreadIds(): number[] {
    return this.threads.map((t) => t.tid);
  }

  private async collect(): Promise<VmResult> {
    // When one vCPU ends the VM (guest exit, triple fault, KVM failure), stop the others.
    const exits = await Promise.all(
      this.threads.map(async (thread) => {
        const exit = await thread.exited;
        if (FATAL.has(exit.reason)) {
          Atomics.compareExchange(this.cells, ctl.VM_STATUS, ctl.VM_RUNNING, ctl.VM_EXIT_REQUESTED);
          for (const other of this.threads) if (other !== thread) void other.stop();
        }
        return exit;
      }),
    );
    const decisive =
      exits.find((e) => e.reason === 'guest-exit') ??
      exits.find((e) => FATAL.has(e.reason)) ??
      exits.find((e) => e.reason !== 'stopped') ??
      exits[0]!;
    const guestExit = decisive.reason === 'guest-exit';
    const reset = guestExit && Atomics.load(this.cells, ctl.VM_EXIT_KIND) === ctl.EXIT_KIND_RESET;
    const exitCode = guestExit && !reset ? Atomics.load(this.cells, ctl.VM_EXIT_CODE) : null;
    if (this.ioDied !== null && !guestExit)
      return {
        exitCode: null,
        reset: false,
        reason: 'error',
        detail: `the I/O thread died: ${this.ioDied}`,
        vcpus: exits,
      };
    return { exitCode, reset, reason: decisive.reason, detail: decisive.detail, vcpus: exits };
  }

  /** Resolves when every vCPU has ended. */
  wait(): Promise<VmResult> {
    if (!this.result) throw new KilnError('the VM has not started');
    return this.result;
  }

  /** Parks every vCPU outside KVM_RUN; resolves once all are parked. */
  async pause(): Promise<void> {
    await Promise.all(this.threads.map((t) => t.pause()));
  }

  resume(): void {
    this.threads.forEach((t) => t.resume());
  }

  /** Whether every vCPU is parked (pause() has completed). */
  get paused(): boolean {
    return this.threads.length > 0 && this.threads.every((t) => t.state === ctl.STATE_PAUSED);
  }

  /**
   * Saves the machine's state (vCPUs, irqchip/PIT/clock, every device) while it is
   * paused, with the I/O thread parked; `alsoWhileParked` runs before the I/O thread is let
   * go (the memory file is written there, so memory and device state agree).
   */
  async saveMachine(
    alsoWhileParked: () => Promise<void> | void = () => undefined,
    /**
     * `keepParked`: the I/O thread stays parked once the state is saved (a migration's
     * source: no device may touch guest memory or its state again, the destination has
     * them); unparkIo() lets it go on, destroy() ends it where it is.
     */
    opts: { keepParked?: boolean } = {},
  ): Promise<MachineState> {
    if (!this.paused) throw new KilnError('the VM must be paused to save its state');
    const io = this.io;
    if (io) await io.parkLoop();
    let saved = false;
    try {
      const vcpus: SavedVcpu[] = [];
      // One at a time: vCPU events must not be read while another vCPU's ioctls run (KVM's rule for SET).
      for (const t of this.threads) vcpus.push(await t.saveState());
      const vm = this.config.irqchip ? saveVmState(this.vmFd) : null;
      const devices = this.devices.map((d) => saveDevice(d));
      await alsoWhileParked();
      saved = true;
      return { vcpus, vm, devices, compatInstalled: Atomics.load(this.cells, ctl.VM_COMPAT_CLAIM) === 1 };
    } finally {
      if (!saved || !opts.keepParked) io?.unparkLoop();
    }
  }

  /** Lets the I/O thread go on after saveMachine's keepParked (a migration that failed). */
  unparkIo(): void {
    this.io?.unparkLoop();
  }

  /** Host memory KVM_GET_DIRTY_LOG writes each slot's bitmap into (mapped on first use). */
  private dirtyLogs: Array<{ addr: bigint; bytes: Uint8Array }> | null = null;

  /** Whether this VM tracks which pages change (VmConfig.trackDirtyPages, or since startTrackingDirtyPages). */
  get tracksDirtyPages(): boolean {
    return this.memory.tracking;
  }

  /**
   * Starts tracking which pages change, on a VM built without it (the pages that changed
   * before are unknown: the next takeDirtyPages reports what changed from here on). Paused
   * only: a slot's flags change while no vCPU is in KVM_RUN.
   */
  startTrackingDirtyPages(): void {
    if (this.threads.length > 0 && !this.paused)
      throw new KilnError('the VM must be paused to start tracking dirty pages');
    this.memory.startTracking();
  }

  /**
   * The pages that changed since the last call (or since the VM was built): per region, one
   * bit per page (least significant bit first), the guest's writes (KVM's dirty log) and
   * Kiln's own (GuestMemory.markWritten) together. Both records are cleared as they are
   * read. Call it with the VM paused and the I/O thread parked (saveMachine's callback), so
   * nothing is written between the read and the clear that the next call would miss.
   */
  takeDirtyPages(): Uint8Array[] {
    if (!this.tracksDirtyPages) throw new KilnError('this VM does not track dirty pages (track_dirty_pages is off)');
    const regions = this.memory.regions;
    this.dirtyLogs ??= regions.map((r) => libc.mapAnonymous(Math.ceil(r.size / PAGE_SIZE / 64) * 8));
    return regions.map((r, i) => {
      const log = this.dirtyLogs![i]!;
      log.bytes.fill(0);
      this.vmFd.getDirtyLog(r.slot, log.addr);
      const pages = Uint8Array.from(log.bytes.subarray(0, Math.ceil(r.size / PAGE_SIZE / 8)));
      this.memory.takeWritten(i, pages);
      return pages;
    });
  }

  /**
   * Puts a snapshot's VM-wide and device state into this new, not yet started VM (built
   * with the same configuration); the vCPUs get theirs at start({ restore }).
   */
  /** Every vCPU's exits so far, summed, by the metrics' names (they only grow). */
  exitCounts(): Record<(typeof VCPU_EXIT_COUNTERS)[number], number> {
    const sum = Object.fromEntries(VCPU_EXIT_COUNTERS.map((n) => [n, 0])) as Record<
      (typeof VCPU_EXIT_COUNTERS)[number],
      number
    >;
    for (const shared of this.exitCounters) {
      const v = new Float64Array(shared);
      VCPU_EXIT_COUNTERS.forEach((n, i) => (sum[n] += v[i]!));
    }
    return sum;
  }

  restoreMachine(state: MachineState, opts: { clockRealtime?: boolean } = {}): void {
    if (this.threads.length > 0) throw new KilnError('state is restored before the VM starts');
    if (state.vm && this.config.irqchip) restoreVmState(this.vmFd, state.vm, opts);
    if (state.compatInstalled) Atomics.store(this.cells, ctl.VM_COMPAT_CLAIM, 1);
    // The boot timer (kiln-vmm --boot-timer) holds no state: a snapshot with or without
    // one restores into a VM with or without one.
    const stateful = <T extends { kind: string }>(list: readonly T[]) => list.filter((d) => d.kind !== 'boot-timer');
    const byId = new Map(stateful(state.devices).map((d) => [d.id, d]));
    const devices = stateful(this.devices);
    for (const d of devices) {
      const saved = byId.get(d.id);
      if (!saved) throw new KilnError(`the snapshot has no state for device ${d.id} (${d.kind})`);
      restoreDevice(d, saved);
    }
    if (byId.size !== new Set(devices.map((d) => d.id)).size)
      throw new KilnError('the snapshot has devices this VM does not');
    const root = this.devices.find((d) => d.kind === 'pci-root');
    for (const d of this.devices)
      if (d.kind === 'virtio-pci' && root)
        reattachEventfds(
          d.state,
          d.options as VirtioPciOptions,
          new PciRoot(root.state).configSpace(d.base),
          this.vmFd.fd,
          (line) => this.emit(d.id, line),
        );
  }

  /** Stops every vCPU (then the I/O thread) and resolves with the VM's result. */
  async stop(): Promise<VmResult> {
    await Promise.all(this.threads.map((t) => t.stop()));
    await this.stopIo();
    return this.wait();
  }

  private async stopIo(): Promise<void> {
    const io = this.io;
    this.io = null;
    const failure = io ? await io.stop() : null;
    if (failure) this.logSink.emit('io', `the I/O thread ended with an error: ${failure}`);
    this.logSink.flush();
  }

  /** Closes every file descriptor and unmaps guest memory. Stops the VM first if needed. */
  destroy(): Promise<void> {
    // One teardown, however many ask (the VM's end and a migration's completion may both).
    this.destroying ??= this.destroyNow();
    return this.destroying;
  }

  private destroying: Promise<void> | null = null;

  private async destroyNow(): Promise<void> {
    if (this.destroyed) return;
    if (this.threads.length > 0) await this.stop();
    await this.stopIo();
    this.destroyed = true;
    this.ownedFds.forEach((fd) => libc.close(fd));
    this.vcpus.forEach((v) => v.close());
    this.vmFd.close();
    this.memory.destroy();
    for (const log of this.dirtyLogs ?? []) libc.munmap(log.addr, log.bytes.length);
    this.dirtyLogs = null;
    this.kvm.close();
  }
}
