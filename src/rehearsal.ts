// A waiting kiln-vmm's rehearsal: while it waits for its API (a pool process, or an
// orchestrator's VMM started ahead), it builds a whole VM once — the tiny PVH kernel
// loaded, ACPI tables, legacy and PCI devices, an entropy device, vCPU set-up — and
// throws it away without running it. V8 compiles functions on their first call and
// optimises what runs often; the rehearsal pays that for the build path ahead of time,
// so InstanceStart and /snapshot/load run code that is already compiled, and the
// answers every start asks of KVM are cached (docs/ARCHITECTURE.md, "Start-up").
import { createLinuxVm } from './boot/linux.js';
import { parseVmConfig } from './config/vm-config.js';
import { pvhKernel, SAY_K, THEN_IDLE } from './guest/pvh-kernel.js';

/** Builds and destroys a VM that never runs; any failure is left for the real start to meet and report. */
export async function rehearse(): Promise<void> {
  try {
    const live = createLinuxVm(parseVmConfig({ kernel: '(rehearsal)', memoryMiB: 128, cpus: 1, rng: true }), {
      serialOutFd: 2,
      log: () => undefined,
      kernelImage: pvhKernel([...SAY_K, ...THEN_IDLE]),
    });
    // What Vm.start asks of KVM (once a process): asked here, so a start finds it ready.
    live.vm.kvmSystem.msrIndexList();
    live.vm.kvmSystem.vcpuMmapSize();
    await live.vm.destroy();
  } catch {
    // A host where the rehearsal cannot build a VM cannot build the real one either: its start says why.
  }
}
