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
  if (libc.ofdLockWholeFile(fd, libc.F_WRLCK) === 0) return fd;
  closeSync(fd);
  return null;
}
