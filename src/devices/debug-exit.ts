// Guest-requested exit (QEMU's isa-debug-exit, simplified): writing N ends the VM
// with exit status N & 0xff. Test guests and the demo guest end this way.
import { accessValue, type BusDevice } from '../bus/bus.js';
import type { DeviceModel, NoOptions } from './device.js';

export const debugExitModel: DeviceModel<NoOptions> = {
  stateBytes: () => 0,
  create(_state, _options, ctx): BusDevice {
    return {
      read(_offset, data) {
        data.fill(0);
      },
      write(_offset, data) {
        const code = accessValue(data) & 0xff;
        ctx.requestExit(code, `guest wrote ${code} to the debug-exit port`);
      },
    };
  },
};
