// A seccomp filter compiler: a list of syscall rules (optionally with argument conditions,
// as Firecracker's seccompiler writes them) becomes a classic-BPF program the kernel runs
// on every system call of the thread (Documentation/userspace-api/seccomp_filter.rst).
//
// The program: check the architecture (anything but x86-64 is killed: a 32-bit syscall
// would be judged by the wrong table), refuse the x32 ABI (nr >= 0x40000000), then one
// comparison per syscall that has rules. A syscall's rules are tried in order; the first
// whose conditions all hold gives its action; otherwise the filter's mismatch action.
import { SYSCALLS_X86_64 } from './syscalls.js';

/** struct seccomp_data: nr, arch, instruction_pointer, args[6] (linux/seccomp.h). */
export const SECCOMP_DATA = { nr: 0, arch: 4, args: 16 } as const;
export const AUDIT_ARCH_X86_64 = 0xc000003e;
const X32_SYSCALL_BIT = 0x40000000;
/** BPF_MAXINSNS (linux/bpf_common.h): the kernel refuses longer programs. */
export const BPF_MAXINSNS = 4096;

/** Return values (linux/seccomp.h); the low 16 bits carry data for ERRNO and TRACE. */
export const SECCOMP_RET = {
  KILL_PROCESS: 0x80000000,
  KILL_THREAD: 0x00000000,
  TRAP: 0x00030000,
  ERRNO: 0x00050000,
  TRACE: 0x7ff00000,
  LOG: 0x7ffc0000,
  ALLOW: 0x7fff0000,
} as const;

export type SeccompAction =
  'allow' | 'kill_process' | 'kill_thread' | 'trap' | 'log' | { readonly errno: number } | { readonly trace: number };

export function actionValue(action: SeccompAction): number {
  if (typeof action === 'object') {
    const data = 'errno' in action ? action.errno : action.trace;
    return ('errno' in action ? SECCOMP_RET.ERRNO : SECCOMP_RET.TRACE) | (data & 0xffff);
  }
  const table = {
    allow: SECCOMP_RET.ALLOW,
    kill_process: SECCOMP_RET.KILL_PROCESS,
    kill_thread: SECCOMP_RET.KILL_THREAD,
    trap: SECCOMP_RET.TRAP,
    log: SECCOMP_RET.LOG,
  };
  return table[action];
}

export type ArgOp = 'eq' | 'ne' | 'lt' | 'le' | 'gt' | 'ge' | { readonly masked_eq: bigint };

/** One condition on a syscall argument: `args[index] op val`, over 32 or 64 bits. */
export interface ArgCondition {
  readonly index: number;
  readonly type: 'dword' | 'qword';
  readonly op: ArgOp;
  readonly val: bigint;
}

export interface SyscallRule {
  readonly syscall: string;
  /** All must hold (none: the syscall matches whatever its arguments). */
  readonly args?: readonly ArgCondition[];
  /** What a match gives (the filter's matchAction when absent). */
  readonly action?: SeccompAction;
}

export interface FilterSpec {
  /** What a syscall no rule matches gets. */
  readonly mismatchAction: SeccompAction;
  /** What a matching rule gives by default. */
  readonly matchAction: SeccompAction;
  readonly rules: readonly SyscallRule[];
}

export class SeccompError extends Error {}

/** struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}. */
export interface Insn {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

// linux/bpf_common.h opcodes
const BPF_LD_W_ABS = 0x20;
const BPF_ALU_AND_K = 0x54;
const BPF_JMP_JEQ_K = 0x15;
const BPF_JMP_JGT_K = 0x25;
const BPF_JMP_JGE_K = 0x35;
const BPF_JMP_JA = 0x05;
const BPF_RET_K = 0x06;

/** A jump target inside the program being built, resolved once the layout is known. */
type Label = { at: number };
type Target = Label | 'next';
interface Pending {
  code: number;
  k: number;
  jt?: Target;
  jf?: Target;
}

class Assembler {
  readonly code: Pending[] = [];
  label(): Label {
    return { at: -1 };
  }
  place(label: Label): void {
    label.at = this.code.length;
  }
  load(offset: number): void {
    this.code.push({ code: BPF_LD_W_ABS, k: offset });
  }
  and(mask: number): void {
    this.code.push({ code: BPF_ALU_AND_K, k: mask >>> 0 });
  }
  jump(code: number, k: number, jt: Target, jf: Target): void {
    this.code.push({ code, k: k >>> 0, jt, jf });
  }
  ret(value: number): void {
    this.code.push({ code: BPF_RET_K, k: value >>> 0 });
  }
  finish(): Insn[] {
    return this.code.map((p, i) => {
      const offset = (t: Target | undefined): number => {
        if (t === undefined || t === 'next') return 0;
        if (t.at < 0) throw new SeccompError('internal error: a jump to an unplaced label');
        const d = t.at - i - 1;
        if (d < 0) throw new SeccompError('internal error: a backward jump');
        return d;
      };
      const jt = offset(p.jt);
      const jf = offset(p.jf);
      if (jt > 255 || jf > 255) throw new SeccompError('a rule block is too long for a conditional jump (255)');
      return { code: p.code, jt, jf, k: p.k };
    });
  }
}

const lo = (v: bigint) => Number(v & 0xffffffffn);
const hi = (v: bigint) => Number((v >> 32n) & 0xffffffffn);

/** Emits the test of one condition: falls through when it holds, jumps to `fail` when not. */
function condition(a: Assembler, c: ArgCondition, fail: Label): void {
  if (!Number.isInteger(c.index) || c.index < 0 || c.index > 5)
    throw new SeccompError(`argument index ${c.index} is out of range (0-5)`);
  const low = SECCOMP_DATA.args + 8 * c.index;
  const high = low + 4;
  const max = c.type === 'dword' ? 0xffffffffn : 0xffffffffffffffffn;
  if (c.val < 0n || c.val > max) throw new SeccompError(`value ${c.val} does not fit a ${c.type}`);
  const wide = c.type === 'qword';
  if (typeof c.op === 'object') {
    const mask = c.op.masked_eq;
    if (wide) {
      a.load(high);
      a.and(hi(mask));
      a.jump(BPF_JMP_JEQ_K, hi(c.val & mask), 'next', fail);
    }
    a.load(low);
    a.and(lo(mask));
    a.jump(BPF_JMP_JEQ_K, lo(c.val & mask), 'next', fail);
    return;
  }
  const pass = a.label();
  switch (c.op) {
    case 'eq':
      if (wide) {
        a.load(high);
        a.jump(BPF_JMP_JEQ_K, hi(c.val), 'next', fail);
      }
      a.load(low);
      a.jump(BPF_JMP_JEQ_K, lo(c.val), 'next', fail);
      return;
    case 'ne':
      if (wide) {
        a.load(high);
        a.jump(BPF_JMP_JEQ_K, hi(c.val), 'next', pass);
      }
      a.load(low);
      a.jump(BPF_JMP_JEQ_K, lo(c.val), fail, 'next');
      a.place(pass);
      return;
    default: {
      // Unsigned comparisons, as seccompiler and libseccomp make them. lt = !ge, le = !gt.
      const strict = c.op === 'gt' || c.op === 'le';
      const negate = c.op === 'lt' || c.op === 'le';
      const compare = strict ? BPF_JMP_JGT_K : BPF_JMP_JGE_K;
      const yes: Target = negate ? fail : pass;
      const no: Target = negate ? pass : fail;
      if (wide) {
        a.load(high);
        a.jump(BPF_JMP_JGT_K, hi(c.val), yes, 'next');
        a.jump(BPF_JMP_JEQ_K, hi(c.val), 'next', no);
      }
      a.load(low);
      a.jump(compare, lo(c.val), yes, no);
      a.place(pass);
      return;
    }
  }
}

/** Looks a syscall's number up by name (x86-64). */
export function syscallNumber(name: string): number {
  const nr = Object.hasOwn(SYSCALLS_X86_64, name) ? SYSCALLS_X86_64[name] : undefined;
  if (nr === undefined) throw new SeccompError(`unknown syscall '${name}' (x86-64)`);
  return nr;
}

/** Compiles a filter to BPF instructions. */
export function compileFilter(spec: FilterSpec): Insn[] {
  const a = new Assembler();
  const kill = actionValue('kill_process');
  const mismatch = actionValue(spec.mismatchAction);
  a.load(SECCOMP_DATA.arch);
  const archOk = a.label();
  a.jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, archOk, 'next');
  a.ret(kill);
  a.place(archOk);
  a.load(SECCOMP_DATA.nr);
  const native = a.label();
  a.jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 'next', native);
  a.ret(kill);
  a.place(native);

  // Group the rules by syscall, keeping their order.
  const bySyscall = new Map<number, SyscallRule[]>();
  for (const rule of spec.rules) {
    const nr = syscallNumber(rule.syscall);
    const list = bySyscall.get(nr) ?? [];
    list.push(rule);
    bySyscall.set(nr, list);
  }
  for (const [nr, rules] of bySyscall) {
    const nextSyscall = a.label();
    a.jump(BPF_JMP_JEQ_K, nr, 'next', nextSyscall);
    for (const rule of rules) {
      const nextRule = a.label();
      for (const c of rule.args ?? []) condition(a, c, nextRule);
      a.ret(actionValue(rule.action ?? spec.matchAction));
      a.place(nextRule);
      // Conditions reload the accumulator: put the syscall number back for the next rule.
      if (rule.args?.length) a.load(SECCOMP_DATA.nr);
    }
    a.ret(mismatch);
    a.place(nextSyscall);
  }
  a.ret(mismatch);
  const program = a.finish();
  if (program.length > BPF_MAXINSNS)
    throw new SeccompError(`the filter has ${program.length} instructions; the kernel takes at most ${BPF_MAXINSNS}`);
  return program;
}

/** The program as the kernel reads it: 8 bytes per struct sock_filter. */
export function encodeProgram(program: readonly Insn[]): Buffer {
  const out = Buffer.alloc(program.length * 8);
  program.forEach((insn, i) => {
    out.writeUInt16LE(insn.code, i * 8);
    out.writeUInt8(insn.jt, i * 8 + 2);
    out.writeUInt8(insn.jf, i * 8 + 3);
    out.writeUInt32LE(insn.k >>> 0, i * 8 + 4);
  });
  return out;
}

/** The inverse of encodeProgram: a loaded program's instructions. */
export function decodeProgram(bytes: Uint8Array): Insn[] {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: Insn[] = [];
  for (let at = 0; at + 8 <= b.length; at += 8)
    out.push({ code: b.readUInt16LE(at), jt: b.readUInt8(at + 2), jf: b.readUInt8(at + 3), k: b.readUInt32LE(at + 4) });
  return out;
}

/** Whether `program` (encoded) lets system call `name` through (called with all arguments zero). */
export function programAllows(program: Uint8Array, name: string): boolean {
  return runProgram(decodeProgram(program), { nr: syscallNumber(name) }) === SECCOMP_RET.ALLOW;
}

/** struct seccomp_data for a syscall, as the kernel hands it to the filter. */
export interface SeccompData {
  readonly nr: number;
  readonly arch?: number;
  readonly args?: readonly bigint[];
}

/**
 * Runs a program the way the kernel's classic-BPF interpreter would, for tests: the same
 * program that is loaded is judged by an independent reading of its instructions.
 */
export function runProgram(program: readonly Insn[], data: SeccompData): number {
  const word = (offset: number): number => {
    if (offset === SECCOMP_DATA.nr) return data.nr >>> 0;
    if (offset === SECCOMP_DATA.arch) return (data.arch ?? AUDIT_ARCH_X86_64) >>> 0;
    const i = (offset - SECCOMP_DATA.args) >> 3;
    const v = data.args?.[i] ?? 0n;
    return (offset - SECCOMP_DATA.args) % 8 === 0 ? lo(v) : hi(v);
  };
  let acc = 0;
  for (let pc = 0; pc < program.length; pc++) {
    const { code, jt, jf, k } = program[pc]!;
    switch (code) {
      case BPF_LD_W_ABS:
        acc = word(k);
        break;
      case BPF_ALU_AND_K:
        acc = (acc & k) >>> 0;
        break;
      case BPF_JMP_JA:
        pc += k;
        break;
      case BPF_JMP_JEQ_K:
        pc += acc === k >>> 0 ? jt : jf;
        break;
      case BPF_JMP_JGT_K:
        pc += acc > k >>> 0 ? jt : jf;
        break;
      case BPF_JMP_JGE_K:
        pc += acc >= k >>> 0 ? jt : jf;
        break;
      case BPF_RET_K:
        return k >>> 0;
      default:
        throw new SeccompError(`unknown BPF opcode ${code}`);
    }
  }
  throw new SeccompError('the program fell off its end');
}
