// Opening a VM's host ends before the VM exists: every bad disk or NIC is one clear
// error, and nothing stays open when one of several fails.
import assert from 'node:assert/strict';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openDisk, openHostEnds } from '../../src/platform/virtio.js';
import { tempDir } from '../helpers.js';

const openFds = () => readdirSync('/proc/self/fd').length;

test('disks: missing, ragged and overlong serials are refused with the reason', () => {
  const dir = tempDir();
  assert.throws(() => openDisk({ path: join(dir, 'nope.img') }, 0), /disk '.*nope\.img' does not exist/);
  writeFileSync(join(dir, 'ragged.img'), Buffer.alloc(1000));
  assert.throws(
    () => openDisk({ path: join(dir, 'ragged.img') }, 0),
    /1000 bytes, not a whole number of 512-byte sectors/,
  );
  writeFileSync(join(dir, 'ok.img'), Buffer.alloc(4096));
  assert.throws(() => openDisk({ path: join(dir, 'ok.img'), serial: 'x'.repeat(21) }, 0), /longer than 20 bytes/);
  assert.throws(() => openDisk({ path: dir }, 0), /is a directory, not a disk image/);
  const d = openDisk({ path: join(dir, 'ok.img'), readOnly: true }, 3);
  assert.equal(d.options.sectors, 8);
  assert.equal(d.options.serial, 'kiln-disk-3');
  assert.equal(d.options.readOnly, true);
});

test('NICs: a passt socket that is not there, a bad MAC, both or neither backend', () => {
  const dir = tempDir();
  assert.throws(
    () => openHostEnds({ nets: [{ passt: join(dir, 'none.sock') }] }),
    /cannot connect to passt at .*: ENOENT/,
  );
  assert.throws(
    () => openHostEnds({ nets: [{ passt: join(dir, 'none.sock'), mac: '01:00:00:00:00:01' }] }),
    /multicast/,
  );
  assert.throws(() => openHostEnds({ nets: [{ passt: 'a', tap: 'b' }] }), /either a TAP name or a passt socket/);
  assert.throws(() => openHostEnds({ nets: [{ tap: 'name with spaces' }] }), /not a valid interface name/);
});

test('when the second device fails, the first is closed again', () => {
  const dir = tempDir();
  writeFileSync(join(dir, 'ok.img'), Buffer.alloc(4096));
  const before = openFds();
  assert.throws(
    () => openHostEnds({ disks: [{ path: join(dir, 'ok.img') }, { path: join(dir, 'missing.img') }] }),
    /does not exist/,
  );
  assert.equal(openFds(), before, 'no fd left open');
});
