// The initramfs writer, checked by an independent decoder: GNU cpio unpacks what it
// writes, and every file, directory, symlink and device node comes out as it went in.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { lstatSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { buildCpio } from '../../src/guestkit/cpio.js';
import { tempDir } from '../helpers.js';

test('GNU cpio unpacks the newc archive: directories, files (of every length mod 4), a symlink, a device node', () => {
  const dir = tempDir();
  const files = [0, 1, 2, 3, 4, 5, 4097].map((n) => ({ path: `/etc/f${n}`, data: Buffer.alloc(n, 0x41 + (n % 26)) }));
  const archive = buildCpio([
    { type: 'dir', path: '/etc' },
    { type: 'dir', path: '/bin', mode: 0o700 },
    ...files.map((f) => ({ type: 'file' as const, path: f.path, data: f.data, mode: 0o640 })),
    { type: 'symlink', path: '/bin/sh', target: 'busybox' },
    { type: 'chardev', path: '/console', major: 5, minor: 1 },
  ]);
  assert.equal(archive.length % 4, 0, 'the archive ends on a 4-byte boundary');
  const archivePath = join(dir, 'initramfs.cpio');
  writeFileSync(archivePath, archive);
  const out = join(dir, 'out');
  const r = spawnSync('sh', ['-c', `mkdir -p "${out}" && cd "${out}" && cpio -id --quiet < "${archivePath}"`], {
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, r.stderr);
  for (const f of files) {
    assert.deepEqual(readFileSync(join(out, f.path)), f.data, f.path);
    assert.equal(lstatSync(join(out, f.path)).mode & 0o777, 0o640);
  }
  assert.equal(lstatSync(join(out, 'bin')).mode & 0o777, 0o700);
  assert.equal(readlinkSync(join(out, 'bin', 'sh')), 'busybox');
  const console = lstatSync(join(out, 'console'));
  assert.ok(console.isCharacterDevice(), 'a character device node');
  assert.equal(console.rdev, (5 << 8) | 1, 'with its major and minor');
  const listing = spawnSync('cpio', ['-it', '--quiet'], { input: archive, encoding: 'utf8' });
  assert.deepEqual(
    listing.stdout.trim().split('\n').slice(0, 3),
    ['etc', 'bin', 'etc/f0'],
    'entries in order, with no leading slash',
  );
});
