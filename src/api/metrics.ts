// The metrics file in Firecracker's shape: one JSON object per flush (FlushMetrics, and
// every 60 s while a metrics path is configured), its groups named as Firecracker names
// them. Counters are what happened since the previous flush (Firecracker's SharedIncMetric),
// latencies and start-up times the last value measured (its SharedStoreMetric).

/** The resource names Firecracker's api_server metrics use, by request path's first segment. */
const RESOURCE: Readonly<Record<string, string>> = {
  '': 'instance_info',
  actions: 'actions',
  'boot-source': 'boot_source',
  drives: 'drive',
  logger: 'logger',
  'machine-config': 'machine_cfg',
  'cpu-config': 'cpu_cfg',
  metrics: 'metrics',
  'network-interfaces': 'network',
  mmds: 'mmds',
  vsock: 'vsock',
  balloon: 'balloon',
  entropy: 'entropy',
  serial: 'serial',
  snapshot: 'snapshot',
  vm: 'vm',
  version: 'vmm_version',
};

const GROUPS: Readonly<Record<string, string>> = {
  GET: 'get_api_requests',
  PUT: 'put_api_requests',
  PATCH: 'patch_api_requests',
};

/** Counters that reset at every flush, by group then name. */
export class MetricCounters {
  private counts = new Map<string, Map<string, number>>();

  add(group: string, name: string, n = 1): void {
    let g = this.counts.get(group);
    if (!g) this.counts.set(group, (g = new Map()));
    g.set(name, (g.get(name) ?? 0) + n);
  }

  /** An API request: `{resource}_count`, and `{resource}_fails` when it failed. */
  request(method: string, path: string, ok: boolean): void {
    const group = GROUPS[method];
    if (!group) return;
    const resource = RESOURCE[path.split('/')[1]?.split('?')[0] ?? ''] ?? 'other';
    this.add(group, `${resource}_count`);
    if (!ok) this.add(group, `${resource}_fails`);
  }

  /** The counts since the last call, as groups of name → value; the counters start again at 0. */
  take(): Record<string, Record<string, number>> {
    const out: Record<string, Record<string, number>> = {};
    for (const [group, names] of this.counts) out[group] = Object.fromEntries(names);
    this.counts = new Map();
    return out;
  }
}

/**
 * Totals that only grow (devices' counters), reported as the change since the last
 * flush: `delta(key, total)`.
 */
export class Deltas {
  private readonly last = new Map<string, number>();

  delta(key: string, total: number): number {
    const d = total - (this.last.get(key) ?? 0);
    this.last.set(key, total);
    return d;
  }
}
