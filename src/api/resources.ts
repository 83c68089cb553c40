// The Firecracker API's resources as Kiln's VM definition: one config type per
// resource, each with its parser. A parser takes the decoded JSON body and returns the
// typed value or throws ApiError, whose message is the response's fault_message.
// Bodies are checked field by field: a missing required field, a wrong type, a value
// out of range or a field the resource does not have is a 400, and nothing changes.
import { KilnError } from '../errors.js';

/** An error the API returns as 400 {"fault_message": message}. */
export class ApiError extends KilnError {}

export interface BootSource {
  readonly kernel_image_path: string;
  readonly boot_args?: string;
  readonly initrd_path?: string;
}

export interface MachineConfig {
  readonly vcpu_count: number;
  readonly mem_size_mib: number;
  readonly smt: boolean;
  readonly track_dirty_pages: boolean;
  readonly huge_pages: 'None' | 'Transparent' | '2M';
  readonly cpu_template?: string;
}

export interface Drive {
  readonly drive_id: string;
  readonly path_on_host: string;
  readonly is_root_device: boolean;
  readonly is_read_only: boolean;
  readonly partuuid?: string;
  readonly cache_type: 'Unsafe' | 'Writeback';
  readonly io_engine: 'Sync' | 'Async';
}

export interface NetworkInterface {
  readonly iface_id: string;
  readonly host_dev_name: string;
  readonly guest_mac?: string;
}

export interface VsockConfig {
  readonly guest_cid: number;
  readonly uds_path: string;
  readonly vsock_id?: string;
}

export interface BalloonConfig {
  readonly amount_mib: number;
  readonly deflate_on_oom: boolean;
  readonly stats_polling_interval_s: number;
  readonly free_page_reporting: boolean;
}

export interface LoggerConfig {
  readonly log_path?: string;
  readonly level: string;
  readonly show_level: boolean;
  readonly show_log_origin: boolean;
  readonly module?: string;
}

export interface MetricsConfig {
  readonly metrics_path: string;
}

/** Everything a VM is made of, as PUT through the API or read from --config-file. */
export interface VmDefinition {
  bootSource?: BootSource;
  machineConfig: MachineConfig;
  drives: Map<string, Drive>;
  networkInterfaces: Map<string, NetworkInterface>;
  vsock?: VsockConfig;
  entropy?: Record<string, never>;
  balloon?: BalloonConfig;
  logger?: LoggerConfig;
  metrics?: MetricsConfig;
}

export const DEFAULT_MACHINE_CONFIG: MachineConfig = { vcpu_count: 1, mem_size_mib: 128, smt: false, track_dirty_pages: false, huge_pages: 'None' };

export function emptyDefinition(): VmDefinition {
  return { machineConfig: DEFAULT_MACHINE_CONFIG, drives: new Map(), networkInterfaces: new Map() };
}

// ---- field checking ----
type Kind = { type: 'string' } | { type: 'boolean' } | { type: 'integer'; min?: number; max?: number } | { type: 'enum'; values: readonly string[] } | { type: 'object' } | { type: 'array' };
type Fields = Readonly<Record<string, Kind & { required?: boolean }>>;

const str = { type: 'string' } as const;
const bool = { type: 'boolean' } as const;
const int = (min?: number, max?: number) => ({ type: 'integer' as const, ...(min !== undefined ? { min } : {}), ...(max !== undefined ? { max } : {}) });
const oneOf = (...values: string[]) => ({ type: 'enum' as const, values });
const obj = { type: 'object' } as const;
const req = <K extends Kind>(k: K) => ({ ...k, required: true });

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? 'an object' : `${typeof value} ${JSON.stringify(value)}`;
}

/** Checks `body` against `fields`; returns it as a plain record. */
function check(resource: string, body: unknown, fields: Fields): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError(`${resource}: the body must be a JSON object, not ${describe(body)}`);
  const record = body as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!(key in fields)) throw new ApiError(`${resource}: unknown field \`${key}\` (expected one of ${Object.keys(fields).join(', ')})`);
  }
  for (const [name, kind] of Object.entries(fields)) {
    const value = record[name];
    if (value === undefined) {
      if (kind.required) throw new ApiError(`${resource}: missing field \`${name}\``);
      continue;
    }
    const bad = (want: string) => new ApiError(`${resource}: \`${name}\` must be ${want}, not ${describe(value)}`);
    switch (kind.type) {
      case 'string':
        if (typeof value !== 'string') throw bad('a string');
        break;
      case 'boolean':
        if (typeof value !== 'boolean') throw bad('a boolean');
        break;
      case 'integer':
        if (typeof value !== 'number' || !Number.isSafeInteger(value)) throw bad('an integer');
        if (kind.min !== undefined && value < kind.min) throw new ApiError(`${resource}: \`${name}\` must be at least ${kind.min} (got ${value})`);
        if (kind.max !== undefined && value > kind.max) throw new ApiError(`${resource}: \`${name}\` must be at most ${kind.max} (got ${value})`);
        break;
      case 'enum':
        if (typeof value !== 'string' || !kind.values.includes(value)) throw bad(`one of ${kind.values.join(', ')}`);
        break;
      case 'object':
        if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('an object');
        break;
      case 'array':
        if (!Array.isArray(value)) throw bad('an array');
        break;
    }
  }
  return record;
}

/** Firecracker's ID rule for devices: ASCII letters, digits and underscores, at most 64 of them. */
export function checkId(what: string, id: string): string {
  if (!/^[A-Za-z0-9_]{1,64}$/.test(id)) throw new ApiError(`Invalid ${what} ID: '${id}' (use 1 to 64 ASCII letters, digits or underscores)`);
  return id;
}

/** Firecracker's rule for the instance ID (--id): ASCII letters, digits and hyphens, at most 64. */
export function checkInstanceId(id: string): string {
  if (!/^[A-Za-z0-9-]{1,64}$/.test(id)) throw new ApiError(`Invalid instance ID: '${id}' (use 1 to 64 ASCII letters, digits or hyphens)`);
  return id;
}

function noRateLimiter(resource: string, value: unknown): void {
  if (value === undefined) return;
  const limiter = value as Record<string, unknown>;
  if (Object.values(limiter).some((bucket) => bucket !== null && bucket !== undefined)) throw new ApiError(`${resource}: rate limiters are not supported by Kiln yet`);
}

// ---- resources ----
export function parseBootSource(body: unknown): BootSource {
  const r = check('boot-source', body, { kernel_image_path: req(str), boot_args: str, initrd_path: str });
  return r as unknown as BootSource;
}

const MACHINE_FIELDS: Fields = {
  vcpu_count: int(1, 32),
  mem_size_mib: int(1),
  smt: bool,
  track_dirty_pages: bool,
  huge_pages: oneOf('None', 'Transparent', '2M'),
  cpu_template: oneOf('C3', 'T2', 'T2S', 'T2CL', 'T2A', 'V1N1', 'None'),
};

function finishMachine(m: MachineConfig): MachineConfig {
  if (m.vcpu_count > 1 && m.vcpu_count % 2 !== 0) throw new ApiError(`machine-config: \`vcpu_count\` must be 1 or an even number (got ${m.vcpu_count})`);
  if (m.smt) throw new ApiError('machine-config: SMT is not supported by Kiln yet');
  if (m.huge_pages === '2M') throw new ApiError('machine-config: explicit 2M huge pages are not supported by Kiln yet (use Transparent)');
  if (m.cpu_template !== undefined && m.cpu_template !== 'None') throw new ApiError(`machine-config: CPU template ${m.cpu_template} is not supported by Kiln (its own templates are host, pvm and baseline)`);
  return m;
}

export function parseMachineConfig(body: unknown): MachineConfig {
  const r = check('machine-config', body, { ...MACHINE_FIELDS, vcpu_count: req(int(1, 32)), mem_size_mib: req(int(1)) });
  return finishMachine({ ...DEFAULT_MACHINE_CONFIG, ...(r as Partial<MachineConfig>) } as MachineConfig);
}

export function patchMachineConfig(current: MachineConfig, body: unknown): MachineConfig {
  const r = check('machine-config', body, MACHINE_FIELDS);
  return finishMachine({ ...current, ...(r as Partial<MachineConfig>) });
}

export function parseDrive(pathId: string, body: unknown): Drive {
  checkId('drive', pathId);
  const r = check('drives', body, {
    drive_id: req(str),
    path_on_host: str,
    is_root_device: req(bool),
    is_read_only: bool,
    partuuid: str,
    cache_type: oneOf('Unsafe', 'Writeback'),
    io_engine: oneOf('Sync', 'Async'),
    rate_limiter: obj,
    socket: str,
  });
  if (r.drive_id !== pathId) throw new ApiError(`The id from the path (${pathId}) does not match the id from the body (${String(r.drive_id)})`);
  if (r.socket !== undefined) throw new ApiError('drives: vhost-user block devices (`socket`) are not supported by Kiln yet');
  if (r.path_on_host === undefined) throw new ApiError('drives: missing field `path_on_host`');
  noRateLimiter('drives', r.rate_limiter);
  return {
    drive_id: pathId,
    path_on_host: r.path_on_host as string,
    is_root_device: r.is_root_device as boolean,
    is_read_only: (r.is_read_only as boolean | undefined) ?? false,
    ...(r.partuuid !== undefined ? { partuuid: r.partuuid as string } : {}),
    cache_type: (r.cache_type as Drive['cache_type'] | undefined) ?? 'Unsafe',
    io_engine: (r.io_engine as Drive['io_engine'] | undefined) ?? 'Sync',
  };
}

/** PATCH /drives/{id}: a new backing file (or rate limiter) for an existing drive. */
export function parsePartialDrive(pathId: string, body: unknown): { drive_id: string; path_on_host?: string } {
  checkId('drive', pathId);
  const r = check('drives', body, { drive_id: req(str), path_on_host: str, rate_limiter: obj });
  if (r.drive_id !== pathId) throw new ApiError(`The id from the path (${pathId}) does not match the id from the body (${String(r.drive_id)})`);
  noRateLimiter('drives', r.rate_limiter);
  return { drive_id: pathId, ...(r.path_on_host !== undefined ? { path_on_host: r.path_on_host as string } : {}) };
}

export function parseNetworkInterface(pathId: string, body: unknown): NetworkInterface {
  checkId('network interface', pathId);
  const r = check('network-interfaces', body, { iface_id: req(str), host_dev_name: req(str), guest_mac: str, mtu: int(68, 65535), rx_rate_limiter: obj, tx_rate_limiter: obj });
  if (r.iface_id !== pathId) throw new ApiError(`The id from the path (${pathId}) does not match the id from the body (${String(r.iface_id)})`);
  if (r.mtu !== undefined) throw new ApiError('network-interfaces: `mtu` is not supported by Kiln yet');
  noRateLimiter('network-interfaces', r.rx_rate_limiter);
  noRateLimiter('network-interfaces', r.tx_rate_limiter);
  if (r.guest_mac !== undefined && !/^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$/.test(r.guest_mac as string)) throw new ApiError(`network-interfaces: \`guest_mac\` '${String(r.guest_mac)}' is not a MAC address`);
  return { iface_id: pathId, host_dev_name: r.host_dev_name as string, ...(r.guest_mac !== undefined ? { guest_mac: r.guest_mac as string } : {}) };
}

export function parseVsock(body: unknown): VsockConfig {
  const r = check('vsock', body, { guest_cid: req(int(3, 0xffff_ffff)), uds_path: req(str), vsock_id: str });
  return r as unknown as VsockConfig;
}

export function parseEntropy(body: unknown): Record<string, never> {
  const r = check('entropy', body, { rate_limiter: obj });
  noRateLimiter('entropy', r.rate_limiter);
  return {};
}

export function parseBalloon(body: unknown): BalloonConfig {
  const r = check('balloon', body, { amount_mib: req(int(0)), deflate_on_oom: req(bool), stats_polling_interval_s: int(0), free_page_hinting: bool, free_page_reporting: bool });
  if (r.free_page_hinting === true) throw new ApiError('balloon: free page hinting is not supported by Kiln yet (free page reporting is)');
  return {
    amount_mib: r.amount_mib as number,
    deflate_on_oom: r.deflate_on_oom as boolean,
    stats_polling_interval_s: (r.stats_polling_interval_s as number | undefined) ?? 0,
    free_page_reporting: (r.free_page_reporting as boolean | undefined) ?? false,
  };
}

export function parseBalloonUpdate(body: unknown): number {
  return check('balloon', body, { amount_mib: req(int(0)) }).amount_mib as number;
}

export function parseLogger(body: unknown): LoggerConfig {
  const r = check('logger', body, { log_path: str, level: str, show_level: bool, show_log_origin: bool, module: str });
  const level = (r.level as string | undefined) ?? 'Info';
  const canonical = ['Error', 'Warning', 'Info', 'Debug', 'Trace', 'Off'].find((l) => l.toLowerCase() === level.toLowerCase());
  if (!canonical) throw new ApiError(`logger: \`level\` must be one of Error, Warning, Info, Debug, Trace, Off (got ${level})`);
  return {
    ...(r.log_path !== undefined ? { log_path: r.log_path as string } : {}),
    level: canonical,
    show_level: (r.show_level as boolean | undefined) ?? false,
    show_log_origin: (r.show_log_origin as boolean | undefined) ?? false,
    ...(r.module !== undefined ? { module: r.module as string } : {}),
  };
}

export function parseMetrics(body: unknown): MetricsConfig {
  const r = check('metrics', body, { metrics_path: req(str), emit_id: bool, properties: obj });
  return { metrics_path: r.metrics_path as string };
}

export function parseVmState(body: unknown): 'Paused' | 'Resumed' {
  return check('vm', body, { state: req(oneOf('Paused', 'Resumed')) }).state as 'Paused' | 'Resumed';
}

export function parseAction(body: unknown): 'InstanceStart' | 'SendCtrlAltDel' | 'FlushMetrics' {
  return check('actions', body, { action_type: req(oneOf('FlushMetrics', 'InstanceStart', 'SendCtrlAltDel')) }).action_type as 'InstanceStart' | 'SendCtrlAltDel' | 'FlushMetrics';
}

/** GET /vm/config and --config-file share this shape (FullVmConfiguration). */
export function exportDefinition(d: VmDefinition): Record<string, unknown> {
  return {
    ...(d.bootSource ? { 'boot-source': d.bootSource } : {}),
    'machine-config': d.machineConfig,
    drives: [...d.drives.values()],
    'network-interfaces': [...d.networkInterfaces.values()],
    ...(d.vsock ? { vsock: d.vsock } : {}),
    ...(d.entropy ? { entropy: d.entropy } : {}),
    ...(d.balloon ? { balloon: d.balloon } : {}),
    ...(d.logger ? { logger: d.logger } : {}),
    ...(d.metrics ? { metrics: d.metrics } : {}),
  };
}

/** Reads a --config-file's JSON (the same resources, keyed as GET /vm/config returns them). */
export function parseConfigFile(json: unknown): VmDefinition {
  const r = check('config file', json, {
    'boot-source': obj,
    'machine-config': obj,
    drives: { type: 'array' },
    'network-interfaces': { type: 'array' },
    vsock: obj,
    entropy: obj,
    balloon: obj,
    logger: obj,
    metrics: obj,
  });
  const d = emptyDefinition();
  if (r['boot-source'] !== undefined) d.bootSource = parseBootSource(r['boot-source']);
  if (r['machine-config'] !== undefined) d.machineConfig = parseMachineConfig(r['machine-config']);
  for (const [key, list] of [['drives', r.drives], ['network-interfaces', r['network-interfaces']]] as const) {
    if (list === undefined) continue;
    for (const item of list as unknown[]) {
      const id = String((item as Record<string, unknown> | null)?.[key === 'drives' ? 'drive_id' : 'iface_id'] ?? '');
      if (key === 'drives') addDrive(d, parseDrive(id, item));
      else addNetworkInterface(d, parseNetworkInterface(id, item));
    }
  }
  if (r.vsock !== undefined) d.vsock = parseVsock(r.vsock);
  if (r.entropy !== undefined) d.entropy = parseEntropy(r.entropy);
  if (r.balloon !== undefined) d.balloon = parseBalloon(r.balloon);
  if (r.logger !== undefined) d.logger = parseLogger(r.logger);
  if (r.metrics !== undefined) d.metrics = parseMetrics(r.metrics);
  return d;
}

/** Adds or replaces a drive: one root device at most. */
export function addDrive(d: VmDefinition, drive: Drive): void {
  if (drive.is_root_device) {
    const other = [...d.drives.values()].find((x) => x.is_root_device && x.drive_id !== drive.drive_id);
    if (other) throw new ApiError(`A root block device already exists (${other.drive_id}); a VM has at most one`);
  }
  d.drives.set(drive.drive_id, drive);
}

/** Adds or replaces a NIC: host device names and MACs are unique. */
export function addNetworkInterface(d: VmDefinition, nic: NetworkInterface): void {
  for (const other of d.networkInterfaces.values()) {
    if (other.iface_id === nic.iface_id) continue;
    if (other.host_dev_name === nic.host_dev_name) throw new ApiError(`The host device ${nic.host_dev_name} is already used by network interface ${other.iface_id}`);
    if (nic.guest_mac && other.guest_mac?.toLowerCase() === nic.guest_mac.toLowerCase()) throw new ApiError(`The MAC address ${nic.guest_mac} is already used by network interface ${other.iface_id}`);
  }
  d.networkInterfaces.set(nic.iface_id, nic);
}
