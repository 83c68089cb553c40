// Firecracker's boot timer (`kiln-vmm --boot-timer`): a guest's init writes 123 to port
// 0x3f0 when it has booted, and the VMM logs how long that took since the VMM process
// (or, with --start-time-us, its jailer) started, in wall-clock and in CPU time.
import { accessValue, type BusDevice } from '../bus/bus.js';
import type { DeviceModel } from './device.js';

/** The value a guest writes to say it has booted (Firecracker's MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE). */
export const BOOT_COMPLETE = 123;

export interface BootTimerOptions {
  /** When the VMM (or its jailer) started: wall-clock microseconds since the epoch. */
  readonly startUs: number;
  /** The CPU time already spent by then (the jailer's and its parent's), microseconds. */
  readonly startCpuUs: number;
}

/** The log line for a boot that took `us` of wall-clock and `cpuUs` of CPU time (Firecracker's wording). */
export function bootTimeLine(us: number, cpuUs: number): string {
  const whole = (n: number) => Math.max(0, Math.round(n));
  return `Guest-boot-time = ${whole(us)} us ${whole(us / 1000)} ms, ${whole(cpuUs)} CPU us ${whole(cpuUs / 1000)} CPU ms`;
}

export const bootTimerModel: DeviceModel<BootTimerOptions> = {
  stateBytes: () => 0,
  create(_state, options, ctx): BusDevice {
    return {
      read(_offset, data) {
        data.fill(0);
      },
      write(offset, data) {
        if (offset !== 0 || (accessValue(data) & 0xff) !== BOOT_COMPLETE) return;
        const nowUs = (performance.timeOrigin + performance.now()) * 1000;
        const cpu = process.cpuUsage();
        ctx.log(bootTimeLine(nowUs - options.startUs, cpu.user + cpu.system + options.startCpuUs));
      },
    };
  },
};
