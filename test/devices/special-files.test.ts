// Disk paths that are not disk images (a FIFO, a terminal-like device, a /proc file) are
// refused when the drive is opened, without blocking on them.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openDisk } from '../../src/platform/virtio.js';
import { tempDir } from '../helpers.js';

test('a FIFO, a character device, a directory and /proc/self/mem are refused as disks; a file is taken', () => {
  const dir = tempDir();
  const fifo = join(dir, 'disk.fifo');
  execFileSync('mkfifo', [fifo]);
  const cases: Array<[string, boolean, RegExp]> = [
    // Read-only: a blocking open of a FIFO with no writer would never return.
    [fifo, true, /disk .*disk\.fifo is a FIFO; it must be a regular file or a block device/],
    ['/dev/zero', false, /is a character device/],
    [dir, true, /is a directory/],
    ['/proc/self/mem', true, /on procfs/],
  ];
  for (const [path, readOnly, message] of cases) assert.throws(() => openDisk({ path, readOnly }, 0), message, path);
  const image = join(dir, 'ok.img');
  writeFileSync(image, Buffer.alloc(4096));
  const opened = openDisk({ path: image, readOnly: true }, 0);
  assert.ok(opened.fd > 2);
});
