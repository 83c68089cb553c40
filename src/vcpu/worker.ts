// A vCPU thread: runs KVM_RUN in a loop and dispatches each port-I/O and MMIO exit to
// this thread's own bus devices (built from the VM's shared device specs). The loop
// allocates nothing per exit: kvm_run is read through one DataView, and the access
// bytes handed to devices are cached subarrays of the kvm_run mapping.
//
// Kicking: the kick signal is blocked on this thread except inside KVM_RUN
// (KVM_SET_SIGNAL_MASK). A kick that lands while the guest runs makes KVM_RUN return
// EINTR; one that lands between runs stays pending and makes the next KVM_RUN return
// EINTR at once. Either way the thread then sees its request cell and consumes the
// pending signal with sigtimedwait, so there is no window in which a kick is lost.
import { parentPort } from 'node:worker_threads';
import { workerInit } from '../warm-workers.js';
import { PvmCompat } from '../compat/pvm.js';
import { irqLineSetter, msiSender } from '../devices/irq.js';
import { buildBuses } from '../devices/catalogue.js';
import { KVM, KVM_EXIT, KVM_EXIT_IO_OUT, exitReasonName } from '../kvm/ioctl.js';
import { ioctlBuf, VcpuFd } from '../kvm/kvm.js';
import * as libc from '../kvm/libc.js';
import { dataView } from '../kvm/struct.js';
import { GuestMemory } from '../memory/guest-memory.js';
import { kvm_run, kvm_signal_mask } from '../kvm/structs.js';
import * as ctl from './control.js';
import { restoreVcpu, saveVcpu } from '../snapshot/vcpu-state.js';
import { installProgram } from '../seccomp/install.js';
import type { VcpuExit, VcpuExitReason, VcpuMessage, VcpuWorkerInit } from './messages.js';

// kvm_run's layout: worked out while a warm thread waits for its VM.
const OFF_EXIT_REASON = kvm_run.offsetOf('exit_reason');
const OFF_IO_DIRECTION = kvm_run.offsetOf('io.direction');
const OFF_IO_SIZE = kvm_run.offsetOf('io.size');
const OFF_IO_PORT = kvm_run.offsetOf('io.port');
const OFF_IO_COUNT = kvm_run.offsetOf('io.count');
const OFF_IO_DATA_OFFSET = kvm_run.offsetOf('io.data_offset');
const OFF_MMIO_PHYS_ADDR = kvm_run.offsetOf('mmio.phys_addr');
const OFF_MMIO_DATA = kvm_run.offsetOf('mmio.data');
const OFF_MMIO_LEN = kvm_run.offsetOf('mmio.len');
const OFF_MMIO_IS_WRITE = kvm_run.offsetOf('mmio.is_write');
const OFF_FAIL_ENTRY_REASON = kvm_run.offsetOf('fail_entry.hardware_entry_failure_reason');
const OFF_INTERNAL_SUBERROR = kvm_run.offsetOf('internal.suberror');
const OFF_INTERNAL_NDATA = kvm_run.offsetOf('internal.ndata');
const OFF_INTERNAL_DATA = kvm_run.offsetOf('internal.data');

// Started with its VM's details, or warm (warm-workers.ts): its modules loaded, waiting for them.
const init = await workerInit<VcpuWorkerInit>();
const port = parentPort!;
const post = (message: VcpuMessage) => port.postMessage(message);
const cells = new Int32Array(init.control);
const REQUEST = ctl.requestCell(init.id);
const STATE = ctl.stateCell(init.id);
const vcpu = new VcpuFd(init.vcpuFd);

// ---- signals ----
const kickSet = Buffer.alloc(libc.GLIBC_SIGSET_BYTES);
libc.sigemptyset(kickSet);
libc.sigaddset(kickSet, init.kickSignal);
libc.pthreadSigmask(libc.SIG_BLOCK, kickSet, null);
{
  const current = Buffer.alloc(libc.GLIBC_SIGSET_BYTES);
  libc.pthreadSigmask(libc.SIG_BLOCK, null, current);
  const mask = kvm_signal_mask.alloc(libc.KERNEL_SIGSET_BYTES);
  kvm_signal_mask.encode(dataView(mask), 0, { len: libc.KERNEL_SIGSET_BYTES });
  current.copy(mask, kvm_signal_mask.flexOffset, 0, libc.KERNEL_SIGSET_BYTES);
  const bit = init.kickSignal - 1;
  mask[kvm_signal_mask.flexOffset + (bit >> 3)]! &= ~(1 << (bit & 7));
  ioctlBuf(init.vcpuFd, 'SET_SIGNAL_MASK', mask);
}
const noWait = Buffer.alloc(16); // struct timespec {0, 0}
function consumeKicks(): void {
  while (libc.sigtimedwait(kickSet, null, noWait) > 0) {
    // each call removes one pending kick
  }
}

// ---- kvm_run ----
const runAddr = libc.mmap(null, init.runMmapSize, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, init.vcpuFd, 0);
if (runAddr === libc.MAP_FAILED) throw new Error(`mmap of kvm_run failed: ${libc.errnoName(libc.errno())}`);
const runBuffer = libc.view(runAddr, init.runMmapSize);
const run = new DataView(runBuffer);
const runBytes = new Uint8Array(runBuffer);

/** MMIO access bytes for each length 1..8, at kvm_run.mmio.data. */
const mmioData: Uint8Array[] = [];
for (let len = 0; len <= 8; len++) mmioData.push(runBytes.subarray(OFF_MMIO_DATA, OFF_MMIO_DATA + len));
/** Port I/O access bytes, by (offset into kvm_run) * 16 + size; filled on first use. */
const ioData = new Map<number, Uint8Array>();
function ioSlice(offset: number, size: number): Uint8Array {
  const key = offset * 16 + size;
  let slice = ioData.get(key);
  if (slice === undefined) {
    slice = runBytes.subarray(offset, offset + size);
    ioData.set(key, slice);
  }
  return slice;
}

// ---- devices ----
let guestExitCause = '';
const memory = GuestMemory.attach(init.memory);
const buses = buildBuses(
  init.devices,
  {
    memory,
    vmFd: init.vmFd,
    signalMsi: msiSender(init.vmFd),
    requestExit(code, cause) {
      if (ctl.requestVmExit(cells, code)) guestExitCause = cause;
    },
    requestReset(cause) {
      if (ctl.requestVmExit(cells, 0, ctl.EXIT_KIND_RESET)) guestExitCause = cause;
    },
    setIrq: irqLineSetter(init.vmFd),
  },
  (source, line) => post({ type: 'log', source, line }),
);
for (const bus of [buses.pio, buses.mmio])
  bus.onFault = (base, err) =>
    log(
      `the ${bus.name} device at 0x${base.toString(16)} failed (${err instanceof Error ? err.message : String(err)}); it is out of service on this vCPU (reads all-ones, writes ignored) and the VM goes on`,
    );
const reportedUnhandled = new Set<string>();
function unhandled(what: string): void {
  if (!init.logUnhandled || reportedUnhandled.has(what)) return;
  reportedUnhandled.add(what);
  log(`${what} (nothing mapped there; further ones not logged)`);
}

/** A u64 field of kvm_run as a number; getBigUint64 would allocate a BigInt per exit. */
function readU64(offset: number): number {
  return run.getUint32(offset, true) + run.getUint32(offset + 4, true) * 2 ** 32;
}

function log(line: string): void {
  post({ type: 'log', source: `vcpu${init.id}`, line });
}
const compat = init.compat
  ? new PvmCompat(
      init.compat,
      vcpu,
      memory,
      run,
      () => Atomics.compareExchange(cells, ctl.VM_COMPAT_CLAIM, 0, 1) === 0,
      log,
    )
  : null;

let exits = 0;
let startedAt = 0;

// The metrics' exit counters (exit_io_in, exit_io_out, exit_mmio_read, exit_mmio_write).
const exitCounts = init.exitCounters ? new Float64Array(init.exitCounters) : new Float64Array(4);

function handleIo(): void {
  const size = run.getUint8(OFF_IO_SIZE);
  const portNumber = run.getUint16(OFF_IO_PORT, true);
  const count = run.getUint32(OFF_IO_COUNT, true);
  const base = readU64(OFF_IO_DATA_OFFSET);
  const out = run.getUint8(OFF_IO_DIRECTION) === KVM_EXIT_IO_OUT;
  exitCounts[out ? 1 : 0]! += 1;
  // String I/O (rep outs/ins) arrives as one exit with `count` elements.
  for (let i = 0; i < count; i++) {
    const data = ioSlice(base + i * size, size);
    if (out) {
      if (!buses.pio.write(portNumber, data)) unhandled(`write to port 0x${portNumber.toString(16)}`);
    } else if (!buses.pio.read(portNumber, data)) {
      data.fill(0xff);
      unhandled(`read from port 0x${portNumber.toString(16)}`);
    }
  }
}

function handleMmio(): void {
  const addr = readU64(OFF_MMIO_PHYS_ADDR);
  const len = run.getUint32(OFF_MMIO_LEN, true);
  const data = mmioData[len > 8 ? 8 : len]!;
  const write = run.getUint8(OFF_MMIO_IS_WRITE) !== 0;
  exitCounts[write ? 3 : 2]! += 1;
  if (write) {
    if (!buses.mmio.write(addr, data)) unhandled(`MMIO write at 0x${addr.toString(16)}`);
  } else if (!buses.mmio.read(addr, data)) {
    data.fill(0xff);
    unhandled(`MMIO read at 0x${addr.toString(16)}`);
  }
}

// ---- reporting (off the hot path) ----
const hex = (v: number | bigint) => `0x${v.toString(16)}`;

function snapshot(): Pick<VcpuExit, 'regs' | 'sregs'> {
  try {
    const sregs = vcpu.getSregs();
    const pick = (k: string) => sregs[k]!;
    return {
      regs: vcpu.getRegs(),
      sregs: {
        cs: pick('cs'),
        ss: pick('ss'),
        cr0: pick('cr0'),
        cr3: pick('cr3'),
        cr4: pick('cr4'),
        efer: pick('efer'),
      },
    };
  } catch {
    // KVM may refuse register reads after a failed entry; the exit is reported without them.
    return {};
  }
}

function describeExit(reason: number): { reason: VcpuExitReason; detail: string } {
  switch (reason) {
    case KVM_EXIT.HLT:
      return { reason: 'hlt', detail: 'the guest halted (HLT) with no interrupt controller to wake it' };
    case KVM_EXIT.SHUTDOWN:
      return { reason: 'shutdown', detail: 'the guest triple-faulted (KVM_EXIT_SHUTDOWN)' };
    case KVM_EXIT.FAIL_ENTRY:
      return {
        reason: 'fail-entry',
        detail: `KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason ${hex(run.getBigUint64(OFF_FAIL_ENTRY_REASON, true))})`,
      };
    case KVM_EXIT.INTERNAL_ERROR: {
      const ndata = Math.min(run.getUint32(OFF_INTERNAL_NDATA, true), 16);
      const data: string[] = [];
      for (let i = 0; i < ndata; i++) data.push(hex(run.getBigUint64(OFF_INTERNAL_DATA + 8 * i, true)));
      return {
        reason: 'internal-error',
        detail: `KVM_EXIT_INTERNAL_ERROR, suberror ${run.getUint32(OFF_INTERNAL_SUBERROR, true)}${data.length ? `, data [${data.join(' ')}]` : ''}`,
      };
    }
    default:
      return { reason: 'unhandled-exit', detail: `Kiln does not handle ${exitReasonName(reason)}` };
  }
}

function finish(reason: VcpuExitReason, detail: string, withRegs: boolean): void {
  Atomics.store(cells, STATE, ctl.STATE_STOPPED);
  const runMs = startedAt === 0 ? 0 : performance.now() - startedAt;
  post({
    type: 'exit',
    exit: {
      vcpu: init.id,
      reason,
      detail,
      exits,
      runMs,
      ...(compat ? { compat: compat.counts } : {}),
      ...(withRegs ? snapshot() : {}),
    },
  });
  libc.munmap(runAddr, init.runMmapSize);
}

/** Parks the thread while paused. Returns false if it should stop instead. */
function parkWhilePaused(): boolean {
  Atomics.store(cells, STATE, ctl.STATE_PAUSED);
  post({ type: 'paused' });
  for (;;) {
    const request = Atomics.load(cells, REQUEST);
    if (request === ctl.REQ_PAUSE) Atomics.wait(cells, REQUEST, ctl.REQ_PAUSE);
    else if (request === ctl.REQ_SAVE) {
      try {
        post({ type: 'state', state: saveVcpu(vcpu, init.msrIndices) });
      } catch (err) {
        post({ type: 'state-error', error: err instanceof Error ? err.message : String(err) });
      }
      Atomics.compareExchange(cells, REQUEST, ctl.REQ_SAVE, ctl.REQ_PAUSE);
    } else break;
  }
  consumeKicks();
  if (Atomics.load(cells, REQUEST) !== ctl.REQ_RUN) return false;
  Atomics.store(cells, STATE, ctl.STATE_RUNNING);
  return true;
}

// ---- the loop ----
function runLoop(): void {
  const fd = init.vcpuFd;
  const KVM_RUN = KVM.RUN;
  startedAt = performance.now();
  for (;;) {
    const request = Atomics.load(cells, REQUEST);
    if (request !== ctl.REQ_RUN) {
      if (request === ctl.REQ_PAUSE && parkWhilePaused()) continue;
      return finish('stopped', 'stopped by the host', true);
    }
    if (Atomics.load(cells, ctl.VM_STATUS) !== ctl.VM_RUNNING) {
      return finish('stopped', 'another vCPU ended the VM', true);
    }
    if (libc.ioctlInt(fd, KVM_RUN, 0) < 0) {
      const e = libc.errno();
      if (e === libc.EINTR || e === libc.EAGAIN) {
        consumeKicks();
        continue;
      }
      return finish('error', `KVM_RUN failed: ${libc.errnoName(e)} (${libc.strerror(e)})`, true);
    }
    const reason = run.getUint32(OFF_EXIT_REASON, true);
    if (reason === KVM_EXIT.IO) handleIo();
    else if (reason === KVM_EXIT.MMIO) handleMmio();
    else if (reason === KVM_EXIT.INTR) {
      consumeKicks();
      continue;
    } else if (reason === KVM_EXIT.INTERNAL_ERROR && compat?.handleInternalError()) {
      continue;
    } else {
      const { reason: why, detail } = describeExit(reason);
      return finish(why, detail, true);
    }
    exits++;
    if (compat) compat.afterExit();
    if (Atomics.load(cells, ctl.VM_STATUS) !== ctl.VM_RUNNING) {
      if (guestExitCause) return finish('guest-exit', guestExitCause, false);
      return finish('stopped', 'another vCPU ended the VM', true);
    }
  }
}

libc.pthreadSetnameNp(libc.pthreadSelf(), `fc_vcpu ${init.id}`);
if (init.restore) {
  // A snapshot's state, before the first KVM_RUN; then tell a kvmclock guest it was stopped.
  for (const warning of restoreVcpu(vcpu, init.restore)) log(warning);
  vcpu.kvmclockCtrl();
}
if (init.seccomp) installProgram(init.seccomp, { allThreads: false });
Atomics.store(cells, STATE, ctl.STATE_RUNNING);
post({
  type: 'ready',
  thread: libc.pthreadSelf(),
  tid: libc.gettid(),
  firstRunAt: performance.timeOrigin + performance.now(),
});
try {
  runLoop();
} catch (err) {
  finish('error', err instanceof Error ? err.message : String(err), false);
}
