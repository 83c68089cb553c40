// A managed VM's definition (`kiln create` flags, or a YAML/JSON file): the VM's
// configuration (VmConfig, the same schema and messages as `kiln run` and the API) plus
// what the manager adds: a name, cgroup CPU weight and quota, and vCPU pinning. Checked
// on create and again every time a stored definition is read, so a file edited by hand
// into something that would not start is reported as broken, with the reason.
import { isAbsolute } from 'node:path';
import * as v from 'valibot';
import {
  ConfigError,
  configError,
  finishDevices,
  objectMessage,
  text,
  VM_ENTRIES,
  whole,
  type VmConfig,
} from '../config/vm-config.js';

export const NAME_RULE = /^[a-z0-9][a-z0-9-]{0,62}$/;

// The manager's fields around the VM's (name first, as a definition file reads).
const ENTRIES = {
  name: v.pipe(
    text(),
    v.regex(
      NAME_RULE,
      ({ input }) =>
        `'${input}' is not a valid VM name (lower-case letters, digits and '-', starting with a letter or digit, at most 63)`,
    ),
  ),
  ...VM_ENTRIES,
  /** cgroup CPU weight: 1-10000, 100 is an ordinary share. */
  cpuWeight: v.optional(whole(1, 10_000), 100),
  /** CPU quota in percent of one host CPU; 0: none. */
  cpuQuotaPercent: v.optional(whole(0, 100 * 1024), 0),
  /** Host CPUs the vCPU threads run on (vCPU N on pinCpus[N % length]); empty: any. */
  pinCpus: v.optional(
    v.array(whole(0, 8191), ({ input }) => `must be a list of host CPU numbers (got ${JSON.stringify(input)})`),
    [],
  ),
};
const DefinitionSchema = v.strictObject(ENTRIES, objectMessage(Object.keys(ENTRIES), 'a VM definition (an object)'));

export type VmDefinition = VmConfig & {
  readonly name: string;
  readonly cpuWeight: number;
  readonly cpuQuotaPercent: number;
  readonly pinCpus: readonly number[];
};

/** Every path the daemon opens must be absolute: it runs in a directory of its own. */
function requireAbsolute(d: VmDefinition): void {
  const paths: Array<[string, string | undefined]> = [
    ['kernel', d.kernel],
    ['initrd', d.initrd],
    ['vsock.uds', d.vsock?.uds],
    ['consoleSocket', d.consoleSocket],
    ...d.disks.map((x, i): [string, string] => [`disks[${i}].path`, x.path]),
    ...d.nets.map((x, i): [string, string | undefined] => [`nets[${i}].passt`, x.passt]),
  ];
  for (const [field, path] of paths)
    if (path !== undefined && !isAbsolute(path))
      throw new ConfigError(
        field,
        `must be an absolute path (got '${path}'); the daemon does not share your working directory`,
      );
}

/** Checks a definition and fills in its defaults; throws ConfigError naming the field and why. */
export function parseDefinition(input: unknown): VmDefinition {
  const r = v.safeParse(DefinitionSchema, input);
  if (!r.success) throw configError(r.issues);
  const d = finishDevices(r.output);
  requireAbsolute(d);
  return d;
}

/**
 * The VM configuration inside a definition (what kiln-vmm runs). Guest RAM is a shared
 * memory file unless the definition says `sharedMemory: false`: kiln upgrade then hands it
 * to the new VMM instead of copying it.
 */
export function vmConfigOf(d: VmDefinition): VmConfig {
  const { name: _name, cpuWeight: _w, cpuQuotaPercent: _q, pinCpus: _p, ...config } = d;
  return { ...config, sharedMemory: config.sharedMemory ?? true };
}
