// The state directory's lock: one daemon serves a state directory. An open-file-
// description write lock on <state>/daemon.lock, held for the daemon's life (the kernel
// drops it when the daemon's process ends, however it ends).
import { closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import * as libc from '../kvm/libc.js';
import type { Store } from './store.js';

/** Takes the lock; returns its fd (keep it open), or null when another daemon holds it. */
export function lockStateDir(store: Store): number | null {
  const fd = openSync(join(store.dir, 'daemon.lock'), 'a', 0o600);
  const lock = Buffer.alloc(libc.flock.size);
  libc.flock.encode(new DataView(lock.buffer, lock.byteOffset, lock.length), 0, {
    l_type: libc.F_WRLCK,
    l_whence: libc.SEEK_SET,
    l_start: 0n,
    l_len: 0n,
    l_pid: 0,
  });
  if (libc.fcntlPtr(fd, libc.F_OFD_SETLK, lock) === 0) return fd;
  closeSync(fd);
  return null;
}
