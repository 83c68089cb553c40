// A vCPU's whole state as KVM holds it, saved and restored on the vCPU's own thread (KVM
// wants vCPU ioctls from the thread that runs it) while it is outside KVM_RUN. The
// structs are kept as the bytes KVM gives (this host's layout; the state file records
// the format version); MSRs as (index, value) pairs: every index KVM_GET_MSR_INDEX_LIST
// names that KVM_GET_MSRS can read, not a hand-picked subset.
import { KilnError } from '../errors.js';
import { KVM_STATE_BYTES } from '../kvm/ioctl.js';
import { KvmIoctlError } from '../kvm/errors.js';
import type { VcpuFd } from '../kvm/kvm.js';
import * as s from '../kvm/structs.js';

export interface SavedVcpu {
  readonly mpState: Uint8Array;
  readonly regs: Uint8Array;
  readonly sregs: Uint8Array;
  /** KVM_GET_XSAVE where KVM has it, else the legacy FPU state. */
  readonly xsave?: Uint8Array;
  readonly fpu?: Uint8Array;
  readonly xcrs?: Uint8Array;
  readonly debugregs?: Uint8Array;
  readonly lapic?: Uint8Array;
  readonly events: Uint8Array;
  /** [index, value] for every MSR saved. */
  readonly msrs: ReadonlyArray<readonly [number, bigint]>;
  /** The guest TSC's frequency (null: KVM does not say). */
  readonly tscKhz: number | null;
}

/** Runs `get`, or returns undefined where KVM lacks that ioctl (EINVAL/ENOTTY/ENXIO). */
function optional<T>(get: () => T): T | undefined {
  try {
    return get();
  } catch (err) {
    if (err instanceof KvmIoctlError) return undefined;
    throw err;
  }
}

/** MSRs KVM lists but does not let a vCPU read (KVM_GET_MSRS stops at the first it refuses): skipped. */
function readMsrs(vcpu: VcpuFd, indices: readonly number[]): Array<[number, bigint]> {
  const out: Array<[number, bigint]> = [];
  let rest = indices;
  while (rest.length > 0) {
    const got = vcpu.getMsrs(rest);
    for (const [index, value] of got) out.push([index, value]);
    // The one at position got.size was refused: skip it and go on after it.
    rest = rest.slice(got.size + 1);
  }
  return out;
}

/** IA32_TSC_DEADLINE: restored last among MSRs (after the LAPIC), as KVM needs. */
const MSR_IA32_TSC_DEADLINE = 0x6e0;

/** The LAPIC's LVT timer register in kvm_lapic_state (the register page). */
const APIC_LVTT = 0x320;
const LVT_MASKED = 1 << 16;
const LVT_TIMER_MODE_SHIFT = 17;
const LVT_TIMER_TSC_DEADLINE = 2;

/**
 * The TSC-deadline fix-up (Firecracker's too): KVM reads IA32_TSC_DEADLINE back as 0 once
 * the deadline has passed, also when the vCPU was stopped before the timer interrupt was
 * delivered; restored as 0, the timer is disarmed and a guest waiting on it (Linux's
 * tick, in TSC-deadline mode) may wait for ever. An unmasked LAPIC timer in TSC-deadline
 * mode with a deadline of 0 gets 1: it fires at once after the restore, and a guest takes
 * an early timer interrupt in its stride. Returns whether it changed anything.
 */
export function fixZeroTscDeadline(msrs: Array<[number, bigint]>, lapic: Uint8Array | undefined): boolean {
  if (!lapic || lapic.length < APIC_LVTT + 4) return false;
  const lvtt = Buffer.from(lapic.buffer, lapic.byteOffset, lapic.length).readUInt32LE(APIC_LVTT);
  const deadlineMode = ((lvtt >>> LVT_TIMER_MODE_SHIFT) & 3) === LVT_TIMER_TSC_DEADLINE;
  if (!deadlineMode || (lvtt & LVT_MASKED) !== 0) return false;
  const at = msrs.findIndex(([index]) => index === MSR_IA32_TSC_DEADLINE);
  if (at < 0 || msrs[at]![1] !== 0n) return false;
  msrs[at] = [MSR_IA32_TSC_DEADLINE, 1n];
  return true;
}

/**
 * Saves the vCPU's state in the order KVM needs: MP state first (reading it may settle
 * pending LAPIC events), vCPU events last.
 */
export function saveVcpu(vcpu: VcpuFd, msrIndices: readonly number[]): SavedVcpu {
  const mpState = vcpu.getBytes('GET_MP_STATE', s.kvm_mp_state.size);
  const regs = vcpu.getBytes('GET_REGS', s.kvm_regs.size);
  const sregs = vcpu.getBytes('GET_SREGS', s.kvm_sregs.size);
  const xsave = optional(() => vcpu.getBytes('GET_XSAVE', KVM_STATE_BYTES.xsave));
  const fpu = xsave ? undefined : vcpu.getBytes('GET_FPU', s.kvm_fpu.size);
  const xcrs = optional(() => vcpu.getBytes('GET_XCRS', KVM_STATE_BYTES.xcrs));
  const debugregs = optional(() => vcpu.getBytes('GET_DEBUGREGS', KVM_STATE_BYTES.debugregs));
  const lapic = optional(() => vcpu.getBytes('GET_LAPIC', s.kvm_lapic_state.size));
  const tscKhz = optional(() => vcpu.tscKhz()) ?? null;
  const msrs = readMsrs(vcpu, msrIndices);
  fixZeroTscDeadline(msrs, lapic);
  const events = vcpu.getBytes('GET_VCPU_EVENTS', s.kvm_vcpu_events.size);
  return {
    mpState,
    regs,
    sregs,
    ...(xsave ? { xsave } : {}),
    ...(fpu ? { fpu } : {}),
    ...(xcrs ? { xcrs } : {}),
    ...(debugregs ? { debugregs } : {}),
    ...(lapic ? { lapic } : {}),
    events,
    msrs,
    tscKhz,
  };
}

/**
 * Restores a saved vCPU (its CPUID already set) in KVM's order: MP state, regs (which
 * clear pending exceptions, so before the events), sregs (the APIC base), FPU/XSAVE,
 * XCRs, debug registers, the LAPIC (before the MSRs, or the TSC deadline is lost), the
 * MSRs, the events. Returns warnings (a TSC frequency this host cannot match).
 */
export function restoreVcpu(vcpu: VcpuFd, saved: SavedVcpu): string[] {
  const warnings: string[] = [];
  if (saved.tscKhz !== null) {
    const here = optional(() => vcpu.tscKhz());
    if (here !== undefined && Math.abs(here - saved.tscKhz) * 1e6 > 250 * saved.tscKhz) {
      if (optional(() => vcpu.setTscKhz(saved.tscKhz!)) === undefined)
        warnings.push(
          `the guest's TSC ran at ${saved.tscKhz} kHz, this host's at ${here} kHz, and KVM cannot scale it`,
        );
    }
  }
  vcpu.setBytes('SET_MP_STATE', saved.mpState, s.kvm_mp_state.size);
  vcpu.setBytes('SET_REGS', saved.regs, s.kvm_regs.size);
  vcpu.setBytes('SET_SREGS', saved.sregs, s.kvm_sregs.size);
  if (saved.xsave) vcpu.setBytes('SET_XSAVE', saved.xsave, KVM_STATE_BYTES.xsave);
  else if (saved.fpu) vcpu.setBytes('SET_FPU', saved.fpu, s.kvm_fpu.size);
  if (saved.xcrs) vcpu.setBytes('SET_XCRS', saved.xcrs, KVM_STATE_BYTES.xcrs);
  if (saved.debugregs) vcpu.setBytes('SET_DEBUGREGS', saved.debugregs, KVM_STATE_BYTES.debugregs);
  if (saved.lapic) vcpu.setBytes('SET_LAPIC', saved.lapic, s.kvm_lapic_state.size);
  const msrs = new Map(saved.msrs.filter(([i]) => i !== MSR_IA32_TSC_DEADLINE));
  try {
    vcpu.setMsrs(msrs);
  } catch (err) {
    // Name the MSR KVM refused (it stops at the first).
    const list = [...msrs];
    const refused = list.find(([index, value]) => {
      try {
        vcpu.setMsrs(new Map([[index, value]]));
        return false;
      } catch {
        return true;
      }
    });
    throw new KilnError(
      `KVM refused to restore MSR ${refused ? `0x${refused[0].toString(16)}` : '(unknown)'}: ${(err as Error).message}`,
    );
  }
  const deadline = saved.msrs.find(([i]) => i === MSR_IA32_TSC_DEADLINE);
  if (deadline) {
    try {
      vcpu.setMsrs(new Map([deadline]));
    } catch (err) {
      warnings.push(`the TSC deadline timer was not restored: ${(err as Error).message}`);
    }
  }
  vcpu.setBytes('SET_VCPU_EVENTS', saved.events, s.kvm_vcpu_events.size);
  return warnings;
}
