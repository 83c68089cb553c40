// What a definition needs of the host to start, checked when it is created and again
// before each start: its files are there and usable, and the host has the memory. So
// nothing is stored that would not start, and a file removed later is a clear error
// naming the field, not a VMM that dies.
import { accessSync, constants, statSync } from 'node:fs';
import { ConfigError } from '../config/vm-config.js';
import { hostMemoryBytes } from '../host.js';
import type { VmDefinition } from './definition.js';

const MiB = 1024 * 1024;

function usableFile(field: string, path: string, writable: boolean, what: string, blockOk = false): void {
  let st;
  try {
    st = statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ConfigError(
      field,
      code === 'ENOENT' ? `'${path}' does not exist` : `cannot read '${path}' (${code ?? 'error'})`,
    );
  }
  if (!st.isFile() && !(blockOk && st.isBlockDevice())) throw new ConfigError(field, `'${path}' is not ${what}`);
  try {
    accessSync(path, writable ? constants.R_OK | constants.W_OK : constants.R_OK);
  } catch {
    throw new ConfigError(
      field,
      `'${path}' is not ${writable ? 'readable and writable (attach it read-only with readOnly: true, or fix its permissions)' : 'readable'}`,
    );
  }
}

/** Throws ConfigError naming the field when `d` could not start on this host. */
export function checkStartable(d: VmDefinition): void {
  const host = hostMemoryBytes();
  if (d.memoryMiB * MiB > host)
    throw new ConfigError(
      'memoryMiB',
      `${d.memoryMiB} MiB is more than this host has (${Math.floor(host / MiB)} MiB of RAM and swap)`,
    );
  if (d.kernel !== undefined) usableFile('kernel', d.kernel, false, 'a regular file');
  if (d.initrd !== undefined) usableFile('initrd', d.initrd, false, 'a regular file');
  d.disks.forEach((disk, i) =>
    usableFile(`disks[${i}].path`, disk.path, !disk.readOnly, 'a regular file or block device', true),
  );
}
