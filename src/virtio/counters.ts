// A device's counters for the metrics file: a few numbers in shared memory that only the
// I/O thread writes (one Float64 each: bytes outgrow an Int32, and a 64-bit aligned store
// is whole on x86-64) and the API thread reads when it flushes the metrics.

/** virtio-blk's counters (Firecracker's block metrics' names). */
export const BLK_COUNTERS = ['read_count', 'write_count', 'read_bytes', 'write_bytes', 'flush_count'] as const;
/** virtio-net's counters (Firecracker's net metrics' names), and MMDS's on that NIC. */
export const NET_COUNTERS = [
  'rx_packets_count',
  'rx_bytes_count',
  'tx_packets_count',
  'tx_bytes_count',
  'mmds_rx_accepted',
  'mmds_tx_frames',
] as const;

/** virtio-vsock's counters (Firecracker's vsock metrics' names; rx is toward the guest). */
export const VSOCK_COUNTERS = [
  'rx_packets_count',
  'rx_bytes_count',
  'tx_packets_count',
  'tx_bytes_count',
  'conns_added',
  'conns_removed',
  'conns_killed',
] as const;

/** virtio-balloon's counters (Firecracker's balloon metrics' names): buffers the driver sent on each queue. */
export const BALLOON_COUNTERS = [
  'inflate_count',
  'deflate_count',
  'stats_updates_count',
  'free_page_report_count',
  'free_page_hint_count',
  'free_page_hint_freed',
] as const;

export class DeviceCounters<N extends string> {
  readonly shared: SharedArrayBuffer;
  private readonly values: Float64Array;

  constructor(
    private readonly names: readonly N[],
    shared?: SharedArrayBuffer,
  ) {
    this.shared = shared ?? new SharedArrayBuffer(8 * names.length);
    this.values = new Float64Array(this.shared, 0, names.length);
  }

  add(name: N, n = 1): void {
    const at = this.names.indexOf(name);
    this.values[at] = this.values[at]! + n;
  }

  /** Every counter by name. */
  read(): Record<N, number> {
    return Object.fromEntries(this.names.map((n, i) => [n, this.values[i]!])) as Record<N, number>;
  }
}
