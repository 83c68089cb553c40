// Opening a VM's host ends before the VM exists: every bad disk or NIC is one clear
// error, and nothing stays open when one of several fails.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, readdirSync, writeFileSync } from 'node:fs';
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

test('disk images are locked as QEMU locks them: one writer, or any number of readers', () => {
  const dir = tempDir();
  const image = join(dir, 'shared.img');
  writeFileSync(image, Buffer.alloc(4096));
  const writer = openDisk({ path: image }, 0);
  try {
    assert.throws(
      () => openDisk({ path: image }, 1),
      /disk .*shared\.img is in use: a read-write lock on it is held by another VM or program \(a read-write drive needs it to itself\)/,
    );
    assert.throws(
      () => openDisk({ path: image, readOnly: true }, 1),
      /is in use: a read-write lock on it is held .*a read-only drive needs no writer/,
    );
  } finally {
    closeSync(writer.fd);
  }
  const readers = [openDisk({ path: image, readOnly: true }, 0), openDisk({ path: image, readOnly: true }, 1)];
  try {
    assert.throws(() => openDisk({ path: image }, 2), /is in use: a read-only lock on it is held/);
  } finally {
    readers.forEach((r) => closeSync(r.fd));
  }
  // Closing releases the lock: a writer gets it now.
  closeSync(openDisk({ path: image }, 0).fd);
  // Another process sees the same lock (util-linux's flock is not an OFD lock; a second Kiln is what matters).
  const held = openDisk({ path: image }, 0);
  try {
    const other = spawnSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `import('${new URL('../../src/platform/virtio.js', import.meta.url).href}').then((m) => m.openDisk({ path: ${JSON.stringify(image)} }, 0)).then(() => process.exit(0), (e) => { console.error(e.message); process.exit(3); })`,
      ],
      { encoding: 'utf8' },
    );
    assert.equal(other.status, 3, other.stderr);
    assert.match(other.stderr, /is in use/);
  } finally {
    closeSync(held.fd);
  }
});

test(
  'a block device is sized by BLKGETSIZE64 (fstat says 0)',
  { skip: process.getuid?.() === 0 ? false : 'needs root to set up a loop device' },
  () => {
    const dir = tempDir();
    const backing = join(dir, 'backing.img');
    writeFileSync(backing, Buffer.alloc(3 << 20));
    const loop = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8' }).trim();
    try {
      const disk = openDisk({ path: loop, readOnly: true }, 0);
      try {
        assert.equal(disk.options.sectors, (3 << 20) / 512);
      } finally {
        closeSync(disk.fd);
      }
    } finally {
      execFileSync('losetup', ['--detach', loop]);
    }
  },
);
