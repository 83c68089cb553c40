// The Firecracker API's resources, read into Kiln's one VM configuration (VmConfig,
// src/config/vm-config.ts) and written back out for GET /vm/config. Each parser checks
// its body's shape the way Firecracker does (a missing required field, a wrong type or
// a field the resource does not have is a 400 with Firecracker's wording) and returns
// the VmConfig input it describes; the Vmm then checks the whole configuration with the
// one schema every front end shares, so values are judged by the same rules as `kiln
// run` flags and manager definitions. ApiError's message is the response's
// fault_message.
import { readFileSync, statSync } from 'node:fs';
import { KilnError } from '../errors.js';
import type { BucketConfig, RateLimiterConfig } from '../virtio/rate-limiter.js';
import type { ReceiveRequest, SendRequest } from '../migration/migration.js';
import type { BalloonConfig, DiskConfig, NetConfig, VmConfig, VsockConfig } from '../config/vm-config.js';
import { MAX_MTU, MIN_MTU } from '../config/vm-config.js';

/** An error the API returns as 400 {"fault_message": message}. */
export class ApiError extends KilnError {}

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

/** VMM-process settings the API configures besides the VM itself. */
export interface VmmSettings {
  logger?: LoggerConfig;
  metrics?: MetricsConfig;
}

// ---- field checking ----
type Kind =
  | { type: 'string' }
  | { type: 'boolean' }
  | { type: 'integer'; min?: number }
  | { type: 'enum'; values: readonly string[] }
  | { type: 'object' }
  | { type: 'array' }
  /** Checked by the caller (a number or its text, say). */
  | { type: 'any' };
type Fields = Readonly<Record<string, Kind & { required?: boolean }>>;

const str = { type: 'string' } as const;
const bool = { type: 'boolean' } as const;
const int = { type: 'integer' } as const;
const oneOf = (...values: string[]) => ({ type: 'enum' as const, values });
const obj = { type: 'object' } as const;
const arr = { type: 'array' } as const;
const any = { type: 'any' } as const;
const req = <K extends Kind>(k: K) => ({ ...k, required: true });

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? 'an object' : `${typeof value} ${JSON.stringify(value)}`;
}

/** Checks `body`'s shape against `fields` (own keys only); returns it as a plain record. */
function check(resource: string, body: unknown, fields: Fields): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw new ApiError(`${resource}: the body must be a JSON object, not ${describe(body)}`);
  const record = body as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!Object.hasOwn(fields, key))
      throw new ApiError(`${resource}: unknown field \`${key}\` (expected one of ${Object.keys(fields).join(', ')})`);
  }
  for (const [name, kind] of Object.entries(fields)) {
    const value = Object.hasOwn(record, name) ? record[name] : undefined;
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
      case 'any':
        break;
    }
  }
  return record;
}

/** Firecracker's ID rule for devices: ASCII letters, digits and underscores, at most 64 of them. */
export function checkId(what: string, id: string): string {
  if (!/^[A-Za-z0-9_]{1,64}$/.test(id))
    throw new ApiError(`Invalid ${what} ID: '${id}' (use 1 to 64 ASCII letters, digits or underscores)`);
  return id;
}

/** Firecracker's rule for the instance ID (--id): ASCII letters, digits and hyphens, at most 64. */
export function checkInstanceId(id: string): string {
  if (!/^[A-Za-z0-9-]{1,64}$/.test(id))
    throw new ApiError(`Invalid instance ID: '${id}' (use 1 to 64 ASCII letters, digits or hyphens)`);
  return id;
}

/**
 * Firecracker's RateLimiter body ({bandwidth, ops}, each {size, one_time_burst,
 * refill_time} with refill_time in ms; null or absent buckets are off) as Kiln's
 * rate limiter config, or undefined when none is given.
 */
export function parseRateLimiter(resource: string, value: unknown): Record<string, unknown> | undefined {
  if (value === undefined || value === null) return undefined;
  const r = check(`${resource}: rate limiter`, value, { bandwidth: obj, ops: obj });
  const bucket = (name: string, b: unknown) => {
    if (b === undefined || b === null) return undefined;
    const t = check(`${resource}: rate limiter ${name}`, b, {
      size: req(int),
      one_time_burst: int,
      refill_time: req(int),
    });
    for (const [k, n] of Object.entries(t))
      if ((n as number) < 0) throw new ApiError(`${resource}: rate limiter ${name}: \`${k}\` must not be negative`);
    return {
      size: t.size,
      refillTimeMs: t.refill_time,
      ...(t.one_time_burst !== undefined ? { oneTimeBurst: t.one_time_burst } : {}),
    };
  };
  const bandwidth = bucket('bandwidth', r.bandwidth);
  const ops = bucket('ops', r.ops);
  return { ...(bandwidth ? { bandwidth } : {}), ...(ops ? { ops } : {}) };
}

function matchIds(pathId: string, bodyId: unknown): void {
  if (bodyId !== pathId)
    throw new ApiError(`The id from the path (${pathId}) does not match the id from the body (${String(bodyId)})`);
}

/** A change to the VM configuration's input: the Vmm applies it, then checks the result. */
export type ConfigChange = (input: Record<string, unknown>) => void;

type Input = Record<string, unknown>;
const items = (input: Input, key: 'disks' | 'nets') => (input[key] as Input[] | undefined) ?? [];

/** Adds, or replaces in place, the device with `id` in the list `key`. */
function upsert(input: Input, key: 'disks' | 'nets', item: Input & { id: string }): void {
  const list = [...items(input, key)];
  const at = list.findIndex((x) => x.id === item.id);
  if (at >= 0) list[at] = item;
  else list.push(item);
  input[key] = list;
}

// ---- resources ----
export function parseBootSource(body: unknown): ConfigChange {
  const r = check('boot-source', body, { kernel_image_path: req(str), boot_args: str, initrd_path: str });
  return (input) => {
    input.kernel = r.kernel_image_path;
    for (const [from, to] of [
      ['boot_args', 'cmdline'],
      ['initrd_path', 'initrd'],
    ] as const) {
      if (r[from] === undefined) delete input[to];
      else input[to] = r[from];
    }
  };
}

const MACHINE_FIELDS: Fields = {
  vcpu_count: int,
  mem_size_mib: int,
  smt: bool,
  track_dirty_pages: bool,
  huge_pages: oneOf('None', 'Transparent', '2M'),
  cpu_template: oneOf('C3', 'T2', 'T2S', 'T2CL', 'T2A', 'V1N1', 'None'),
  /** Kiln's own: guest RAM in a shared memory file, which a live upgrade hands over (VmConfig.sharedMemory). */
  shared_memory: bool,
};

/** PUT (every field but the optional ones reset) or PATCH (only the fields given) /machine-config. */
export function parseMachineConfig(body: unknown, patch = false): ConfigChange {
  const r = check(
    'machine-config',
    body,
    patch ? MACHINE_FIELDS : { ...MACHINE_FIELDS, vcpu_count: req(int), mem_size_mib: req(int) },
  );
  if (r.cpu_template === 'V1N1')
    throw new ApiError(
      'machine-config: CPU template V1N1 is for aarch64 hosts (this is x86_64: C3, T2, T2S, T2CL, T2A)',
    );
  return (input) => {
    if (!patch) for (const key of ['trackDirtyPages', 'hugePages', 'smt', 'sharedMemory']) delete input[key];
    // As Firecracker: no cpu_template keeps the template (static or custom), None clears
    // both, a static one replaces a custom one.
    if (r.cpu_template !== undefined)
      for (const key of ['staticCpuTemplate', 'cpuidModifiers', 'msrModifiers']) delete input[key];
    if (r.cpu_template !== undefined && r.cpu_template !== 'None') input.staticCpuTemplate = r.cpu_template;
    if (r.smt !== undefined) input.smt = r.smt;
    if (r.vcpu_count !== undefined) input.cpus = r.vcpu_count;
    if (r.mem_size_mib !== undefined) input.memoryMiB = r.mem_size_mib;
    if (r.track_dirty_pages !== undefined) input.trackDirtyPages = r.track_dirty_pages;
    if (r.huge_pages !== undefined) input.hugePages = r.huge_pages;
    if (r.shared_memory !== undefined) input.sharedMemory = r.shared_memory;
  };
}

export function parseDrive(pathId: string, body: unknown): ConfigChange {
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
  matchIds(pathId, r.drive_id);
  if (r.socket !== undefined)
    throw new ApiError('drives: vhost-user block devices (`socket`) are not supported by Kiln yet');
  if (r.path_on_host === undefined) throw new ApiError('drives: missing field `path_on_host`');
  const limiter = parseRateLimiter('drives', r.rate_limiter);
  return (input) => {
    upsert(input, 'disks', {
      id: pathId,
      path: r.path_on_host,
      root: r.is_root_device,
      readOnly: r.is_read_only ?? false,
      serial: pathId.slice(0, 20),
      ...(r.partuuid !== undefined ? { partuuid: r.partuuid } : {}),
      ...(r.cache_type !== undefined ? { cacheType: r.cache_type } : {}),
      ...(r.io_engine !== undefined ? { ioEngine: r.io_engine } : {}),
      ...(limiter ? { rateLimiter: limiter } : {}),
    });
  };
}

/** PATCH /drives/{id}: a new backing file and/or rate limiter for an existing drive. */
export function parsePartialDrive(
  pathId: string,
  body: unknown,
): { drive_id: string; path_on_host?: string; rateLimiter?: Record<string, unknown> } {
  checkId('drive', pathId);
  const r = check('drives', body, { drive_id: req(str), path_on_host: str, rate_limiter: obj });
  matchIds(pathId, r.drive_id);
  const limiter = parseRateLimiter('drives', r.rate_limiter);
  return {
    drive_id: pathId,
    ...(r.path_on_host !== undefined ? { path_on_host: r.path_on_host as string } : {}),
    ...(limiter ? { rateLimiter: limiter } : {}),
  };
}

/** PATCH /network-interfaces/{id}: new rate limiters for an existing NIC. */
export function parsePartialNetworkInterface(
  pathId: string,
  body: unknown,
): { iface_id: string; rxRateLimiter?: Record<string, unknown>; txRateLimiter?: Record<string, unknown> } {
  checkId('network interface', pathId);
  const r = check('network-interfaces', body, { iface_id: req(str), rx_rate_limiter: obj, tx_rate_limiter: obj });
  matchIds(pathId, r.iface_id);
  const rx = parseRateLimiter('network-interfaces', r.rx_rate_limiter);
  const tx = parseRateLimiter('network-interfaces', r.tx_rate_limiter);
  return { iface_id: pathId, ...(rx ? { rxRateLimiter: rx } : {}), ...(tx ? { txRateLimiter: tx } : {}) };
}

export function parseNetworkInterface(pathId: string, body: unknown): ConfigChange {
  checkId('network interface', pathId);
  const r = check('network-interfaces', body, {
    iface_id: req(str),
    host_dev_name: req(str),
    guest_mac: str,
    mtu: int,
    rx_rate_limiter: obj,
    tx_rate_limiter: obj,
  });
  matchIds(pathId, r.iface_id);
  if (r.mtu !== undefined && ((r.mtu as number) < MIN_MTU || (r.mtu as number) > MAX_MTU))
    throw new ApiError(`network-interfaces: \`mtu\` must be from ${MIN_MTU} to ${MAX_MTU} (got ${String(r.mtu)})`);
  const rx = parseRateLimiter('network-interfaces', r.rx_rate_limiter);
  const tx = parseRateLimiter('network-interfaces', r.tx_rate_limiter);
  return (input) => {
    upsert(input, 'nets', {
      id: pathId,
      tap: r.host_dev_name,
      ...(r.guest_mac !== undefined ? { mac: r.guest_mac } : {}),
      ...(r.mtu !== undefined ? { mtu: r.mtu } : {}),
      ...(rx ? { rxRateLimiter: rx } : {}),
      ...(tx ? { txRateLimiter: tx } : {}),
    });
  };
}

export function parseVsock(body: unknown): ConfigChange {
  const r = check('vsock', body, { guest_cid: req(int), uds_path: req(str), vsock_id: str });
  return (input) => {
    input.vsock = { guestCid: r.guest_cid, uds: r.uds_path, ...(r.vsock_id !== undefined ? { id: r.vsock_id } : {}) };
  };
}

/** A leaf, subleaf or flags number of a custom CPU template: a number, or text in decimal or 0x hex. */
function templateNumber(where: string, value: unknown, max: number): number {
  const n =
    typeof value === 'number'
      ? value
      : typeof value === 'string' && /^(0x[0-9a-f]+|\d+)$/i.test(value)
        ? Number(value)
        : NaN;
  if (!Number.isSafeInteger(n) || n < 0 || n > max)
    throw new ApiError(
      `cpu-config: ${where} must be a number from 0 to ${max} (decimal or 0x hex), not ${describe(value)}`,
    );
  return n;
}

/** A template's `bitmap`: '0b' and `width` of 0, 1 or x (underscores allowed), most significant bit first; x keeps a bit. */
function parseBitmap(where: string, text: unknown, width: number): { mask: bigint; value: bigint } {
  const bits = typeof text === 'string' ? /^0b([01x_]+)$/.exec(text)?.[1]?.replace(/_/g, '') : undefined;
  if (bits === undefined || bits.length !== width)
    throw new ApiError(`cpu-config: ${where}.bitmap must be '0b' and ${width} of 0, 1 or x, not '${String(text)}'`);
  return {
    mask: BigInt(`0b${bits.replace(/[01]/g, '1').replace(/x/g, '0')}`),
    value: BigInt(`0b${bits.replace(/x/g, '0')}`),
  };
}

/**
 * PUT /cpu-config: Firecracker's custom CPU template. Its `cpuid_modifiers` (leaf,
 * subleaf, flags, and per register a 32-bit `bitmap` "0b" + 0/1/x, most significant bit
 * first, x keeping what the template left) become forced CPUID bits, its `msr_modifiers`
 * (`addr`, a 64-bit bitmap) forced MSR bits; KVM capability changes are refused as not
 * supported. It replaces a static template (machine-config cpu_template), as in Firecracker.
 */
export function parseCpuConfig(body: unknown): ConfigChange {
  const r = check('cpu-config', body, {
    kvm_capabilities: arr,
    cpuid_modifiers: arr,
    msr_modifiers: arr,
    vcpu_features: arr,
    reg_modifiers: arr,
  });
  for (const k of ['vcpu_features', 'reg_modifiers'] as const)
    if (Array.isArray(r[k]) && (r[k] as unknown[]).length > 0)
      throw new ApiError(`cpu-config: ${k} are for aarch64 hosts (this is x86_64)`);
  if (Array.isArray(r.kvm_capabilities) && r.kvm_capabilities.length > 0)
    throw new ApiError(
      'cpu-config: kvm_capabilities are not supported by Kiln (it checks the capabilities it needs itself; cpuid_modifiers and msr_modifiers are supported)',
    );
  const msrModifiers = ((r.msr_modifiers as unknown[] | undefined) ?? []).map((entry, i) => {
    const where = `msr_modifiers[${i}]`;
    const m = check(`cpu-config: ${where}`, entry, { addr: req(any), bitmap: req(str) });
    const index = templateNumber(`${where}.addr`, m.addr, 0xffff_ffff);
    const { mask, value } = parseBitmap(where, m.bitmap, 64);
    return { index, mask: `0x${mask.toString(16)}`, value: `0x${value.toString(16)}` };
  });
  const modifiers: Array<Record<string, unknown>> = [];
  ((r.cpuid_modifiers as unknown[] | undefined) ?? []).forEach((entry, i) => {
    const e = check(`cpu-config: cpuid_modifiers[${i}]`, entry, {
      leaf: req(any),
      subleaf: any,
      flags: int,
      modifiers: req(arr),
    });
    const leaf = templateNumber(`cpuid_modifiers[${i}].leaf`, e.leaf, 0xffff_ffff);
    const subleaf =
      e.subleaf === undefined ? 0 : templateNumber(`cpuid_modifiers[${i}].subleaf`, e.subleaf, 0xffff_ffff);
    const flags = templateNumber(`cpuid_modifiers[${i}].flags`, e.flags ?? 0, 7);
    (e.modifiers as unknown[]).forEach((mod, j) => {
      const where = `cpuid_modifiers[${i}].modifiers[${j}]`;
      const m = check(`cpu-config: ${where}`, mod, {
        register: req(oneOf('eax', 'ebx', 'ecx', 'edx')),
        bitmap: req(str),
      });
      const { mask, value } = parseBitmap(where, m.bitmap, 32);
      modifiers.push({ leaf, subleaf, flags, register: m.register, mask: Number(mask), value: Number(value) });
    });
  });
  return (input) => {
    delete input.staticCpuTemplate;
    input.cpuidModifiers = modifiers;
    if (msrModifiers.length > 0) input.msrModifiers = msrModifiers;
    else delete input.msrModifiers;
  };
}

export function parseEntropy(body: unknown): ConfigChange {
  const r = check('entropy', body, { rate_limiter: obj });
  const limiter = parseRateLimiter('entropy', r.rate_limiter);
  return (input) => {
    input.rng = true;
    if (limiter) input.rngRateLimiter = limiter;
    else delete input.rngRateLimiter;
  };
}

/** PUT /mmds/config: MMDS's version, address, format and the NICs it answers on. */
export function parseMmdsConfig(body: unknown): ConfigChange {
  const r = check('mmds-config', body, {
    version: oneOf('V1', 'V2'),
    network_interfaces: req(arr),
    ipv4_address: str,
    imds_compat: bool,
  });
  return (input) => {
    input.mmds = {
      nets: r.network_interfaces,
      ...(r.version !== undefined ? { version: r.version } : {}),
      ...(r.ipv4_address !== undefined ? { ipv4: r.ipv4_address } : {}),
      ...(r.imds_compat !== undefined ? { imdsCompat: r.imds_compat } : {}),
    };
  };
}

export function parseBalloon(body: unknown): ConfigChange {
  const r = check('balloon', body, {
    amount_mib: req(int),
    deflate_on_oom: req(bool),
    stats_polling_interval_s: int,
    free_page_hinting: bool,
    free_page_reporting: bool,
  });
  return (input) => {
    input.balloon = {
      targetMiB: r.amount_mib,
      deflateOnOom: r.deflate_on_oom,
      statsIntervalS: r.stats_polling_interval_s ?? 0,
      freePageReporting: r.free_page_reporting ?? false,
      freePageHinting: r.free_page_hinting ?? false,
    };
  };
}

/** PATCH /balloon: a new target (MiB). */
export function parseBalloonUpdate(body: unknown): ConfigChange & { readonly mib: unknown } {
  const mib = check('balloon', body, { amount_mib: req(int) }).amount_mib;
  const change: ConfigChange = (input) => {
    const balloon = input.balloon as Input | undefined;
    if (!balloon) throw new ApiError('The balloon device is not configured.');
    input.balloon = { ...balloon, targetMiB: mib };
  };
  return Object.assign(change, { mib });
}

/** PATCH /balloon/statistics: a new statistics interval (seconds; 0: off). */
export function parseBalloonStatsUpdate(body: unknown): ConfigChange & { readonly seconds: number } {
  const seconds = check('balloon statistics', body, { stats_polling_interval_s: req(int) })
    .stats_polling_interval_s as number;
  const change: ConfigChange = (input) => {
    const balloon = input.balloon as Input | undefined;
    if (!balloon) throw new ApiError('The balloon device is not configured.');
    input.balloon = { ...balloon, statsIntervalS: seconds };
  };
  return Object.assign(change, { seconds });
}

/** PUT /serial: where the serial console's output goes (a file or a FIFO). */
export function parseSerial(body: unknown): { serial_out_path?: string } {
  const r = check('serial', body, { serial_out_path: str, rate_limiter: obj });
  if (r.rate_limiter !== undefined && r.rate_limiter !== null)
    throw new ApiError("serial: a rate limiter on the serial console's output is not supported by Kiln yet");
  return r.serial_out_path !== undefined ? { serial_out_path: r.serial_out_path as string } : {};
}

export function parseLogger(body: unknown): LoggerConfig {
  const r = check('logger', body, { log_path: str, level: str, show_level: bool, show_log_origin: bool, module: str });
  const level = (r.level as string | undefined) ?? 'Info';
  const canonical = ['Error', 'Warning', 'Info', 'Debug', 'Trace', 'Off'].find(
    (l) => l.toLowerCase() === level.toLowerCase(),
  );
  if (!canonical)
    throw new ApiError(`logger: \`level\` must be one of Error, Warning, Info, Debug, Trace, Off (got ${level})`);
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
  return check('actions', body, { action_type: req(oneOf('FlushMetrics', 'InstanceStart', 'SendCtrlAltDel')) })
    .action_type as 'InstanceStart' | 'SendCtrlAltDel' | 'FlushMetrics';
}

export interface SnapshotCreate {
  readonly snapshotPath: string;
  readonly memFilePath: string;
  readonly type: 'Full' | 'Diff';
}

export function parseSnapshotCreate(body: unknown): SnapshotCreate {
  const r = check('snapshot/create', body, {
    snapshot_path: req(str),
    mem_file_path: req(str),
    snapshot_type: oneOf('Full', 'Diff'),
    version: str,
  });
  return {
    snapshotPath: r.snapshot_path as string,
    memFilePath: r.mem_file_path as string,
    type: (r.snapshot_type as 'Full' | 'Diff' | undefined) ?? 'Full',
  };
}

export interface SnapshotLoad {
  readonly snapshotPath: string;
  readonly memFilePath: string;
  readonly backend: 'File' | 'Uffd';
  readonly resume: boolean;
  readonly trackDirtyPages: boolean;
  readonly clockRealtime: boolean;
  /** iface_id -> the TAP to use instead. */
  readonly networkOverrides: ReadonlyMap<string, string>;
  readonly vsockUds?: string;
  /** Kiln's own vsock_override.guest_cid: a clone's CID (the guest reads it again at the transport reset). */
  readonly vsockCid?: number;
}

/** `network_overrides` ([{iface_id, host_dev_name}]) as iface_id -> TAP. */
function networkOverrides(resource: string, list: unknown): Map<string, string> {
  const overrides = new Map<string, string>();
  for (const o of (list as unknown[] | undefined) ?? []) {
    const n = check(`${resource}: network_overrides`, o, { iface_id: req(str), host_dev_name: req(str) });
    overrides.set(n.iface_id as string, n.host_dev_name as string);
  }
  return overrides;
}

export function parseSnapshotLoad(body: unknown): SnapshotLoad {
  const r = check('snapshot/load', body, {
    snapshot_path: req(str),
    mem_file_path: str,
    mem_backend: obj,
    enable_diff_snapshots: bool,
    track_dirty_pages: bool,
    resume_vm: bool,
    network_overrides: arr,
    vsock_override: obj,
    clock_realtime: bool,
  });
  let memFilePath = r.mem_file_path as string | undefined;
  let backend: 'File' | 'Uffd' = 'File';
  if (r.mem_backend !== undefined) {
    if (memFilePath !== undefined)
      throw new ApiError('snapshot/load: give either `mem_backend` or the older `mem_file_path`, not both');
    const m = check('snapshot/load: mem_backend', r.mem_backend, {
      backend_type: req(oneOf('File', 'Uffd')),
      backend_path: req(str),
    });
    backend = m.backend_type as 'File' | 'Uffd';
    memFilePath = m.backend_path as string;
  }
  if (memFilePath === undefined) throw new ApiError('snapshot/load: missing field `mem_backend`');
  const overrides = networkOverrides('snapshot/load', r.network_overrides);
  const vsock =
    r.vsock_override !== undefined
      ? check('snapshot/load: vsock_override', r.vsock_override, { uds_path: req(str), guest_cid: int })
      : undefined;
  return {
    snapshotPath: r.snapshot_path as string,
    memFilePath,
    backend,
    resume: (r.resume_vm as boolean | undefined) ?? false,
    trackDirtyPages: ((r.track_dirty_pages ?? r.enable_diff_snapshots) as boolean | undefined) ?? false,
    clockRealtime: (r.clock_realtime as boolean | undefined) ?? false,
    networkOverrides: overrides,
    ...(vsock !== undefined ? { vsockUds: vsock.uds_path as string } : {}),
    ...(vsock?.guest_cid !== undefined ? { vsockCid: vsock.guest_cid as number } : {}),
  };
}

export function parseMigrationSend(body: unknown): SendRequest {
  const r = check('migration/send', body, {
    destination: req(str),
    token: req(str),
    downtime_ms: int,
    max_bandwidth_mib_s: int,
    max_iterations: int,
    auto_converge: bool,
    tls_ca: str,
    copy_disks: bool,
    local: bool,
  });
  const positive = (name: string, value: unknown) => {
    if (value !== undefined && (value as number) < 1)
      throw new ApiError(`migration/send: \`${name}\` must be at least 1, not ${String(value)}`);
  };
  positive('downtime_ms', r.downtime_ms);
  positive('max_bandwidth_mib_s', r.max_bandwidth_mib_s);
  positive('max_iterations', r.max_iterations);
  if ((r.token as string).length === 0) throw new ApiError('migration/send: `token` must not be empty');
  return {
    destination: r.destination as string,
    token: r.token as string,
    downtimeMs: (r.downtime_ms as number | undefined) ?? 300,
    maxIterations: (r.max_iterations as number | undefined) ?? 30,
    autoConverge: (r.auto_converge as boolean | undefined) ?? true,
    copyDisks: (r.copy_disks as boolean | undefined) ?? false,
    local: (r.local as boolean | undefined) ?? false,
    ...(r.max_bandwidth_mib_s !== undefined ? { maxBandwidthMiBs: r.max_bandwidth_mib_s as number } : {}),
    ...(r.tls_ca !== undefined ? { tlsCa: r.tls_ca as string } : {}),
  };
}

export function parseMigrationReceive(body: unknown): ReceiveRequest {
  const r = check('migration/receive', body, {
    listen: req(str),
    token: req(str),
    tls_cert: str,
    tls_key: str,
    network_overrides: arr,
    vsock_override: obj,
    disk_overrides: arr,
    memory_fd: int,
  });
  if ((r.token as string).length === 0) throw new ApiError('migration/receive: `token` must not be empty');
  const memoryFd = r.memory_fd as number | undefined;
  if (memoryFd !== undefined && memoryFd < 3)
    throw new ApiError(`migration/receive: \`memory_fd\` must be an inherited fd (3 or more), not ${memoryFd}`);
  const disks = new Map<string, string>();
  for (const o of (r.disk_overrides as unknown[] | undefined) ?? []) {
    const d = check('migration/receive: disk_overrides', o, { drive_id: req(str), path_on_host: req(str) });
    disks.set(d.drive_id as string, d.path_on_host as string);
  }
  const overrides = networkOverrides('migration/receive', r.network_overrides);
  const vsock =
    r.vsock_override !== undefined
      ? check('migration/receive: vsock_override', r.vsock_override, { uds_path: req(str) })
      : undefined;
  return {
    listen: r.listen as string,
    token: r.token as string,
    networkOverrides: overrides,
    diskOverrides: disks,
    ...(r.tls_cert !== undefined ? { tlsCert: r.tls_cert as string } : {}),
    ...(r.tls_key !== undefined ? { tlsKey: r.tls_key as string } : {}),
    ...(vsock !== undefined ? { vsockUds: vsock.uds_path as string } : {}),
    ...(memoryFd !== undefined ? { memoryFd } : {}),
  };
}

// ---- VmConfig -> Firecracker's resources (GET /vm/config, GET /machine-config, GET /balloon) ----
export function exportMachineConfig(c: VmConfig): Record<string, unknown> {
  return {
    vcpu_count: c.cpus,
    mem_size_mib: c.memoryMiB,
    smt: c.smt,
    track_dirty_pages: c.trackDirtyPages,
    huge_pages: c.hugePages ?? 'None',
    ...(c.staticCpuTemplate !== undefined ? { cpu_template: c.staticCpuTemplate } : {}),
    ...(c.sharedMemory === true ? { shared_memory: true } : {}),
  };
}

export function exportDrive(d: DiskConfig): Record<string, unknown> {
  return {
    drive_id: d.id,
    path_on_host: d.path,
    is_root_device: d.root,
    is_read_only: d.readOnly,
    ...(d.partuuid !== undefined ? { partuuid: d.partuuid } : {}),
    cache_type: d.cacheType ?? 'Unsafe',
    io_engine: d.ioEngine ?? 'Sync',
    ...(d.rateLimiter ? { rate_limiter: exportRateLimiter(d.rateLimiter) } : {}),
  };
}

/** A forced-bits mask and value as Firecracker's bitmap: '0b', most significant bit first, x where not forced. */
function bitmap(width: number, mask: bigint, value: bigint): string {
  let out = '0b';
  for (let bit = width - 1; bit >= 0; bit--) {
    const b = 1n << BigInt(bit);
    out += mask & b ? (value & b ? '1' : '0') : 'x';
  }
  return out;
}

/** A custom CPU template in PUT /cpu-config's shape (GET /vm/config's `cpu-config`). */
export function exportCpuConfig(c: VmConfig): Record<string, unknown> {
  const leaves = new Map<string, { leaf: string; subleaf: string; flags: number; modifiers: unknown[] }>();
  for (const m of c.cpuidModifiers ?? []) {
    const key = `${m.leaf}:${m.subleaf}:${m.flags}`;
    let entry = leaves.get(key);
    if (!entry) {
      entry = {
        leaf: `0x${m.leaf.toString(16)}`,
        subleaf: `0x${m.subleaf.toString(16)}`,
        flags: m.flags,
        modifiers: [],
      };
      leaves.set(key, entry);
    }
    entry.modifiers.push({ register: m.register, bitmap: bitmap(32, BigInt(m.mask), BigInt(m.value)) });
  }
  return {
    cpuid_modifiers: [...leaves.values()],
    msr_modifiers: (c.msrModifiers ?? []).map((m) => ({
      addr: `0x${m.index.toString(16)}`,
      bitmap: bitmap(64, BigInt(m.mask), BigInt(m.value)),
    })),
  };
}

/** Kiln's rate limiter config in Firecracker's shape. */
export function exportRateLimiter(l: RateLimiterConfig): Record<string, unknown> {
  const bucket = (b: BucketConfig) => ({
    size: b.size,
    ...(b.oneTimeBurst !== undefined ? { one_time_burst: b.oneTimeBurst } : {}),
    refill_time: b.refillTimeMs,
  });
  return { ...(l.bandwidth ? { bandwidth: bucket(l.bandwidth) } : {}), ...(l.ops ? { ops: bucket(l.ops) } : {}) };
}

export function exportBalloon(b: BalloonConfig): Record<string, unknown> {
  return {
    amount_mib: b.targetMiB,
    deflate_on_oom: b.deflateOnOom,
    stats_polling_interval_s: b.statsIntervalS,
    free_page_reporting: b.freePageReporting,
    free_page_hinting: b.freePageHinting,
  };
}

/** PATCH /balloon/hinting/start: an optional body, `acknowledge_on_stop` (default true, as Firecracker's). */
export function parseHintingStart(body: unknown): boolean {
  if (body === undefined) return true;
  const r = check('balloon hinting', body, { acknowledge_on_stop: bool });
  return (r.acknowledge_on_stop as boolean | undefined) ?? true;
}

const exportNet = (n: NetConfig) => ({
  iface_id: n.id,
  host_dev_name: n.tap,
  ...(n.mac !== undefined ? { guest_mac: n.mac } : {}),
  ...(n.mtu !== undefined ? { mtu: n.mtu } : {}),
  ...(n.rxRateLimiter ? { rx_rate_limiter: exportRateLimiter(n.rxRateLimiter) } : {}),
  ...(n.txRateLimiter ? { tx_rate_limiter: exportRateLimiter(n.txRateLimiter) } : {}),
});
const exportVsock = (v: VsockConfig) => ({
  guest_cid: v.guestCid,
  uds_path: v.uds,
  ...(v.id !== undefined ? { vsock_id: v.id } : {}),
});

/**
 * GET /vm/config and --config-file share this shape (FullVmConfiguration). What
 * Firecracker cannot express (passt NICs, a console socket, Kiln's own CPU templates) is left out.
 */
export function exportDefinition(c: VmConfig, s: VmmSettings): Record<string, unknown> {
  return {
    ...(c.kernel !== undefined
      ? {
          'boot-source': {
            kernel_image_path: c.kernel,
            ...(c.cmdline !== undefined ? { boot_args: c.cmdline } : {}),
            ...(c.initrd !== undefined ? { initrd_path: c.initrd } : {}),
          },
        }
      : {}),
    'machine-config': exportMachineConfig(c),
    ...(c.cpuidModifiers?.length || c.msrModifiers?.length ? { 'cpu-config': exportCpuConfig(c) } : {}),
    drives: c.disks.map(exportDrive),
    'network-interfaces': c.nets.filter((n) => n.tap !== undefined).map(exportNet),
    ...(c.vsock ? { vsock: exportVsock(c.vsock) } : {}),
    ...(c.rng ? { entropy: c.rngRateLimiter ? { rate_limiter: exportRateLimiter(c.rngRateLimiter) } : {} } : {}),
    ...(c.balloon ? { balloon: exportBalloon(c.balloon) } : {}),
    ...(c.mmds
      ? {
          'mmds-config': {
            version: c.mmds.version,
            network_interfaces: [...c.mmds.nets],
            ipv4_address: c.mmds.ipv4,
            imds_compat: c.mmds.imdsCompat,
          },
        }
      : {}),
    ...(s.logger ? { logger: s.logger } : {}),
    ...(s.metrics ? { metrics: s.metrics } : {}),
  };
}

const MAX_CPU_TEMPLATE_BYTES = 1024 * 1024;

/** A config file's `cpu-config`: a custom CPU template inline, or the path of its JSON file (as Firecracker takes either). */
function cpuConfigOf(value: unknown): unknown {
  if (typeof value !== 'string') return value;
  let text: string;
  try {
    const st = statSync(value);
    if (!st.isFile()) throw new Error('not a regular file');
    if (st.size > MAX_CPU_TEMPLATE_BYTES) throw new Error(`larger than ${MAX_CPU_TEMPLATE_BYTES} bytes`);
    text = readFileSync(value, 'utf8');
  } catch (err) {
    throw new ApiError(`cpu-config: cannot read the CPU template '${value}': ${(err as Error).message}`);
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new ApiError(`cpu-config: the CPU template '${value}' is not JSON: ${(err as Error).message}`);
  }
}

/** Reads a --config-file's JSON (the same resources, keyed as GET /vm/config returns them). */
export function parseConfigFile(json: unknown): { changes: ConfigChange[]; settings: VmmSettings } {
  const r = check('config file', json, {
    'boot-source': obj,
    'machine-config': obj,
    drives: arr,
    'network-interfaces': arr,
    vsock: obj,
    entropy: obj,
    balloon: obj,
    logger: obj,
    metrics: obj,
    'mmds-config': obj,
    'cpu-config': any,
  });
  const changes: ConfigChange[] = [];
  const settings: VmmSettings = {};
  if (r['boot-source'] !== undefined) changes.push(parseBootSource(r['boot-source']));
  if (r['machine-config'] !== undefined) changes.push(parseMachineConfig(r['machine-config']));
  if (r['cpu-config'] !== undefined) changes.push(parseCpuConfig(cpuConfigOf(r['cpu-config'])));
  for (const item of (r.drives as unknown[] | undefined) ?? [])
    changes.push(parseDrive(String((item as Input | null)?.drive_id ?? ''), item));
  for (const item of (r['network-interfaces'] as unknown[] | undefined) ?? [])
    changes.push(parseNetworkInterface(String((item as Input | null)?.iface_id ?? ''), item));
  if (r.vsock !== undefined) changes.push(parseVsock(r.vsock));
  if (r.entropy !== undefined) changes.push(parseEntropy(r.entropy));
  if (r.balloon !== undefined) changes.push(parseBalloon(r.balloon));
  if (r['mmds-config'] !== undefined) changes.push(parseMmdsConfig(r['mmds-config']));
  if (r.logger !== undefined) settings.logger = parseLogger(r.logger);
  if (r.metrics !== undefined) settings.metrics = parseMetrics(r.metrics);
  return { changes, settings };
}
