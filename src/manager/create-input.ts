// What `kiln create` sends the daemon: a definition from -f FILE (its relative paths
// made relative to the file) or from the flags. The dashboard's create form goes through
// the same code, so the same mistake gets the same message from both.
import { readFileSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { countFlag, flagsToInput, type VmFlags } from '../config/flags.js';
import { ConfigError } from '../config/vm-config.js';
import { KilnError } from '../errors.js';

/** Makes a definition file's relative paths relative to the file (as compose files do). */
function absolutePaths(raw: Record<string, unknown>, base: string): Record<string, unknown> {
  const abs = (v: unknown) => (typeof v === 'string' && v !== '' && !isAbsolute(v) ? resolve(base, v) : v);
  const out: Record<string, unknown> = { ...raw };
  for (const key of ['kernel', 'initrd', 'consoleSocket']) if (Object.hasOwn(out, key)) out[key] = abs(out[key]);
  const each = (key: string, field: string) => {
    if (Array.isArray(out[key]))
      out[key] = (out[key] as unknown[]).map((x) =>
        x && typeof x === 'object' && Object.hasOwn(x, field)
          ? { ...x, [field]: abs((x as Record<string, unknown>)[field]) }
          : x,
      );
  };
  each('disks', 'path');
  each('nets', 'passt');
  if (out.vsock && typeof out.vsock === 'object' && Object.hasOwn(out.vsock, 'uds'))
    out.vsock = { ...(out.vsock as object), uds: abs((out.vsock as Record<string, unknown>).uds) };
  return out;
}

export interface CreateOptions {
  readonly json?: boolean;
  readonly file?: string;
  readonly cpuWeight?: string;
  readonly cpuQuota?: string;
  readonly pin?: string;
  readonly vm: VmFlags;
}

/** The definition `kiln create` sends: from -f FILE, or from the flags. */
export function definitionInput(name: string | undefined, o: CreateOptions): Record<string, unknown> {
  if (o.file) {
    let raw: unknown;
    try {
      const text = readFileSync(o.file, 'utf8');
      raw = o.file.endsWith('.json') ? JSON.parse(text) : parseYaml(text);
    } catch (err) {
      throw new KilnError(`cannot read ${o.file}: ${(err as Error).message}`);
    }
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
      throw new ConfigError('', `${o.file} must hold one VM definition (an object)`);
    const input = absolutePaths(raw as Record<string, unknown>, dirname(resolve(o.file)));
    return name ? { ...input, name } : input;
  }
  if (!name) throw new KilnError('kiln create needs a VM name (or -f FILE)');
  return {
    name,
    ...flagsToInput(o.vm),
    ...(o.cpuWeight !== undefined ? { cpuWeight: countFlag(o.cpuWeight) } : {}),
    ...(o.cpuQuota !== undefined ? { cpuQuotaPercent: countFlag(o.cpuQuota) } : {}),
    ...(o.pin !== undefined ? { pinCpus: o.pin.split(',').map(countFlag) } : {}),
  };
}
