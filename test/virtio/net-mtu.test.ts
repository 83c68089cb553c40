// A NIC's MTU (Firecracker's `mtu`): offered to the driver as VIRTIO_NET_F_MTU with the
// value in the device configuration; without one the feature is not offered and the
// guest picks its own.
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import { NET_CONFIG, VIRTIO_NET_F_MTU } from '../../src/virtio/net.js';
import { FakeDevice } from './fake-driver.js';

function nic(mtu?: number): FakeDevice {
  const sv = new Int32Array(2);
  assert.equal(libc.socketpair(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC, 0, sv), 0);
  const dev = new FakeDevice({
    kind: 'net',
    options: { fd: sv[0]!, mac: '06:00:00:00:00:01', backend: 'passt', ...(mtu !== undefined ? { mtu } : {}) },
  });
  after(() => {
    dev.close();
    libc.close(sv[1]!);
  });
  return dev;
}

test('an MTU is offered with VIRTIO_NET_F_MTU and read from the configuration; none, not offered', () => {
  const jumbo = nic(9000);
  assert.equal((jumbo.state.driverFeatures >> VIRTIO_NET_F_MTU) & 1n, 1n, 'negotiated');
  assert.equal(jumbo.state.config().getUint16(NET_CONFIG.mtu, true), 9000);
  const plain = nic();
  assert.equal((plain.state.driverFeatures >> VIRTIO_NET_F_MTU) & 1n, 0n, 'not offered');
});
