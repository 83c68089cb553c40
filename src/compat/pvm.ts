// Compatibility with software KVM (kvm_pvm), which runs guest user mode natively and
// emulates guest kernel mode, incompletely. Everything Kiln does differently for it lives
// here, and none of it is active on hardware KVM:
//
// 1. Emulation failures (KVM_EXIT_INTERNAL_ERROR, suberror 1) on instructions the
//    emulator lacks are finished here: `int3` injects #BP with RIP past it (the kernel's
//    int3 self-test), `fwait` is a no-op, `clac`/`stac` are skipped (only seen if SMAP
//    is visible).
// 2. kvm_pvm's user-mode `syscall` leaves CS/SS at the user selectors, so the kernel's
//    syscall entry faults. Once the kernel has set LSTAR (and so its final IDT), Kiln
//    writes a small stub (guests/compat/syscall-fix.S) into the unused bytes after the
//    kernel's _etext and points IDT vector 14 at it; the stub completes exactly that
//    fault into a kernel-mode entry and passes every other #PF on.
// 3. CPUID changes are ignored for most bits, so the `pvm` CPU template hides features
//    on the kernel command line instead (cpu/templates.ts).
import { existsSync } from 'node:fs';
import { SYSCALL_FIX_HEX } from './syscall-fix-code.js';
import type { VcpuFd } from '../kvm/kvm.js';
import { kvm_run } from '../kvm/structs.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { MSR_LSTAR } from '../cpu/setup.js';

/**
 * kvm_pvm's module is loaded: /dev/kvm is software KVM. Inside kiln-jailer's jail there is
 * no /sys; the jailer looks before it pivots and says so in KILN_HOST_KVM.
 */
export function isSoftwareKvm(): boolean {
  return process.env.KILN_HOST_KVM === 'pvm' || existsSync('/sys/module/kvm_pvm');
}

/** What the vCPU threads need to apply the syscall fix. */
export interface SyscallFixPlan {
  /** Where the stub goes: just after the kernel's _etext. */
  readonly gpa: number;
  readonly vaddr: bigint;
  readonly code: Uint8Array;
  /** Offsets in `code` of the LSTAR and original-handler slots. */
  readonly lstarSlot: number;
  readonly handlerSlot: number;
}

export interface CompatConfig {
  readonly syscallFix: SyscallFixPlan | null;
}

const STUB_ALIGN = 16;

/**
 * Plans the syscall fix for an ELF kernel: places the (position-independent) stub
 * and checks it fits between _etext and the end of that page. Null if it cannot.
 */
export function planSyscallFix(textEnd: { vaddr: bigint; paddr: number } | null): SyscallFixPlan | null {
  if (!textEnd) return null;
  const pad = (STUB_ALIGN - (textEnd.paddr % STUB_ALIGN)) % STUB_ALIGN;
  const gpa = textEnd.paddr + pad;
  const vaddr = textEnd.vaddr + BigInt(pad);
  const code = Uint8Array.from(Buffer.from(SYSCALL_FIX_HEX, 'hex'));
  if ((gpa % 4096) + code.length > 4096) return null;
  // The two 8-byte slots are the last 16 bytes of the stub.
  return { gpa, vaddr, code, lstarSlot: code.length - 16, handlerSlot: code.length - 8 };
}

// IDT gate layout (SDM vol. 3, 6.14.1): offset 15:0, selector, IST, type, offset 31:16, offset 63:32.
const IDT_GATE_SIZE = 16;
const VECTOR_PAGE_FAULT = 14;
const VECTOR_BREAKPOINT = 3;
const KVM_INTERNAL_ERROR_EMULATION = 1;
const EMULATION_FLAG_INSTRUCTION_BYTES = 1n;

const OFF_SUBERROR = kvm_run.offsetOf('emulation_failure.suberror');
const OFF_FLAGS = kvm_run.offsetOf('emulation_failure.flags');
const OFF_INSN_SIZE = kvm_run.offsetOf('emulation_failure.insn_size');
const OFF_INSN_BYTES = kvm_run.offsetOf('emulation_failure.insn_bytes');

/** Per-vCPU-thread state of the compatibility layer. */
export class PvmCompat {
  /** How many times each kind of instruction was finished here. */
  readonly counts: Record<string, number> = {};
  private installAttempted = false;
  private exitsSinceCheck = 0;

  constructor(
    private readonly config: CompatConfig,
    private readonly vcpu: VcpuFd,
    private readonly memory: GuestMemory,
    private readonly run: DataView,
    /** Returns true for exactly one caller per VM (the syscall fix is VM-wide). */
    private readonly claimInstall: () => boolean,
    private readonly log: (line: string) => void,
  ) {}

  private count(kind: string): void {
    if (!this.counts[kind]) this.log(`kvm_pvm: finishing '${kind}' in the VMM (logged once; counts at exit)`);
    this.counts[kind] = (this.counts[kind] ?? 0) + 1;
  }

  /** The instruction bytes at RIP: from KVM's exit data, or read through the guest's paging. */
  private instruction(rip: bigint): Uint8Array {
    const size = this.run.getUint8(OFF_INSN_SIZE);
    if ((this.run.getBigUint64(OFF_FLAGS, true) & EMULATION_FLAG_INSTRUCTION_BYTES) !== 0n && size > 0) {
      return new Uint8Array(this.run.buffer, this.run.byteOffset + OFF_INSN_BYTES, Math.min(size, 15));
    }
    const t = this.vcpu.translate(rip);
    if (!t.valid) return new Uint8Array(0);
    const phys = Number(t.physical);
    return this.memory.read(phys, Math.min(15, 4096 - (phys % 4096)));
  }

  /** Handles a KVM_EXIT_INTERNAL_ERROR if it is an emulation failure Kiln can finish. */
  handleInternalError(): boolean {
    if (this.run.getUint32(OFF_SUBERROR, true) !== KVM_INTERNAL_ERROR_EMULATION) return false;
    const regs = this.vcpu.getRegs();
    const rip = regs.rip as bigint;
    const insn = this.instruction(rip);
    const skip = (length: number) => this.vcpu.setRegs({ ...regs, rip: rip + BigInt(length) });
    if (insn[0] === 0xcc) {
      // int3 is a trap: the #BP frame's RIP points after it.
      skip(1);
      const events = this.vcpu.getVcpuEvents();
      this.vcpu.setVcpuEvents({
        ...events,
        exception: { injected: 1, nr: VECTOR_BREAKPOINT, has_error_code: 0, pending: 0, error_code: 0 },
      });
      this.count('int3');
      return true;
    }
    if (insn[0] === 0x9b) {
      skip(1);
      this.count('fwait');
      return true;
    }
    if (insn[0] === 0x0f && insn[1] === 0x01 && (insn[2] === 0xca || insn[2] === 0xcb)) {
      skip(3);
      this.count(insn[2] === 0xca ? 'clac' : 'stac');
      return true;
    }
    return false;
  }

  /**
   * Called after exits until the fix is in: once the kernel has written LSTAR (its
   * syscall entry, set up after its final IDT), install the stub. Checks every 64 exits.
   */
  afterExit(): void {
    if (this.installAttempted || !this.config.syscallFix || ++this.exitsSinceCheck < 64) return;
    this.exitsSinceCheck = 0;
    const lstar = this.vcpu.getMsrs([MSR_LSTAR]).get(MSR_LSTAR) ?? 0n;
    if (lstar === 0n) return;
    this.installAttempted = true;
    if (!this.claimInstall()) return;
    this.install(this.config.syscallFix, lstar);
  }

  private install(plan: SyscallFixPlan, lstar: bigint): void {
    const idtBase = (this.vcpu.getSregs().idt as { base: bigint }).base;
    const gateVaddr = idtBase + BigInt(VECTOR_PAGE_FAULT * IDT_GATE_SIZE);
    const t = this.vcpu.translate(gateVaddr);
    if (!t.valid) {
      this.log('kvm_pvm: cannot install the syscall fix: the IDT is not mapped');
      return;
    }
    const gate = Number(t.physical);
    const original =
      BigInt(this.memory.readU16(gate)) |
      (BigInt(this.memory.readU16(gate + 6)) << 16n) |
      (BigInt(this.memory.readU32(gate + 8)) << 32n);
    const code = Uint8Array.from(plan.code);
    const slots = new DataView(code.buffer);
    slots.setBigUint64(plan.lstarSlot, lstar, true);
    slots.setBigUint64(plan.handlerSlot, original, true);
    this.memory.write(plan.gpa, code);
    this.memory.writeU16(gate, Number(plan.vaddr & 0xffffn));
    this.memory.writeU16(gate + 6, Number((plan.vaddr >> 16n) & 0xffffn));
    this.memory.writeU32(gate + 8, Number((plan.vaddr >> 32n) & 0xffff_ffffn));
    this.counts['syscall-fix'] = 1;
    this.log(
      `kvm_pvm: syscall fix installed at 0x${plan.vaddr.toString(16)} (LSTAR 0x${lstar.toString(16)}, #PF handler 0x${original.toString(16)})`,
    );
  }
}
