// A virtual machine: KVM VM and vCPU file descriptors, guest memory, devices, and one
// thread per vCPU. Lifecycle: create -> (load guest, set registers, add devices) ->
// start -> pause/resume -> stop or guest exit -> destroy.
import type { CompatConfig } from './compat/pvm.js';
import { KilnError } from './errors.js';
import { createDeviceState, type DeviceKind, type DeviceRequest, type DeviceSpec } from './devices/catalogue.js';
import { KVM_CAP } from './kvm/ioctl.js';
import { findLeaf, supportedCpuid } from './cpu/cpuid.js';
import { KvmSystem, VcpuFd, type VmFd } from './kvm/kvm.js';
import { KVM_TSS_ADDRESS } from './layout.js';
import { hostMemoryBytes, hostPhysAddrBits, OwnedGuestMemory } from './memory/guest-memory.js';
import * as ctl from './vcpu/control.js';
import type { VcpuExit } from './vcpu/messages.js';
import { KICK_SIGNAL, VcpuThread } from './vcpu/vcpu-thread.js';
import * as libc from './kvm/libc.js';
import { IoThread } from './virtio/io-thread.js';
import { LogSink } from './log.js';
import { installProcessFilter } from './seccomp/install.js';
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

export class Vm {
  readonly memory: OwnedGuestMemory;
  readonly vcpus: readonly VcpuFd[];
  readonly devices: DeviceSpec[] = [];
  private readonly control: SharedArrayBuffer;
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
    this.logSink = new LogSink(config.log ?? ((line) => process.stderr.write(`kiln: ${line}\n`)));
    this.cells = new Int32Array(this.control);
  }

  /** Opens KVM, creates the VM, its memory and its vCPUs. Undoes everything on failure. */
  static create(config: VmConfig): Vm {
    const kvm = KvmSystem.open();
    let vmFd: VmFd | null = null;
    let memory: OwnedGuestMemory | null = null;
    const vcpus: VcpuFd[] = [];
    try {
      const { max } = kvm.vcpuLimits();
      if (!Number.isInteger(config.vcpus) || config.vcpus < 1 || config.vcpus > max) {
        throw new KilnError(`vCPU count must be between 1 and ${max} (this host's KVM limit); got ${config.vcpus}`);
      }
      vmFd = kvm.createVm();
      if (kvm.checkExtension(KVM_CAP.SET_TSS_ADDR)) vmFd.setTssAddr(KVM_TSS_ADDRESS);
      if (config.irqchip) {
        // Both must exist before the first vCPU is created.
        vmFd.createIrqchip();
        vmFd.createPit2();
      }
      memory = OwnedGuestMemory.create(vmFd, config.memoryBytes, {
        memslots: kvm.checkExtension(KVM_CAP.NR_MEMSLOTS) || 32,
        physAddrBits: hostPhysAddrBits(() => {
          const leaf = findLeaf(supportedCpuid(kvm), 0x80000008);
          return leaf ? leaf.eax & 0xff : null;
        }),
        hostBytes: hostMemoryBytes(),
      });
      for (let i = 0; i < config.vcpus; i++) vcpus.push(new VcpuFd(vmFd.createVcpu(i)));
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
  async start(opts: { seccomp?: SeccompPrograms | null } = {}): Promise<void> {
    if (this.threads.length > 0) throw new KilnError('the VM has already started');
    const seccomp = opts.seccomp ?? null;
    if (seccomp) installProcessFilter(seccomp.process);
    const virtio = this.devices.filter((d): d is DeviceSpec<'virtio-pci'> => d.kind === 'virtio-pci');
    if (virtio.length > 0) {
      this.io = new IoThread(
        { memory: this.memory.descriptor, vmFd: this.vmFd.fd, devices: virtio, seccomp: seccomp?.io ?? null },
        this.emit,
      );
      this.ioThreadId = await this.io.ready;
      const io = this.io;
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
    const runMmapSize = this.kvm.vcpuMmapSize();
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
          },
          this.emit,
        ),
    );
    this.result = this.collect();
    await Promise.all(this.threads.map((t) => t.ready));
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
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    if (this.threads.length > 0) await this.stop();
    await this.stopIo();
    this.destroyed = true;
    this.ownedFds.forEach((fd) => libc.close(fd));
    this.vcpus.forEach((v) => v.close());
    this.vmFd.close();
    this.memory.destroy();
    this.kvm.close();
  }
}
