// The CMOS real-time clock (MC146818): index port 0x70, data port 0x71. The clock
// reads the host's time (UTC) in the format status register B selects (BCD or binary,
// 12 or 24 hours); the rest of the 128 bytes of CMOS RAM keep what the guest writes.
import type { BusDevice } from '../bus/bus.js';
import { STATE_HEADER_BYTES, type DeviceModel } from './device.js';

export const RTC_SECONDS = 0x00;
export const RTC_MINUTES = 0x02;
export const RTC_HOURS = 0x04;
export const RTC_DAY_OF_WEEK = 0x06;
export const RTC_DAY_OF_MONTH = 0x07;
export const RTC_MONTH = 0x08;
export const RTC_YEAR = 0x09;
export const RTC_REG_A = 0x0a;
export const RTC_REG_B = 0x0b;
export const RTC_REG_C = 0x0c;
export const RTC_REG_D = 0x0d;
export const RTC_CENTURY = 0x32;
export const RTC_B_24H = 0x02;
export const RTC_B_BINARY = 0x04;
/** 32.768 kHz time base, no update in progress. */
const RTC_A_DEFAULT = 0x26;
/** Valid RAM and time. */
const RTC_D_VRT = 0x80;
const NMI_DISABLE = 0x80;
const CMOS_BYTES = 128;
const S_INDEX = CMOS_BYTES;

/** A fixed time (tests); none: the host's clock. */
export interface RtcOptions {
  readonly fixedTimeMs?: number;
}

export const rtcModel: DeviceModel<RtcOptions> = {
  stateBytes: () => CMOS_BYTES + 8,
  create(state, options): BusDevice {
    const s = new Uint8Array(state, STATE_HEADER_BYTES, CMOS_BYTES + 8);
    if (s[RTC_REG_B] === 0 && s[RTC_REG_A] === 0) {
      s[RTC_REG_A] = RTC_A_DEFAULT;
      s[RTC_REG_B] = RTC_B_24H;
      s[RTC_REG_D] = RTC_D_VRT;
    }
    const now = options.fixedTimeMs !== undefined ? () => new Date(options.fixedTimeMs!) : () => new Date();
    const encode = (v: number) => (s[RTC_REG_B]! & RTC_B_BINARY ? v : ((v / 10) | 0) * 16 + (v % 10));
    const clock = (index: number): number | null => {
      const t = now();
      switch (index) {
        case RTC_SECONDS:
          return encode(t.getUTCSeconds());
        case RTC_MINUTES:
          return encode(t.getUTCMinutes());
        case RTC_HOURS: {
          const h = t.getUTCHours();
          if (s[RTC_REG_B]! & RTC_B_24H) return encode(h);
          return encode(h % 12 || 12) | (h >= 12 ? 0x80 : 0);
        }
        case RTC_DAY_OF_WEEK:
          return encode(t.getUTCDay() + 1);
        case RTC_DAY_OF_MONTH:
          return encode(t.getUTCDate());
        case RTC_MONTH:
          return encode(t.getUTCMonth() + 1);
        case RTC_YEAR:
          return encode(t.getUTCFullYear() % 100);
        case RTC_CENTURY:
          return encode(Math.floor(t.getUTCFullYear() / 100));
        default:
          return null;
      }
    };
    return {
      read(offset, data) {
        data.fill(0);
        if (offset === 0) {
          data[0] = 0xff;
          return;
        }
        const index = s[S_INDEX]! & ~NMI_DISABLE & (CMOS_BYTES - 1);
        data[0] = clock(index) ?? s[index]!;
        if (index === RTC_REG_C) s[RTC_REG_C] = 0; // reading C acknowledges
      },
      write(offset, data) {
        if (offset === 0) s[S_INDEX] = data[0]!;
        else {
          const index = s[S_INDEX]! & ~NMI_DISABLE & (CMOS_BYTES - 1);
          if (clock(index) === null && index !== RTC_REG_C && index !== RTC_REG_D) s[index] = data[0]!;
        }
      },
    };
  },
};
