// One flag grammar for the VM's devices, shared by `kiln run` and `kiln create`:
//
//   --disk PATH[,ro][,root][,serial=ID][,id=ID]
//   --net tap=NAME[,mac=MAC][,id=ID] | passt=SOCKET[,mac=MAC][,id=ID]
//   --vsock CID,SOCKET
//   --memory SIZE, --balloon SIZE (128, 512M, 2G), --cpus N
//
// The flags become a VmConfig input; parseVmConfig checks it, so `kiln run`, `kiln
// create`, the API and a definition file give the same answer for the same mistake.
// Paths are made absolute here: the daemon that later opens them has another directory.
import { resolve } from 'node:path';
import { parseSize } from '../size.js';
import { ConfigError, parseVmConfig, type VmConfig, type VmConfigInput } from './vm-config.js';

const MIB = 1024 * 1024;

/** `PATH[,ro][,root][,serial=ID][,id=ID]` */
export function parseDiskFlag(flag: string): NonNullable<VmConfigInput['disks']>[number] {
  const [path, ...opts] = flag.split(',');
  if (!path) throw new ConfigError('--disk', `needs a path first (got '${flag}')`);
  const disk: { path: string; readOnly?: boolean; root?: boolean; serial?: string; id?: string } = {
    path: resolve(path),
  };
  for (const o of opts) {
    if (o === 'ro') disk.readOnly = true;
    else if (o === 'root') disk.root = true;
    else if (o.startsWith('serial=')) disk.serial = o.slice('serial='.length);
    else if (o.startsWith('id=')) disk.id = o.slice('id='.length);
    else throw new ConfigError('--disk', `${flag}: unknown option '${o}' (expected ro, root, serial=ID or id=ID)`);
  }
  return disk;
}

/** `tap=NAME[,mac=MAC][,id=ID]` or `passt=SOCKET[,mac=MAC][,id=ID]` */
export function parseNetFlag(flag: string): NonNullable<VmConfigInput['nets']>[number] {
  const net: { tap?: string; passt?: string; mac?: string; id?: string } = {};
  for (const kv of flag.split(',')) {
    const eq = kv.indexOf('=');
    const key = eq < 0 ? kv : kv.slice(0, eq);
    const value = eq < 0 ? '' : kv.slice(eq + 1);
    if (key !== 'tap' && key !== 'passt' && key !== 'mac' && key !== 'id')
      throw new ConfigError(
        '--net',
        `${flag}: unknown option '${key}' (expected tap=NAME or passt=SOCKET, then mac=MAC or id=ID)`,
      );
    if (eq < 0 || value === '') throw new ConfigError('--net', `${flag}: '${key}' needs a value (${key}=...)`);
    if (net[key] !== undefined) throw new ConfigError('--net', `${flag}: '${key}' is given twice`);
    net[key] = key === 'passt' ? resolve(value) : value;
  }
  return net;
}

/** `CID,SOCKET` */
export function parseVsockFlag(flag: string): NonNullable<VmConfigInput['vsock']> {
  const m = /^(\d+),(.+)$/.exec(flag);
  if (!m) throw new ConfigError('--vsock', `${flag}: expected CID,SOCKET (e.g. 3,/tmp/vm.vsock)`);
  return { guestCid: Number(m[1]), uds: resolve(m[2]!) };
}

/** A size flag in whole MiB (`--memory 512M` -> 512). */
export function parseMiBFlag(name: string, text: string): number {
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch (err) {
    throw new ConfigError(name, (err as Error).message);
  }
  if (bytes % MIB !== 0) throw new ConfigError(name, `'${text}' is not a whole number of MiB`);
  return bytes / MIB;
}

/** A count flag: digits become a number; anything else goes on as text, for the schema to refuse by name. */
export const countFlag = (text: string): number | string => (/^\d+$/.test(text) ? Number(text) : text);

/** The flags `kiln run` and `kiln create` share, as commander hands them over (camelCase). */
export interface VmFlags {
  readonly kernel?: string | undefined;
  readonly initrd?: string | undefined;
  readonly cmdline?: string | undefined;
  readonly cpus?: string | undefined;
  readonly memory?: string | undefined;
  readonly cpuTemplate?: string | undefined;
  readonly disk?: readonly string[] | undefined;
  readonly net?: readonly string[] | undefined;
  readonly rng?: boolean | undefined;
  readonly vsock?: string | undefined;
  readonly consoleSocket?: string | undefined;
  readonly balloon?: string | undefined;
}

/** The VmConfig input the flags describe (unchecked: parseVmConfig checks it). */
export function flagsToInput(f: VmFlags): Record<string, unknown> {
  const input: Record<string, unknown> = {};
  if (f.kernel !== undefined) input.kernel = resolve(f.kernel);
  if (f.initrd !== undefined) input.initrd = resolve(f.initrd);
  if (f.cmdline !== undefined) input.cmdline = f.cmdline;
  if (f.cpus !== undefined) input.cpus = countFlag(f.cpus);
  if (f.memory !== undefined) input.memoryMiB = parseMiBFlag('--memory', f.memory);
  if (f.cpuTemplate !== undefined) input.cpuTemplate = f.cpuTemplate;
  if (f.disk?.length) input.disks = f.disk.map(parseDiskFlag);
  if (f.net?.length) input.nets = f.net.map(parseNetFlag);
  if (f.rng) input.rng = true;
  if (f.vsock !== undefined) input.vsock = parseVsockFlag(f.vsock);
  if (f.consoleSocket !== undefined) input.consoleSocket = resolve(f.consoleSocket);
  if (f.balloon !== undefined) input.balloon = { targetMiB: parseMiBFlag('--balloon', f.balloon) };
  return input;
}

/** `kiln run`'s flags as a checked VmConfig. */
export function configFromFlags(f: VmFlags): VmConfig {
  return parseVmConfig(flagsToInput(f));
}
