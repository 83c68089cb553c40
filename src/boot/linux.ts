// Assembling a VM that boots Linux: validate the kernel, initrd and command line,
// then create the VM (in-kernel irqchip and PIT), its devices and ACPI tables, set up
// every vCPU, and load the kernel. Every check happens before the VM exists.
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsConstants, fstatSync, openSync, readFileSync } from 'node:fs';
import { buildAcpiTables, MAX_MADT_VCPUS } from '../acpi/tables.js';
import { isSoftwareKvm, planSyscallFix, type CompatConfig } from '../compat/pvm.js';
import { supportedCpuid } from '../cpu/cpuid.js';
import { configureVcpu, setBootRegisters } from '../cpu/setup.js';
import { applyCpuidModifiers, applyTemplate, cpuTemplate, type CpuTemplate } from '../cpu/templates.js';
import { applyMsrModifiers, staticTemplate, type MsrModifier } from '../cpu/static-templates.js';
import type { DeviceSpec } from '../devices/catalogue.js';
import { irqLineSetter } from '../devices/irq.js';
import { SerialHost } from '../devices/serial.js';
import { bootOrder, type DiskConfig, type VmConfig } from '../config/vm-config.js';
import { KilnError } from '../errors.js';
import * as layout from '../layout.js';
import { ramRanges, validateMemorySize } from '../memory/guest-memory.js';
import { attachPciHost } from '../platform/pci.js';
import { addPcDevices, addStandardDevices } from '../platform/standard.js';
import type { BootTimerOptions } from '../devices/boot-timer.js';
import { attachVirtio, openHostEnds, type AttachedVirtio } from '../platform/virtio.js';
import { Vm } from '../vm.js';
import { decompressBzImage } from './decompress.js';
import { isElf } from './elf.js';
import { loadKernel, type BootImage } from './loader.js';

/** How this process runs the VM (not part of the VM's configuration). */
export interface LinuxRuntime {
  /** Where the 16550's output goes. */
  readonly serialOutFd: number;
  readonly logUnhandled?: boolean;
  /** Decompress a bzImage's payload on the host and boot the ELF inside (PVH). */
  readonly hostDecompress?: boolean;
  /** Where the VM's log lines go (every thread's; default: stderr). */
  readonly log?: (line: string) => void;
  /** Firecracker's boot timer on port 0x3f0 (`kiln-vmm --boot-timer`), logging the boot time since this start. */
  readonly bootTimer?: BootTimerOptions;
  /** MMDS's data store (the VMM's, mmds/store.ts), read by the NICs MMDS is enabled on. */
  readonly mmdsStore?: SharedArrayBuffer;
  /** The kernel's bytes, instead of reading the config's kernel (rehearsal.ts). */
  readonly kernelImage?: Uint8Array;
}

/** What the boot did, without the bytes it wrote (those live in guest memory only). */
export type BootSummary = Omit<BootImage, 'writes'>;

export interface LinuxVm {
  readonly vm: Vm;
  readonly serial: SerialHost;
  readonly progress: DeviceSpec;
  readonly boot: BootSummary;
  readonly cmdline: string;
  readonly template: CpuTemplate;
  readonly softwareKvm: boolean;
  /** The software-KVM fix planned for this kernel (a snapshot keeps it). */
  readonly compat: CompatConfig | null;
  /** The virtio functions, by what they are. */
  readonly virtio: AttachedVirtio;
  /** Presses the ACPI power button (a Generic Event Device interrupt). */
  pressPowerButton(): void;
  /** A new VM generation ID, announced to the guest (after a restore: Linux reseeds its RNG). */
  newGeneration(): void;
}

/** What Kiln puts on every command line: the serial console, and reboot through the i8042. */
export const BASE_CMDLINE = 'console=ttyS0 reboot=k panic=-1';
/**
 * Added on software KVM, where kernel-mode code is emulated: skip the delay-loop
 * calibration and the TSC's stability watchdog, both slow there.
 */
export const SOFTWARE_KVM_CMDLINE = 'lpj=5000000 tsc=reliable';

/** Opens once, checks the opened file (no stat-then-read race with a swapped path), reads it. */
function readGuestFile(path: string, what: string): Uint8Array {
  let fd = -1;
  try {
    // Non-blocking: a FIFO given as a kernel is refused below instead of waiting for a writer.
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
    const st = fstatSync(fd);
    if (!st.isFile()) throw new KilnError(`the ${what} '${path}' is not a regular file`);
    if (st.size === 0) throw new KilnError(`the ${what} '${path}' is empty`);
    return new Uint8Array(readFileSync(fd));
  } catch (err) {
    if (err instanceof KilnError) throw err;
    throw new KilnError(
      `cannot read the ${what} '${path}': ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  } finally {
    if (fd >= 0) closeSync(fd);
  }
}

/**
 * Boot arguments Kiln drops, each with the reason it is logged with:
 * - `pci=off`: Kiln's devices are on PCI, which it would hide;
 * - `noapic`: Kiln's platform is ACPI hardware-reduced, where Linux never programs the
 *   8259 PIC; with the IOAPIC off, the legacy interrupts (the serial port's, first) would
 *   reach the CPU through the unprogrammed PIC at vectors 0-15 — exceptions — and the
 *   guest dies (firecracker-go-sdk's default kernel arguments carry `noapic`). Without it
 *   they arrive through the IOAPIC.
 */
export const DROPPED_BOOT_ARGS: ReadonlyMap<string, string> = new Map([
  ['pci=off', "Kiln's virtio devices are on PCI"],
  [
    'noapic',
    "Kiln's ACPI platform is hardware-reduced (no 8259 PIC for Linux to program), so legacy interrupts go through the IOAPIC",
  ],
]);

/**
 * The whole command line: Kiln's console, the template's flags on software KVM, the
 * user's (less what Kiln drops), and, as Firecracker does, root= for a root disk
 * (/dev/vda, which bootOrder makes it, or its PARTUUID) with ro or rw.
 */
export function composeCmdline(
  user: string | undefined,
  template: CpuTemplate,
  softwareKvm: boolean,
  root?: DiskConfig,
): string {
  const parts = [BASE_CMDLINE];
  if (softwareKvm) parts.push(SOFTWARE_KVM_CMDLINE, ...template.cmdline);
  parts.push(...(user ?? '').split(/\s+/).filter((a) => a !== '' && !DROPPED_BOOT_ARGS.has(a)));
  if (root) parts.push(root.partuuid ? `root=PARTUUID=${root.partuuid}` : 'root=/dev/vda', root.readOnly ? 'ro' : 'rw');
  return parts.join(' ');
}

/** A snapshot's machine to rebuild instead of booting (snapshot/): its RAM file and what its boot was. */
export interface RestoreFrom {
  /** The memory file, open: guest RAM maps it (private); -1: anonymous RAM a Uffd handler fills. */
  readonly memoryFileFd: number;
  readonly boot: BootSummary;
  readonly compat: CompatConfig | null;
  /**
   * RAM is a shared guest memory file (a migration's destination whose VM has
   * sharedMemory); otherwise a restored VM's RAM is private, whatever its configuration
   * says (a snapshot's memory file, or anonymous memory a Uffd handler fills).
   */
  readonly sharedMemory?: boolean;
  /**
   * The source VMM's shared guest memory file, handed over (kiln upgrade): RAM maps it
   * (memoryFileFd is then -1) and the VM owns the fd.
   */
  readonly sharedMemoryFd?: number;
  /** The disks are opened but not locked (a migration's destination takes the locks once its source let go: setDiskLocks). */
  readonly deferDiskLocks?: boolean;
}

/**
 * Forces CPU templates' MSR bits on every vCPU: the values are vCPU 0's after its CPUID and
 * boot MSRs are set, with the modifiers' bits forced, as Firecracker does.
 */
function setTemplateMsrs(vm: Vm, modifiers: readonly MsrModifier[]): void {
  if (modifiers.length === 0) return;
  const values = applyMsrModifiers(vm.vcpus[0]!.getMsrs([...new Set(modifiers.map((m) => m.index))]), modifiers);
  for (const vcpu of vm.vcpus) {
    for (const [index, value] of values) {
      try {
        vcpu.setMsrs(new Map([[index, value]]));
      } catch (err) {
        throw new KilnError(
          `the CPU template sets MSR 0x${index.toString(16)} to 0x${value.toString(16)}, which this host's KVM refused: ${(err as Error).message}`,
        );
      }
    }
  }
}

/**
 * Builds the VM for `vmConfig`: with `from`, the same machine a snapshot was taken of,
 * its RAM the snapshot's memory file and no kernel loaded (the caller restores the
 * machine's state); otherwise booting the configured kernel.
 */
export function createLinuxVm(vmConfig: VmConfig, runtime: LinuxRuntime, from?: RestoreFrom): LinuxVm {
  if (vmConfig.kernel === undefined && !from) throw new KilnError('no kernel to boot (give a kernel path)');
  const config = { ...vmConfig, disks: bootOrder(vmConfig.disks) };
  const softwareKvm = isSoftwareKvm();
  const template = cpuTemplate(config.cpuTemplate ?? (softwareKvm ? 'pvm' : 'host'));
  if (config.cpus > MAX_MADT_VCPUS)
    throw new KilnError(`vCPU count must be at most ${MAX_MADT_VCPUS} (got ${config.cpus})`);
  const memoryBytes = config.memoryMiB * 1024 * 1024;
  validateMemorySize(memoryBytes);
  const cmdline = composeCmdline(
    config.cmdline,
    template,
    softwareKvm,
    config.disks.find((d) => d.root),
  );
  // A restored guest has its ACPI tables in its memory already.
  const acpi = from ? null : buildAcpiTables({ vcpus: config.cpus, pci: true });
  // The whole boot layout is computed (and checked) before the VM exists.
  let boot: BootImage | null = null;
  if (!from) {
    let kernel = runtime.kernelImage ?? readGuestFile(vmConfig.kernel!, 'kernel');
    if (runtime.hostDecompress && !isElf(kernel)) kernel = decompressBzImage(kernel).elf;
    const initrd = config.initrd !== undefined ? readGuestFile(config.initrd, 'initrd') : undefined;
    boot = loadKernel({ kernel, initrd, cmdline, ram: ramRanges(memoryBytes), rsdp: acpi!.rsdp });
  }
  const { disks, nets } = openHostEnds(config, { lockDisks: !from?.deferDiskLocks });
  const compat = from ? from.compat : softwareKvm ? { syscallFix: planSyscallFix(boot!.textEnd) } : null;

  let vm: Vm;
  try {
    vm = Vm.create({
      memoryBytes,
      vcpus: config.cpus,
      irqchip: true,
      logUnhandled: runtime.logUnhandled ?? false,
      ...(runtime.log ? { log: runtime.log } : {}),
      compat,
      trackDirtyPages: config.trackDirtyPages,
      hugePages: config.hugePages ?? 'None',
      sharedMemory: from ? from.sharedMemory === true : (config.sharedMemory ?? false),
      ...(from ? { memoryFileFd: from.memoryFileFd } : {}),
      ...(from?.sharedMemoryFd !== undefined ? { sharedMemoryFd: from.sharedMemoryFd } : {}),
    });
  } catch (err) {
    [...disks, ...nets].forEach((d) => closeSync(d.fd));
    throw err;
  }
  try {
    /** A new random VM generation ID where the guest's vmgenid driver reads it (the ACPI VGEN device). */
    const writeGenerationId = () => vm.memory.write(layout.VMGENID_ADDR, randomBytes(layout.VMGENID_SIZE));
    const { com1, progress } = addStandardDevices(vm, runtime.serialOutFd);
    addPcDevices(vm);
    if (runtime.bootTimer)
      vm.addDevice({
        id: 'boot-timer',
        kind: 'boot-timer',
        bus: 'pio',
        base: layout.PORT_BOOT_TIMER,
        size: layout.PORT_BOOT_TIMER_SIZE,
        options: runtime.bootTimer,
      });
    const virtio = attachVirtio(vm, attachPciHost(vm), config, disks, nets, runtime.mmdsStore ?? null);

    const hostCpuid = supportedCpuid(vm.kvmSystem);
    const fixed = config.staticCpuTemplate ? staticTemplate(config.staticCpuTemplate, hostCpuid) : null;
    const cpuid = applyCpuidModifiers(
      applyCpuidModifiers(applyTemplate(hostCpuid, template), fixed?.cpuid ?? []),
      config.cpuidModifiers ?? [],
    );
    const refused = new Set<number>();
    vm.vcpus.forEach((vcpu, i) =>
      configureVcpu(vcpu, i, config.cpus, cpuid, true, config.smt ? 2 : 1).forEach((msr) => refused.add(msr)),
    );
    setTemplateMsrs(vm, [
      ...(fixed?.msrs ?? []),
      ...(config.msrModifiers ?? []).map((m) => ({ index: m.index, mask: BigInt(m.mask), value: BigInt(m.value) })),
    ]);
    if (refused.size > 0) {
      vm.logSink.emit(
        'vcpu',
        `KVM refused to set boot MSR(s) ${[...refused].map((m) => `0x${m.toString(16)}`).join(', ')}; they keep KVM's reset values`,
      );
    }
    if (boot && acpi) {
      vm.memory.write(acpi.base, acpi.bytes);
      writeGenerationId();
      for (const w of boot.writes) vm.memory.write(w.gpa, w.bytes);
      setBootRegisters(vm.vcpus[0]!, vm.memory, boot.entry);
    }

    const setIrq = irqLineSetter(vm.vmFd.fd);
    // Keep no reference to the image's bytes: the kernel and initrd (tens of MiB) would
    // otherwise stay in the VMM's memory for the VM's life.
    const summary: BootSummary = boot ? (({ writes: _written, ...rest }) => rest)(boot) : from!.boot;
    return {
      vm,
      serial: new SerialHost(com1.state, com1.options, setIrq),
      progress,
      boot: summary,
      cmdline,
      template,
      softwareKvm,
      compat,
      virtio,
      pressPowerButton() {
        setIrq(layout.IRQ_GED, 1);
        setIrq(layout.IRQ_GED, 0);
      },
      newGeneration() {
        writeGenerationId();
        setIrq(layout.IRQ_VMGENID, 1);
        setIrq(layout.IRQ_VMGENID, 0);
      },
    };
  } catch (err) {
    void vm.destroy();
    throw err;
  }
}
