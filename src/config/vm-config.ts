// One VM configuration for every front end. `kiln run` flags, the Firecracker API's
// resources and the manager's definitions (YAML or JSON) all convert to a VmConfig and
// are checked here, by one schema: the same bad configuration gets the same answer
// wherever it comes from. The TypeScript types are derived from the schemas, so a field
// added here reaches every front end's type checking.
//
// The schemas are valibot's (docs/ARCHITECTURE.md says why). Every object is strict:
// a key the schema does not name is refused, whatever it is called (`__proto__`,
// `constructor` and `toString` included: valibot checks own keys only).
import * as v from 'valibot';
import { KilnError } from '../errors.js';

/** The most vCPUs a VM may have: the MADT's one-byte APIC IDs (255 is the broadcast ID, 0xff). */
export const MAX_VCPUS = 254;
/** Guest RAM bounds in MiB: at least one page-table's worth, at most 4 TiB. */
export const MIN_MEMORY_MIB = 1;
export const MAX_MEMORY_MIB = 4 * 1024 * 1024;
/** virtio-blk's GET_ID answer is at most 20 bytes (virtio 1.2, 5.2.6). */
export const MAX_SERIAL_BYTES = 20;
/** The MTU a NIC may tell its guest: IPv4's minimum to the largest 16-bit value (Firecracker's bounds). */
export const MIN_MTU = 68;
export const MAX_MTU = 65535;
/** Linux's IFNAMSIZ, less the terminating NUL. */
const MAX_IFNAME_BYTES = 15;

/** The defaults, in one place. */
export const DEFAULTS = {
  cpus: 1,
  memoryMiB: 128,
} as const;

/** A configuration that cannot be used: `field` is its path in VmConfig ("disks[1].path"). */
export class ConfigError extends KilnError {
  override readonly name: string = 'ConfigError';
  constructor(
    readonly field: string,
    readonly reason: string,
  ) {
    super(field ? `${field}: ${reason}` : reason);
  }
}

const got = (input: unknown) => (typeof input === 'string' ? `'${input}'` : (JSON.stringify(input) ?? String(input)));

export const text = (what = 'a string') => v.string(({ input }) => `must be ${what} (got ${describe(input)})`);
const nonEmpty = (what: string) => v.pipe(text(what), v.nonEmpty(`must be ${what} (got an empty string)`));
const flag = () => v.boolean(({ input }) => `must be true or false (got ${describe(input)})`);
/** A whole number in [min, max], with the one message every front end gives. */
export const whole = (min: number, max: number) =>
  v.pipe(
    v.number(({ input }) => `must be a whole number from ${min} to ${max} (got ${describe(input)})`),
    v.integer(({ input }) => `must be a whole number from ${min} to ${max} (got ${got(input)})`),
    v.minValue(min, ({ input }) => `must be a whole number from ${min} to ${max} (got ${got(input)})`),
    v.maxValue(max, ({ input }) => `must be a whole number from ${min} to ${max} (got ${got(input)})`),
  );
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) =>
  v.picklist(values, ({ input }) => `must be one of ${values.join(', ')} (got ${describe(input)})`);
const list = <T extends v.GenericSchema>(item: T) =>
  v.optional(
    v.array(item, ({ input }) => `must be a list (got ${describe(input)})`),
    [],
  );
/** An object schema's message: an unknown key, a missing required key, or not an object at all. */
export function objectMessage(known: readonly string[], what = 'an object') {
  return (issue: v.BaseIssue<unknown>): string => {
    if (issue.expected === 'never') return `is not a known field (known: ${known.join(', ')})`;
    if (issue.path?.length && issue.received === 'undefined') return 'is required';
    return `must be ${what} (got ${describe(issue.input)})`;
  };
}
const strict = <E extends v.ObjectEntries>(entries: E) => v.strictObject(entries, objectMessage(Object.keys(entries)));

function describe(input: unknown): string {
  if (input === null) return 'null';
  if (Array.isArray(input)) return 'a list';
  if (typeof input === 'object') return 'an object';
  if (typeof input === 'string') return `'${input}'`;
  return `${typeof input} ${String(input)}`;
}

/** Firecracker's device ID rule: ASCII letters, digits and underscores, 1 to 64 of them. */
export const DeviceId = v.pipe(
  text(),
  v.regex(
    /^[A-Za-z0-9_]{1,64}$/,
    ({ input }) => `must be 1 to 64 ASCII letters, digits or underscores (got '${input}')`,
  ),
);

const Mac = v.pipe(
  text('a MAC address'),
  v.regex(
    /^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$/,
    ({ input }) => `'${input}' is not a MAC address (expected six hex pairs, like 06:00:ac:10:00:02)`,
  ),
  v.check(
    (mac) => (parseInt(mac.slice(0, 2), 16) & 1) === 0,
    ({ input }) => `${String(input)} is a multicast address; a NIC needs a unicast one`,
  ),
);

const IfName = v.pipe(
  text('an interface name'),
  v.check(
    (name) => name.length > 0 && Buffer.byteLength(name) <= MAX_IFNAME_BYTES && /^[\w.-]+$/.test(name),
    ({ input }) => `'${String(input)}' is not a valid interface name (1-15 letters, digits, '-', '_' or '.')`,
  ),
);

const MAX_TOKENS = Number.MAX_SAFE_INTEGER;
/** A token bucket (Firecracker's TokenBucket: size, one_time_burst, refill_time in ms); size or refill 0 turns it off. */
export const BucketSchema = strict({
  size: whole(0, MAX_TOKENS),
  oneTimeBurst: v.optional(whole(0, MAX_TOKENS)),
  refillTimeMs: whole(0, MAX_TOKENS),
});
/** A rate limiter: a bytes bucket and an operations bucket, either optional. */
export const RateLimiterSchema = strict({
  bandwidth: v.optional(BucketSchema),
  ops: v.optional(BucketSchema),
});

export const DiskSchema = strict({
  /** Unique among the disks; the API's drive_id. Default: disk<N>. */
  id: v.optional(DeviceId),
  path: nonEmpty('the path of a disk image'),
  readOnly: v.optional(flag(), false),
  /** The root file system: the first disk the guest sees (/dev/vda), and root= on the command line. */
  root: v.optional(flag(), false),
  /** What the guest reads as the disk's ID (VIRTIO_BLK_T_GET_ID). Default: kiln-disk-<N>. */
  serial: v.optional(
    v.pipe(
      text(),
      v.check(
        (s) => Buffer.byteLength(s) <= MAX_SERIAL_BYTES && /^[\x20-\x7e]*$/.test(s),
        `must be at most ${MAX_SERIAL_BYTES} printable ASCII characters`,
      ),
    ),
  ),
  /** root=PARTUUID=... instead of root=/dev/vda (Firecracker's partuuid). */
  partuuid: v.optional(nonEmpty('a partition UUID')),
  /** Firecracker's cache_type and io_engine: kept and reported; Kiln's block device is synchronous either way. */
  cacheType: v.optional(oneOf(['Unsafe', 'Writeback'] as const)),
  ioEngine: v.optional(oneOf(['Sync', 'Async'] as const)),
  /** Firecracker's rate_limiter: the guest's requests to this disk (bytes and requests). */
  rateLimiter: v.optional(RateLimiterSchema),
});

export const NetSchema = v.pipe(
  strict({
    /** Unique among the NICs; the API's iface_id. Default: net<N>. */
    id: v.optional(DeviceId),
    /** A TAP interface (created if it does not exist; needs CAP_NET_ADMIN). */
    tap: v.optional(IfName),
    /** passt's Unix socket (rootless networking). */
    passt: v.optional(nonEmpty("the path of passt's socket")),
    mac: v.optional(Mac),
    /** The MTU told to the guest (VIRTIO_NET_F_MTU; Firecracker's mtu); none: the guest's default. */
    mtu: v.optional(whole(MIN_MTU, MAX_MTU)),
    /** Firecracker's rx_rate_limiter and tx_rate_limiter: frames to and from the guest. */
    rxRateLimiter: v.optional(RateLimiterSchema),
    txRateLimiter: v.optional(RateLimiterSchema),
  }),
  v.check(
    (n) => (n.tap === undefined) !== (n.passt === undefined),
    'needs either tap (a TAP name) or passt (a socket path), not both or neither',
  ),
);

/** A link-local IPv4 address MMDS may answer at (Firecracker's rule: 169.254.1-254.x). */
export const MmdsAddress = v.pipe(
  text('an IPv4 address'),
  v.check(
    (a) => /^169\.254\.([1-9]|[1-9]\d|1\d\d|2[0-4]\d|25[0-4])\.([0-9]|[1-9]\d|1\d\d|2[0-4]\d|25[0-5])$/.test(a),
    (issue) => `must be a link-local IPv4 address from 169.254.1.0 to 169.254.254.255 (got '${String(issue.input)}')`,
  ),
);

export const MmdsSchema = strict({
  /** V1 (GETs without a session) or V2 (a session token first). */
  version: v.optional(oneOf(['V1', 'V2'] as const), 'V1'),
  /** The NICs (by ID) whose frames to the address are answered by MMDS. */
  nets: v.pipe(
    v.array(DeviceId, ({ input }) => `must be a list (got ${describe(input)})`),
    v.minLength(1, 'must name at least one network interface'),
  ),
  ipv4: v.optional(MmdsAddress, '169.254.169.254'),
  /** Always answer in IMDS's plain-text format, whatever the request's Accept says. */
  imdsCompat: v.optional(flag(), false),
});

export const VsockSchema = strict({
  /** The guest's context ID: 0-2 are reserved (hypervisor, local, host). */
  guestCid: whole(3, 0xffff_ffff),
  /** The Unix socket Kiln listens on (Firecracker's hybrid vsock). */
  uds: nonEmpty('the path of a Unix socket'),
  /** Firecracker's vsock_id (kept and reported). */
  id: v.optional(text()),
});

export const BalloonSchema = strict({
  targetMiB: whole(0, MAX_MEMORY_MIB),
  deflateOnOom: v.optional(flag(), false),
  /** Seconds between statistics updates; 0: statistics off. */
  statsIntervalS: v.optional(whole(0, 24 * 3600), 0),
  freePageReporting: v.optional(flag(), false),
  /** Free page hinting: host-started runs (PATCH /balloon/hinting/start) in which the guest's free pages are freed. */
  freePageHinting: v.optional(flag(), false),
});

/**
 * One CPUID register's forced bits (Firecracker's custom CPU templates, PUT /cpu-config):
 * where `mask` has a 1 the guest sees `value`'s bit, elsewhere what the template left.
 */
const CpuidModifierSchema = strict({
  leaf: whole(0, 0xffff_ffff),
  subleaf: v.optional(whole(0, 0xffff_ffff), 0),
  /** KVM_CPUID_FLAG_SIGNIFCANT_INDEX (1): the subleaf must match too. */
  flags: v.optional(whole(0, 7), 0),
  register: oneOf(['eax', 'ebx', 'ecx', 'edx'] as const),
  mask: whole(0, 0xffff_ffff),
  value: whole(0, 0xffff_ffff),
});

/** A 64-bit number as JSON can hold it exactly: '0x' and 1 to 16 hex digits. */
const hex64 = () =>
  v.pipe(
    text("'0x' and up to 16 hex digits"),
    v.regex(/^0x[0-9a-f]{1,16}$/i, ({ input }) => `must be '0x' and up to 16 hex digits (got ${got(input)})`),
  );

/** One MSR's forced bits (a custom CPU template's msr_modifiers): where `mask` has a 1 the guest reads `value`'s bit. */
const MsrModifierSchema = strict({
  index: whole(0, 0xffff_ffff),
  mask: hex64(),
  value: hex64(),
});

/** The fields of a VM, shared by VmConfig and the manager's definitions. */
export const VM_ENTRIES = {
  /** A Linux kernel (ELF vmlinux or bzImage); none means the guest kit's minimal Linux. */
  kernel: v.optional(nonEmpty('the path of a kernel')),
  initrd: v.optional(nonEmpty('the path of an initrd')),
  /** Extra kernel command line; Kiln adds its console and the CPU template's flags. */
  cmdline: v.optional(text()),
  cpus: v.optional(whole(1, MAX_VCPUS), DEFAULTS.cpus),
  memoryMiB: v.optional(whole(MIN_MEMORY_MIB, MAX_MEMORY_MIB), DEFAULTS.memoryMiB),
  /** host, pvm or baseline (src/cpu/templates.ts); default: pvm on software KVM, host elsewhere. */
  cpuTemplate: v.optional(oneOf(['host', 'pvm', 'baseline'] as const)),
  /** CPUID bits forced on top of the template (Firecracker's custom CPU template's cpuid_modifiers). */
  cpuidModifiers: v.optional(v.array(CpuidModifierSchema, ({ input }) => `must be a list (got ${describe(input)})`)),
  /** MSR bits forced at boot (a custom CPU template's msr_modifiers). */
  msrModifiers: v.optional(v.array(MsrModifierSchema, ({ input }) => `must be a list (got ${describe(input)})`)),
  /**
   * Firecracker's static CPU template (machine-config cpu_template): an EC2 instance type's
   * CPUID and MSR bits, applied on top of cpuTemplate, only on the processors it was made for.
   */
  staticCpuTemplate: v.optional(oneOf(['C3', 'T2', 'T2S', 'T2CL', 'T2A'] as const)),
  /** Huge pages for guest memory (Firecracker's huge_pages): None, Transparent (madvise), or 2M from the host's hugetlb pool. */
  hugePages: v.optional(oneOf(['None', 'Transparent', '2M'] as const)),
  /**
   * Firecracker's smt: the guest sees two threads per core (CPUID's topology), so the
   * vCPU count must be 1 or even; off, each vCPU is a core of its own.
   */
  smt: v.optional(flag(), false),
  /** Firecracker's track_dirty_pages: kept and reported (dirty logging arrives with snapshots). */
  trackDirtyPages: v.optional(flag(), false),
  /**
   * Guest RAM is one shared memory file (a memfd) instead of private memory, so that
   * `kiln upgrade` hands it to a new VMM without copying it. Unset: off for kiln-vmm and
   * `kiln run`, on for the manager's VMs (a VM restored from a snapshot maps the
   * snapshot's memory file privately whatever this says).
   */
  sharedMemory: v.optional(flag()),
  disks: list(DiskSchema),
  nets: list(NetSchema),
  /** An entropy device (virtio-rng). */
  rng: v.optional(flag(), false),
  /** The entropy device's rate limiter (bytes and requests). */
  rngRateLimiter: v.optional(RateLimiterSchema),
  vsock: v.optional(VsockSchema),
  /** A virtio console (hvc0) on a Unix socket Kiln listens on. */
  consoleSocket: v.optional(nonEmpty('the path of a Unix socket')),
  balloon: v.optional(BalloonSchema),
  /** The microVM metadata service on some of the NICs (Firecracker's /mmds/config). */
  mmds: v.optional(MmdsSchema),
};

export const VmConfigSchema = strict(VM_ENTRIES);

type Parsed = v.InferOutput<typeof VmConfigSchema>;
export type DiskConfig = v.InferOutput<typeof DiskSchema> & { readonly id: string };
export type NetConfig = v.InferOutput<typeof NetSchema> & { readonly id: string };
export type VsockConfig = v.InferOutput<typeof VsockSchema>;
export type BalloonConfig = v.InferOutput<typeof BalloonSchema>;
/** A checked VM configuration: every default filled in, every device with its ID. */
export type VmConfig = Readonly<Omit<Parsed, 'disks' | 'nets'>> & {
  readonly disks: readonly DiskConfig[];
  readonly nets: readonly NetConfig[];
};
/** Whether the VM has any virtio device (and so an I/O thread). */
export function hasVirtio(c: VmConfig): boolean {
  return c.disks.length + c.nets.length > 0 || c.rng || !!c.vsock || !!c.balloon || c.consoleSocket !== undefined;
}

/** What a front end hands in (defaults may be missing); anything else is refused. */
export type VmConfigInput = v.InferInput<typeof VmConfigSchema>;

/** The first issue of a failed parse as a ConfigError (path in VmConfig's own terms). */
export function configError(issues: readonly v.BaseIssue<unknown>[]): ConfigError {
  const issue = issues[0]!;
  let field = '';
  for (const item of issue.path ?? []) {
    const key = item.key;
    field += typeof key === 'number' ? `[${key}]` : `${field ? '.' : ''}${String(key)}`;
  }
  return new ConfigError(field, issue.message);
}

/** Checks what the schema cannot see field by field: IDs, the root disk, TAPs and MACs. */
export function finishDevices<
  T extends {
    disks: readonly v.InferOutput<typeof DiskSchema>[];
    nets: readonly v.InferOutput<typeof NetSchema>[];
    kernel?: string | undefined;
    initrd?: string | undefined;
    cpus?: number | undefined;
    smt?: boolean | undefined;
    hugePages?: string | undefined;
    memoryMiB?: number | undefined;
    mmds?: { readonly nets: readonly string[] } | undefined;
  },
>(parsed: T): Omit<T, 'disks' | 'nets'> & { disks: DiskConfig[]; nets: NetConfig[] } {
  if (parsed.hugePages === '2M' && parsed.memoryMiB !== undefined && parsed.memoryMiB % 2 !== 0)
    throw new ConfigError('memoryMiB', `must be a whole number of 2 MiB huge pages (got ${parsed.memoryMiB})`);
  if (parsed.smt && parsed.cpus !== undefined && parsed.cpus > 1 && parsed.cpus % 2 !== 0)
    throw new ConfigError('cpus', `must be 1 or even with SMT on (two threads per core; got ${parsed.cpus})`);
  if (parsed.initrd !== undefined && parsed.kernel === undefined)
    throw new ConfigError('initrd', 'needs a kernel (the default guest brings its own initramfs)');
  const disks = parsed.disks.map((d, i) => ({ ...d, id: d.id ?? `disk${i}` }));
  const nets = parsed.nets.map((n, i) => ({ ...n, id: n.id ?? `net${i}` }));
  const unique = (kind: 'disks' | 'nets', values: readonly (string | undefined)[], what: string) => {
    const seen = new Map<string, number>();
    values.forEach((value, i) => {
      if (value === undefined) return;
      const first = seen.get(value);
      if (first !== undefined)
        throw new ConfigError(
          `${kind}[${i}]`,
          `${what} ${value} is already used by '${(kind === 'disks' ? disks : nets)[first]!.id}'`,
        );
      seen.set(value, i);
    });
  };
  unique(
    'disks',
    disks.map((d) => d.id),
    'ID',
  );
  const roots = disks.map((d, i) => (d.root ? i : -1)).filter((i) => i >= 0);
  if (roots.length > 1)
    throw new ConfigError(
      `disks[${roots[1]}]`,
      `a VM has at most one root disk ('${disks[roots[0]!]!.id}' is one already)`,
    );
  unique(
    'nets',
    nets.map((n) => n.id),
    'ID',
  );
  unique(
    'nets',
    nets.map((n) => n.tap),
    'TAP',
  );
  unique(
    'nets',
    nets.map((n) => n.passt),
    'passt socket',
  );
  unique(
    'nets',
    nets.map((n) => n.mac?.toLowerCase()),
    'MAC address',
  );
  for (const id of parsed.mmds?.nets ?? [])
    if (!nets.some((n) => n.id === id))
      throw new ConfigError('mmds.nets', `names network interface '${id}', which this VM does not have`);
  return { ...parsed, disks, nets };
}

/** Checks a VM configuration from any front end; throws ConfigError naming the field and why. */
export function parseVmConfig(input: unknown): VmConfig {
  // valibot's object schemas take arrays; a configuration with every field optional must not.
  if (Array.isArray(input)) throw new ConfigError('', 'must be an object (got a list)');
  const r = v.safeParse(VmConfigSchema, input);
  if (!r.success) throw configError(r.issues);
  return finishDevices(r.output);
}

/** The disks in the order the guest sees them: the root disk first (/dev/vda), as Firecracker orders them. */
export function bootOrder(disks: readonly DiskConfig[]): DiskConfig[] {
  return [...disks].sort((a, b) => Number(b.root) - Number(a.root));
}
