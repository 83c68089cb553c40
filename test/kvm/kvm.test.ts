import assert from 'node:assert/strict';
import { test } from 'node:test';
import { KilnError } from '../../src/errors.js';
import { KvmIoctlError } from '../../src/kvm/errors.js';
import { checkApiVersion, KvmSystem } from '../../src/kvm/kvm.js';
import { kvmSkip } from '../helpers.js';

test('a missing KVM device is one clear error', () => {
  assert.throws(
    () => KvmSystem.open('/nonexistent/kvm'),
    (err: Error) => err instanceof KilnError && /does not exist: this host has no KVM/.test(err.message),
  );
});

test('a file that is not KVM is reported as such', () => {
  assert.throws(() => KvmSystem.open('/dev/null'), /\/dev\/null is not a KVM device/);
});

test('any API version but 12 is refused', () => {
  assert.doesNotThrow(() => checkApiVersion(12, '/dev/kvm'));
  assert.throws(() => checkApiVersion(11, '/dev/kvm'), /speaks KVM API version 11; Kiln needs version 12/);
});

test('a failing ioctl becomes a typed error naming the ioctl and errno', { skip: kvmSkip }, () => {
  const kvm = KvmSystem.open();
  const vm = kvm.createVm();
  try {
    const first = vm.createVcpu(0);
    assert.throws(
      () => vm.createVcpu(0),
      (err: Error) =>
        err instanceof KvmIoctlError &&
        err.call === 'KVM_CREATE_VCPU' &&
        err.code === 'EEXIST' &&
        /^KVM_CREATE_VCPU failed: EEXIST \(File exists\)$/.test(err.message),
    );
    assert.ok(first >= 0);
  } finally {
    vm.close();
    kvm.close();
  }
});
