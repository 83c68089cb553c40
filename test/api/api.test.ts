// The Firecracker-compatible API, request by request, over a real Unix socket. Every
// response is validated against Firecracker's own spec (test/fixtures/firecracker-api.yaml):
// the status code must be one the operation declares, and the body must match its schema.
// Every error path is a 400 with a fault_message, and leaves the definition unchanged.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { request, type Server } from 'node:http';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import { parse } from 'yaml';
import { parseConfigFile } from '../../src/api/resources.js';
import { listenApi, MAX_BODY_BYTES } from '../../src/api/server.js';
import { Vmm } from '../../src/api/vmm.js';
import * as libc from '../../src/kvm/libc.js';
import { privateNetns, tempDir } from '../helpers.js';
import { openTap } from '../../src/virtio/net.js';

interface Spec {
  paths: Record<string, Record<string, { responses: Record<string, { schema?: unknown }> }>>;
  definitions: Record<string, unknown>;
}
const spec = parse(
  readFileSync(fileURLToPath(new URL('../../../test/fixtures/firecracker-api.yaml', import.meta.url)), 'utf8'),
) as Spec;
const ajv = new Ajv({ strict: false, allErrors: true });
ajv.addSchema({ definitions: spec.definitions }, 'fc');

/** The spec's path template that matches `path` (e.g. /drives/{drive_id}). */
function specPath(path: string): string | undefined {
  return Object.keys(spec.paths).find((p) => new RegExp(`^${p.replace(/\{[^}]+\}/g, '[^/]+')}$`).test(path));
}

function validateResponse(method: string, path: string, status: number, body: unknown): void {
  // Kiln's own endpoints (/kiln/...) are not Firecracker's: their tests say what they answer.
  if (path.startsWith('/kiln/')) return;
  const template = specPath(path);
  if (!template) {
    assert.equal(status, 400, `${method} ${path}: not in the spec, so a 400`);
  } else {
    const op = spec.paths[template]![method.toLowerCase()];
    if (!op) return assert.equal(status, 400, `${method} ${path}: method not in the spec, so a 400`);
    const declared = op.responses[String(status)] ?? (status === 400 ? op.responses.default : undefined);
    assert.ok(
      declared,
      `${method} ${path}: status ${status} is not one the spec declares (${Object.keys(op.responses).join(', ')})`,
    );
    if (status === 204) return assert.equal(body, undefined, `${method} ${path}: 204 has no body`);
    const schema = declared.schema as { $ref?: string } | undefined;
    if (schema?.$ref) {
      const ok = ajv.validate({ $ref: `fc${schema.$ref}` }, body);
      assert.ok(
        ok,
        `${method} ${path} ${status}: body does not match ${schema.$ref}: ${ajv.errorsText()}\n${JSON.stringify(body)}`,
      );
    }
  }
  if (status === 400) {
    assert.equal(
      typeof (body as { fault_message?: unknown }).fault_message,
      'string',
      `${method} ${path}: 400 carries a fault_message`,
    );
  }
}

let socketPath = '';
let vmm: Vmm;
let server: Server;

function call(method: string, path: string, body?: unknown, raw?: string): Promise<{ status: number; body: unknown }> {
  const payload = raw ?? (body === undefined ? undefined : JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        method,
        path,
        headers:
          payload === undefined
            ? {}
            : { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => {
          const parsed: unknown = text === '' ? undefined : JSON.parse(text);
          try {
            validateResponse(method, path, res.statusCode!, parsed);
            resolve({ status: res.statusCode!, body: parsed });
          } catch (err) {
            reject(err);
          }
        });
      },
    );
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

const faultOf = (r: { body: unknown }) => (r.body as { fault_message: string }).fault_message;

describe('the Firecracker API', () => {
  const dir = tempDir();
  // PUT /network-interfaces opens its TAP: in a namespace of this test's own.
  const tapSkip = privateNetns();
  // What PUT /boot-source opens and checks: an ELF vmlinux's header is enough for it.
  const kernel = join(dir, 'vmlinux');
  writeFileSync(kernel, Buffer.concat([Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]), Buffer.alloc(1024)]));
  const initrd = join(dir, 'initrd.cpio');
  writeFileSync(initrd, Buffer.alloc(512));
  before(async () => {
    socketPath = join(dir, 'api.sock');
    vmm = new Vmm('test_vm', -1, () => undefined);
    server = await listenApi(socketPath, vmm);
  });
  after(() => new Promise<void>((resolve) => server.close(() => resolve())));

  test('GET /, /version and /vm/config before any configuration', async () => {
    const info = await call('GET', '/');
    assert.equal(info.status, 200);
    assert.deepEqual(info.body, {
      app_name: 'Firecracker',
      id: 'test_vm',
      state: 'Not started',
      vmm_version: (info.body as { vmm_version: string }).vmm_version,
    });
    // Kiln's own counters (the dashboard's throughput): all zero before the VM runs.
    const counters = await call('GET', '/kiln/counters');
    assert.deepEqual(counters.body, { block: { readBytes: 0, writeBytes: 0 }, net: { rxBytes: 0, txBytes: 0 } });
    const version = await call('GET', '/version');
    assert.match((version.body as { firecracker_version: string }).firecracker_version, /^\d+\.\d+\.\d+$/);
    const config = await call('GET', '/vm/config');
    assert.deepEqual((config.body as Record<string, unknown>)['machine-config'], {
      vcpu_count: 1,
      mem_size_mib: 128,
      smt: false,
      track_dirty_pages: false,
      huge_pages: 'None',
    });
  });

  test('every pre-boot resource is accepted with 204 and shows in GET /vm/config', { skip: tapSkip }, async () => {
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(4096));
    for (const [path, body] of [
      ['/boot-source', { kernel_image_path: kernel, boot_args: 'console=ttyS0', initrd_path: initrd }],
      ['/machine-config', { vcpu_count: 2, mem_size_mib: 256 }],
      ['/drives/rootfs', { drive_id: 'rootfs', path_on_host: disk, is_root_device: true, is_read_only: false }],
      [
        '/drives/data_1',
        {
          drive_id: 'data_1',
          path_on_host: disk,
          is_root_device: false,
          is_read_only: true,
          cache_type: 'Unsafe',
          io_engine: 'Sync',
        },
      ],
      [
        '/network-interfaces/eth0',
        { iface_id: 'eth0', host_dev_name: 'tap0', guest_mac: '06:00:AC:10:00:02', mtu: 9000 },
      ],
      ['/vsock', { guest_cid: 3, uds_path: join(dir, 'v.sock') }],
      ['/entropy', {}],
      ['/balloon', { amount_mib: 0, deflate_on_oom: false, stats_polling_interval_s: 1 }],
      ['/logger', { log_path: join(dir, 'log'), level: 'debug' }],
      ['/mmds/config', { network_interfaces: ['eth0'], version: 'V2', ipv4_address: '169.254.170.2' }],
      ['/mmds', { latest: { 'meta-data': { 'ami-id': 'ami-1' } } }],
      ['/metrics', { metrics_path: join(dir, 'metrics') }],
    ] as const) {
      const r = await call('PUT', path, body);
      assert.equal(r.status, 204, `PUT ${path}: ${JSON.stringify(r.body)}`);
    }
    assert.equal((await call('PATCH', '/machine-config', { mem_size_mib: 512 })).status, 204);
    assert.equal((await call('PATCH', '/drives/data_1', { drive_id: 'data_1', path_on_host: disk })).status, 204);
    assert.equal((await call('PATCH', '/balloon', { amount_mib: 16 })).status, 204);
    assert.equal((await call('PATCH', '/balloon/statistics', { stats_polling_interval_s: 5 })).status, 204);
    assert.equal((await call('PUT', '/serial', { serial_out_path: join(dir, 'serial.out') })).status, 204);
    // Rate limiters: on a drive, a NIC's two directions and the entropy device; PATCH changes them.
    const limiter = {
      bandwidth: { size: 10485760, one_time_burst: 1048576, refill_time: 1000 },
      ops: { size: 100, refill_time: 1000 },
    };
    assert.equal((await call('PATCH', '/drives/data_1', { drive_id: 'data_1', rate_limiter: limiter })).status, 204);
    assert.equal(
      (
        await call('PATCH', '/network-interfaces/eth0', {
          iface_id: 'eth0',
          rx_rate_limiter: limiter,
          tx_rate_limiter: { ops: { size: 5, refill_time: 100 } },
        })
      ).status,
      204,
    );
    assert.equal(
      (await call('PUT', '/entropy', { rate_limiter: { bandwidth: { size: 1000, refill_time: 100 } } })).status,
      204,
    );
    assert.equal((await call('PATCH', '/mmds', { latest: { 'meta-data': { 'ami-id': null, new: 'x' } } })).status, 204);
    assert.deepEqual(
      (await call('GET', '/mmds')).body,
      { latest: { 'meta-data': { new: 'x' } } },
      'PATCH merged (RFC 7396)',
    );
    const config = (await call('GET', '/vm/config')).body as Record<string, unknown>;
    assert.deepEqual(config['boot-source'], {
      kernel_image_path: kernel,
      boot_args: 'console=ttyS0',
      initrd_path: initrd,
    });
    assert.equal((config['machine-config'] as { mem_size_mib: number }).mem_size_mib, 512);
    assert.equal((config['machine-config'] as { vcpu_count: number }).vcpu_count, 2);
    assert.deepEqual(
      (config.drives as Array<{ drive_id: string }>).map((d) => d.drive_id),
      ['rootfs', 'data_1'],
    );
    assert.equal((config['network-interfaces'] as unknown[]).length, 1);
    assert.equal((config['network-interfaces'] as Array<{ mtu?: number }>)[0]!.mtu, 9000);
    assert.deepEqual(config.vsock, { guest_cid: 3, uds_path: join(dir, 'v.sock') });
    assert.equal((config.balloon as { amount_mib: number }).amount_mib, 16);
    assert.deepEqual((config.drives as Array<{ rate_limiter?: unknown }>)[1]!.rate_limiter, limiter);
    const nic = (config['network-interfaces'] as Array<Record<string, unknown>>)[0]!;
    assert.deepEqual(nic.rx_rate_limiter, limiter);
    assert.deepEqual(nic.tx_rate_limiter, { ops: { size: 5, refill_time: 100 } });
    assert.deepEqual(config.entropy, { rate_limiter: { bandwidth: { size: 1000, refill_time: 100 } } });
    assert.deepEqual(config['mmds-config'], {
      version: 'V2',
      network_interfaces: ['eth0'],
      ipv4_address: '169.254.170.2',
      imds_compat: false,
    });
    assert.equal((config.logger as { level: string }).level, 'Debug', 'levels are case-insensitive');
    assert.equal((await call('GET', '/machine-config')).status, 200);
    assert.equal((await call('GET', '/balloon')).status, 200);
  });

  test("machine-config's vCPU counts as Firecracker's: any count without SMT, 1 or even with it", async () => {
    const machine = async () => (await call('GET', '/machine-config')).body as { vcpu_count: number; smt: boolean };
    const was = await machine();
    assert.equal((await call('PATCH', '/machine-config', { vcpu_count: 3 })).status, 204, 'an odd count without SMT');
    assert.equal((await call('PATCH', '/machine-config', { smt: true })).status, 400, 'SMT on 3 vCPUs');
    assert.equal((await call('PATCH', '/machine-config', { vcpu_count: 4, smt: true })).status, 204);
    assert.deepEqual([(await machine()).vcpu_count, (await machine()).smt], [4, true]);
    assert.equal((await call('PATCH', '/machine-config', { vcpu_count: 1 })).status, 204, 'one vCPU with SMT on');
    assert.equal((await call('PATCH', '/machine-config', { vcpu_count: was.vcpu_count, smt: false })).status, 204);
  });

  test("machine-config's shared_memory (Kiln's own, for live upgrades): shown only when on, and reset by a PUT", async () => {
    const machine = async () => (await call('GET', '/machine-config')).body as Record<string, unknown>;
    const was = await machine();
    assert.equal((await call('PATCH', '/machine-config', { shared_memory: true })).status, 204);
    assert.equal((await machine()).shared_memory, true);
    const bad = await call('PATCH', '/machine-config', { shared_memory: 'yes' });
    assert.equal(bad.status, 400);
    assert.equal((await machine()).shared_memory, true, 'a bad value changes nothing');
    const { vcpu_count, mem_size_mib } = was as { vcpu_count: number; mem_size_mib: number };
    assert.equal((await call('PUT', '/machine-config', { vcpu_count, mem_size_mib })).status, 204);
    assert.equal(
      'shared_memory' in (await machine()),
      false,
      "a PUT without it turns it off, as Firecracker's PUT resets what it omits",
    );
  });

  test('bad requests are 400 with a fault message, and change nothing', { skip: tapSkip }, async () => {
    const disk0 = join(dir, 'disk.img');
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    // An image another program holds (Kiln's own lock, taken through another open file).
    const lockedImage = join(dir, 'locked.img');
    writeFileSync(lockedImage, Buffer.alloc(4096));
    const lockFd = openSync(lockedImage, 'r+');
    assert.equal(libc.ofdLockWholeFile(lockFd, libc.F_WRLCK), 0);
    after(() => closeSync(lockFd));
    const before = JSON.stringify((await call('GET', '/vm/config')).body);
    const cases: Array<[string, string, unknown, RegExp, string?]> = [
      ['PUT', '/machine-config', undefined, /not valid JSON/, '{"vcpu_count": 2,'],
      ['PUT', '/machine-config', { vcpu_count: 'two', mem_size_mib: 128 }, /`vcpu_count` must be an integer/],
      ['PUT', '/machine-config', { vcpu_count: 2, mem_size_mib: 128, turbo: true }, /unknown field `turbo`/],
      [
        'PUT',
        '/machine-config',
        { vcpu_count: 0, mem_size_mib: 128 },
        /^cpus: must be a whole number from 1 to 254 \(got 0\)$/,
      ],
      [
        'PUT',
        '/machine-config',
        { vcpu_count: 300, mem_size_mib: 128 },
        /^cpus: must be a whole number from 1 to 254 \(got 300\)$/,
      ],
      ['PUT', '/machine-config', { mem_size_mib: 128 }, /missing field `vcpu_count`/],
      ['PUT', '/machine-config', [1, 2], /must be a JSON object/],
      ['PUT', '/boot-source', {}, /missing field `kernel_image_path`/],
      ['PUT', '/drives/bad-id', { drive_id: 'bad-id', path_on_host: '/x', is_root_device: false }, /Invalid drive ID/],
      [
        'PUT',
        '/drives/a',
        { drive_id: 'b', path_on_host: '/x', is_root_device: false },
        /does not match the id from the body/,
      ],
      [
        'PUT',
        '/drives/other_root',
        { drive_id: 'other_root', path_on_host: '/x', is_root_device: true },
        /^disks\[2\]: a VM has at most one root disk \('rootfs' is one already\)$/,
      ],
      [
        'PUT',
        '/drives/rl',
        {
          drive_id: 'rl',
          path_on_host: '/x',
          is_root_device: false,
          rate_limiter: { bandwidth: { size: -1, refill_time: 1 } },
        },
        /^drives: rate limiter bandwidth: `size` must not be negative$/,
      ],
      ['PATCH', '/drives/nope', { drive_id: 'nope', path_on_host: '/x' }, /Invalid block device ID/],
      [
        'PUT',
        '/network-interfaces/eth1',
        { iface_id: 'eth1', host_dev_name: 'tap0' },
        /^nets\[1\]: TAP tap0 is already used by 'eth0'$/,
      ],
      [
        'PUT',
        '/network-interfaces/eth1',
        { iface_id: 'eth1', host_dev_name: 'tap1', guest_mac: 'nope' },
        /not a MAC address/,
      ],
      [
        'PUT',
        '/vsock',
        { guest_cid: 2, uds_path: '/x' },
        /^vsock\.guestCid: must be a whole number from 3 to 4294967295 \(got 2\)$/,
      ],
      ['PUT', '/vsock', { guest_cid: 3, uds_path: '/no/such/dir/v.sock' }, /its directory does not exist/],
      ['PUT', '/vsock', { guest_cid: 3, uds_path: dir }, /something is already there/],
      ['PUT', '/vsock', { guest_cid: 3, uds_path: join(dir, 'x'.repeat(120)) }, /longer than a Unix socket path/],
      ['PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128, constructor: 1 }, /unknown field `constructor`/],
      [
        'PUT',
        '/drives/data_1',
        { drive_id: 'data_1', path_on_host: '/x', is_root_device: false, toString: 1 },
        /unknown field `toString`/,
      ],
      [
        'PUT',
        '/network-interfaces/eth0',
        { iface_id: 'eth0', host_dev_name: 'tap0', mtu: 67 },
        /`mtu` must be from 68 to 65535 \(got 67\)/,
      ],
      ['PATCH', '/balloon/hinting/start', {}, /Attempting to use hinting when not enabled/],
      ['PATCH', '/balloon/hinting/stop', {}, /Attempting to use hinting when not enabled/],
      ['PATCH', '/balloon/hinting/start', { acknowledge_on_stop: 'yes' }, /acknowledge_on_stop/],
      ['PUT', '/logger', { level: 'loud' }, /`level` must be one of/],
      ['PUT', '/actions', { action_type: 'Reboot' }, /must be one of FlushMetrics, InstanceStart, SendCtrlAltDel/],
      ['PATCH', '/vm', { state: 'Paused' }, /not supported before starting/],
      ['PUT', '/snapshot/create', { snapshot_path: '/s', mem_file_path: '/m' }, /not supported before starting/],
      ['PUT', '/snapshot/create', { snapshot_path: '/s' }, /missing field `mem_file_path`/],
      [
        'PUT',
        '/snapshot/create',
        { snapshot_path: '/s', mem_file_path: '/m', snapshot_type: 'Half' },
        /must be one of Full, Diff/,
      ],
      ['PUT', '/snapshot/load', { snapshot_path: '/s' }, /missing field `mem_backend`/],
      [
        'PUT',
        '/snapshot/load',
        { snapshot_path: '/s', mem_file_path: '/m', mem_backend: { backend_type: 'File', backend_path: '/m' } },
        /not both/,
      ],
      [
        'PUT',
        '/snapshot/load',
        { snapshot_path: '/s', mem_backend: { backend_type: 'Disk' } },
        /must be one of File, Uffd/,
      ],
      [
        'PUT',
        '/entropy',
        { rate_limiter: { ops: { size: 1 } } },
        /entropy: rate limiter ops: missing field `refill_time`/,
      ],
      [
        'PATCH',
        '/network-interfaces/eth0',
        { iface_id: 'eth0', rx_rate_limiter: { bandwidth: { size: 1, refill_time: 1, burst: 2 } } },
        /unknown field `burst`/,
      ],
      ['PATCH', '/network-interfaces/nope', { iface_id: 'nope' }, /Invalid network interface ID: nope/],
      [
        'PUT',
        '/mmds/config',
        { network_interfaces: ['eth9'] },
        /names network interface 'eth9', which this VM does not have/,
      ],
      [
        'PUT',
        '/mmds/config',
        { network_interfaces: ['eth0'], ipv4_address: '10.0.0.1' },
        /must be a link-local IPv4 address/,
      ],
      ['PUT', '/mmds/config', { network_interfaces: [] }, /must name at least one network interface/],
      ['PUT', '/cpu-config', { msr_modifiers: [{}] }, /msr_modifiers\[0\]: missing field `addr`/],
      ['PUT', '/serial', { serial_out_path: dir }, /^Cannot open the serial output file .*: EISDIR$/],
      [
        'PUT',
        '/serial',
        { serial_out_path: join(dir, 's.out'), rate_limiter: { size: 1, refill_time: 1 } },
        /not supported by Kiln yet/,
      ],
      ['PATCH', '/balloon/statistics', { stats_polling_interval_s: 'often' }, /must be an integer/],
      ['GET', '/nothing-here', undefined, /Invalid request method and\/or path/],
      ['DELETE', '/drives/rootfs', undefined, /Invalid request method and\/or path/],
      ['PUT', '/boot-source', undefined, /body is empty/, ''],
      // Firecracker's timing: files are opened and checked when they are PUT.
      ['PUT', '/boot-source', { kernel_image_path: join(dir, 'none') }, /^Cannot open the kernel file .*: ENOENT$/],
      [
        'PUT',
        '/boot-source',
        { kernel_image_path: disk0 },
        /is not a Linux kernel: neither an ELF vmlinux nor a bzImage/,
      ],
      ['PUT', '/boot-source', { kernel_image_path: dir }, /is a directory; it must be a regular file/],
      ['PUT', '/boot-source', { kernel_image_path: fifo }, /is a FIFO; it must be a regular file/],
      [
        'PUT',
        '/boot-source',
        { kernel_image_path: kernel, initrd_path: join(dir, 'none') },
        /^Cannot open the initrd file .*: ENOENT$/,
      ],
      [
        'PUT',
        '/drives/extra',
        { drive_id: 'extra', path_on_host: join(dir, 'none'), is_root_device: false },
        /^Unable to use the drive extra: disk '.*none' does not exist$/,
      ],
      [
        'PUT',
        '/drives/extra',
        { drive_id: 'extra', path_on_host: fifo, is_root_device: false },
        /^Unable to use the drive extra: disk .* is a FIFO/,
      ],
      [
        'PUT',
        '/machine-config',
        { vcpu_count: 3, mem_size_mib: 128, smt: true },
        /^cpus: must be 1 or even with SMT on/,
      ],
      [
        'PUT',
        '/drives/extra',
        { drive_id: 'extra', path_on_host: lockedImage, is_root_device: false },
        /^Unable to use the drive extra: disk .* is in use: a read-write lock on it is held/,
      ],
    ];
    for (const [method, path, body, pattern, raw] of cases) {
      const r = await call(method, path, body, raw);
      assert.equal(r.status, 400, `${method} ${path} ${JSON.stringify(body)}`);
      assert.match(faultOf(r), pattern, `${method} ${path}`);
    }
    const big = JSON.stringify({ kernel_image_path: 'x'.repeat(MAX_BODY_BYTES) });
    const tooBig = await call('PUT', '/boot-source', undefined, big);
    assert.equal(tooBig.status, 400);
    assert.match(faultOf(tooBig), /larger than the limit of 51200 bytes/);
    // kiln-vmm --http-api-max-payload-size: the limit is the VMM's.
    vmm.maxPayloadBytes = 64;
    const overSmall = await call('PUT', '/machine-config', {
      vcpu_count: 1,
      mem_size_mib: 128,
      smt: false,
      x: 'y'.repeat(40),
    });
    assert.match(faultOf(overSmall), /larger than the limit of 64 bytes/);
    vmm.maxPayloadBytes = MAX_BODY_BYTES;
    assert.equal(
      JSON.stringify((await call('GET', '/vm/config')).body),
      before,
      'no failed request changed the definition',
    );
  });

  test(
    'PUT /network-interfaces opens the TAP then, as Firecracker does: one the host refuses is a 400 and changes nothing',
    { skip: tapSkip },
    async () => {
      const before = JSON.stringify(vmm.config);
      // A TAP another process holds (single-queue: one opener at a time).
      const held = openTap('kiln-busy0');
      try {
        const busy = await call('PUT', '/network-interfaces/eth7', { iface_id: 'eth7', host_dev_name: 'kiln-busy0' });
        assert.equal(busy.status, 400);
        assert.match(
          faultOf(busy),
          /^Could not create the network device: Open tap device failed: cannot attach to TAP 'kiln-busy0': EBUSY/,
        );
      } finally {
        closeSync(held);
      }
      // An interface that is not a TAP.
      const notTap = await call('PUT', '/network-interfaces/eth7', { iface_id: 'eth7', host_dev_name: 'lo' });
      assert.equal(notTap.status, 400);
      assert.match(faultOf(notTap), /Open tap device failed: cannot attach to TAP 'lo'/);
      assert.equal(JSON.stringify(vmm.config), before, 'nothing changed');
      // A free name: accepted; the TAP made to check it does not outlive the check.
      const ok = await call('PUT', '/network-interfaces/eth7', { iface_id: 'eth7', host_dev_name: 'kiln-free0' });
      assert.equal(ok.status, 204);
      assert.equal(spawnSync('ip', ['link', 'show', 'kiln-free0']).status !== 0, true, 'no TAP left behind');
    },
  );

  test("PUT /cpu-config takes a custom CPU template's cpuid_modifiers and msr_modifiers; bad bitmaps are 400", async () => {
    const before = JSON.stringify(vmm.config);
    const bad = async (body: unknown, fault: RegExp) => {
      const r = await call('PUT', '/cpu-config', body);
      assert.equal(r.status, 400);
      assert.match(faultOf(r), fault);
      assert.equal(JSON.stringify(vmm.config), before, 'nothing changed');
    };
    await bad(
      { cpuid_modifiers: [{ leaf: '0x1', modifiers: [{ register: 'ecx', bitmap: '0b101' }] }] },
      /bitmap must be '0b' and 32 of 0, 1 or x/,
    );
    await bad({ cpuid_modifiers: [{ leaf: 'one', modifiers: [] }] }, /leaf must be a number/);
    await bad(
      { cpuid_modifiers: [{ leaf: 1, modifiers: [{ register: 'esp', bitmap: `0b${'x'.repeat(32)}` }] }] },
      /register/,
    );
    await bad(
      { msr_modifiers: [{ addr: '0x10a', bitmap: `0b${'0'.repeat(32)}` }] },
      /bitmap must be '0b' and 64 of 0, 1 or x/,
    );
    await bad({ msr_modifiers: [{ addr: 'msr', bitmap: `0b${'0'.repeat(64)}` }] }, /addr must be a number/);
    await bad({ kvm_capabilities: ['!121'] }, /kvm_capabilities are not supported by Kiln/);
    await bad({ reg_modifiers: [{ addr: '0x1', bitmap: '0b1' }] }, /reg_modifiers are for aarch64 hosts/);
    await bad({ cpuid_templates: [] }, /unknown field `cpuid_templates`/);
    const ok = await call('PUT', '/cpu-config', {
      kvm_capabilities: [],
      cpuid_modifiers: [
        {
          leaf: '0x1',
          subleaf: '0x0',
          flags: 0,
          // ECX bit 31 on, bit 23 off; the rest kept (x), written with Firecracker's underscores.
          modifiers: [{ register: 'ecx', bitmap: '0b1xxx_xxxx_0xxx_xxxx_xxxx_xxxx_xxxx_xxxx' }],
        },
        { leaf: 7, subleaf: 1, flags: 1, modifiers: [{ register: 'eax', bitmap: `0b${'0'.repeat(32)}` }] },
      ],
      // IA32_ARCH_CAPABILITIES: bits 63..62 set, bit 0 clear, the rest as KVM has them.
      msr_modifiers: [{ addr: '0x10a', bitmap: `0b11${'x'.repeat(61)}0` }],
    });
    assert.equal(ok.status, 204, JSON.stringify(ok.body));
    assert.deepEqual(vmm.config.cpuidModifiers, [
      { leaf: 1, subleaf: 0, flags: 0, register: 'ecx', mask: 0x8080_0000, value: 0x8000_0000 },
      { leaf: 7, subleaf: 1, flags: 1, register: 'eax', mask: 0xffff_ffff, value: 0 },
    ]);
    assert.deepEqual(vmm.config.msrModifiers, [
      { index: 0x10a, mask: '0xc000000000000001', value: '0xc000000000000000' },
    ]);
    // GET /vm/config gives the template back in the same shape, which PUT takes again unchanged.
    const shown = ((await call('GET', '/vm/config')).body as Record<string, unknown>)['cpu-config'];
    assert.deepEqual((shown as { msr_modifiers: unknown }).msr_modifiers, [
      { addr: '0x10a', bitmap: `0b11${'x'.repeat(61)}0` },
    ]);
    const set = JSON.stringify(vmm.config);
    assert.equal((await call('PUT', '/cpu-config', shown)).status, 204);
    assert.equal(JSON.stringify(vmm.config), set, 'the round trip changes nothing');
  });

  test("machine-config's cpu_template takes Firecracker's static templates, in one slot with PUT /cpu-config's", async () => {
    const now = (await call('GET', '/machine-config')).body as Record<string, unknown>;
    const shown = async () => ((await call('GET', '/machine-config')).body as Record<string, unknown>).cpu_template;
    const machine = (cpuTemplate?: string) =>
      call('PUT', '/machine-config', {
        ...now,
        ...(cpuTemplate !== undefined ? { cpu_template: cpuTemplate } : {}),
      });
    assert.equal((await machine('T2S')).status, 204);
    assert.equal(vmm.config.staticCpuTemplate, 'T2S');
    assert.equal(vmm.config.cpuidModifiers, undefined, 'a static template replaces a custom one');
    assert.equal(await shown(), 'T2S');
    // No cpu_template keeps it; an aarch64 template is refused and changes nothing.
    assert.equal((await machine()).status, 204);
    assert.equal(vmm.config.staticCpuTemplate, 'T2S');
    const arm = await machine('V1N1');
    assert.equal(arm.status, 400);
    assert.match(faultOf(arm), /V1N1 is for aarch64 hosts/);
    assert.equal(vmm.config.staticCpuTemplate, 'T2S');
    // A custom template replaces the static one.
    const custom = await call('PUT', '/cpu-config', {
      cpuid_modifiers: [{ leaf: 1, modifiers: [{ register: 'ecx', bitmap: `0b0${'x'.repeat(31)}` }] }],
    });
    assert.equal(custom.status, 204);
    assert.equal(vmm.config.staticCpuTemplate, undefined);
    assert.equal(await shown(), undefined);
    assert.equal(vmm.config.cpuidModifiers!.length, 1);
    // None clears both.
    assert.equal((await machine('None')).status, 204);
    assert.equal(vmm.config.cpuidModifiers, undefined);
    assert.equal(vmm.config.staticCpuTemplate, undefined);
  });

  test('free_page_hinting is configured on the balloon; its run endpoints need a started VM, and take no body', async () => {
    const was = (await call('GET', '/balloon')).body as Record<string, unknown>;
    const put = await call('PUT', '/balloon', { amount_mib: 1, deflate_on_oom: true, free_page_hinting: true });
    assert.equal(put.status, 204);
    assert.equal(((await call('GET', '/balloon')).body as Record<string, unknown>).free_page_hinting, true);
    assert.equal(vmm.config.balloon?.freePageHinting, true);
    for (const [method, path] of [
      ['PATCH', '/balloon/hinting/start'],
      ['GET', '/balloon/hinting/status'],
      ['PATCH', '/balloon/hinting/stop'],
    ] as const) {
      const r = await call(method, path);
      assert.equal(r.status, 400, `${method} ${path}`);
      assert.match(faultOf(r), /not supported before starting the microVM/, `${method} ${path}`);
    }
    assert.equal((await call('PUT', '/balloon', was)).status, 204);
  });

  test("a config file's cpu-config is a custom template inline or the path of its JSON", () => {
    const dir = tempDir();
    const file = join(dir, 'template.json');
    const template = { msr_modifiers: [{ addr: '0x10a', bitmap: `0b${'x'.repeat(63)}1` }] };
    writeFileSync(file, JSON.stringify(template));
    for (const cpuConfig of [template, file]) {
      const input: Record<string, unknown> = {};
      for (const change of parseConfigFile({ 'cpu-config': cpuConfig }).changes) change(input);
      assert.deepEqual(input.msrModifiers, [{ index: 0x10a, mask: '0x1', value: '0x1' }]);
    }
    assert.throws(() => parseConfigFile({ 'cpu-config': join(dir, 'missing.json') }), /cannot read the CPU template/);
    assert.throws(() => parseConfigFile({ 'cpu-config': dir }), /cannot read the CPU template .*not a regular file/);
    writeFileSync(file, '{');
    assert.throws(() => parseConfigFile({ 'cpu-config': file }), /is not JSON/);
  });

  test('HTTP-level errors (unknown method, malformed request line, oversized headers) are 400 with a fault message too', async () => {
    const raw = (text: string) =>
      new Promise<string>((resolve, reject) => {
        const s = createConnection(socketPath);
        let got = '';
        s.setEncoding('utf8');
        s.on('data', (c: string) => (got += c));
        s.on('end', () => resolve(got));
        s.on('error', reject);
        s.write(text);
      });
    const cases: Array<[string, RegExp]> = [
      ['BREW / HTTP/1.1\r\nHost: x\r\n\r\n', /unknown method/],
      ['GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n', /malformed request/],
      [`GET / HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, /headers larger than 8192 bytes/],
    ];
    for (const [request, reason] of cases) {
      const answer = await raw(request);
      assert.match(answer, /^HTTP\/1\.1 400 Bad Request\r\n/);
      const body = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as { fault_message: string };
      assert.match(body.fault_message, reason);
    }
    // The server still answers.
    assert.equal((await call('GET', '/')).status, 200);
  });

  test('InstanceStart without a usable kernel is a 400 and the instance stays "Not started"', async () => {
    const r = await call('PUT', '/actions', { action_type: 'InstanceStart' });
    assert.equal(r.status, 400);
    assert.match(faultOf(r), /Cannot start microvm/);
    assert.equal(((await call('GET', '/')).body as { state: string }).state, 'Not started');
  });

  test("FlushMetrics writes a JSON line in Firecracker's shape; counters are what happened since the last flush", async () => {
    assert.equal((await call('PUT', '/actions', { action_type: 'FlushMetrics' })).status, 204);
    type Line = {
      vmm: { state: string };
      put_api_requests?: Record<string, number>;
      get_api_requests?: Record<string, number>;
      patch_api_requests?: Record<string, number>;
      api_server: Record<string, number>;
      block: Record<string, number>;
      net: Record<string, number>;
      latencies_us: Record<string, number>;
    };
    const last = () => JSON.parse(readFileSync(join(dir, 'metrics'), 'utf8').trim().split('\n').at(-1)!) as Line;
    const first = last();
    assert.equal(first.vmm.state, 'Not started');
    assert.ok(first.put_api_requests!.drive_count! >= 2, 'the drives PUT so far');
    assert.ok(first.put_api_requests!.drive_fails! >= 1, 'and the refused ones');
    assert.ok(first.patch_api_requests!.drive_count! >= 1);
    assert.ok(first.get_api_requests!.instance_info_count! >= 1);
    assert.equal(typeof first.api_server.process_startup_time_us, 'number');
    assert.equal(first.block.rate_limiter_throttled_events, 0);
    assert.equal(first.net.tx_rate_limiter_throttled, 0);
    assert.equal((await call('GET', '/machine-config')).status, 200);
    assert.equal((await call('PUT', '/actions', { action_type: 'FlushMetrics' })).status, 204);
    const second = last();
    assert.deepEqual(second.put_api_requests, { actions_count: 1 }, 'only the first flush since then');
    assert.deepEqual(second.get_api_requests, { machine_cfg_count: 1 });
  });

  test('a log or metrics path that is a device, a directory or a /proc file is refused; /dev/null is taken', async () => {
    for (const [path, reason] of [
      ['/proc/self/mem', /on procfs/],
      ['/dev/zero', /is a character device; it must be a regular file or a FIFO/],
      [dir, /EISDIR/],
    ] as const) {
      const r = await call('PUT', '/logger', { log_path: path });
      assert.equal(r.status, 400, path);
      assert.match(faultOf(r), reason);
    }
    assert.equal((await call('PUT', '/metrics', { metrics_path: '/dev/null' })).status, 204);
  });

  test('a FIFO as the metrics or log path never blocks the VMM: no reader, a full pipe, then a reader', async () => {
    const fifo = join(dir, 'metrics.fifo');
    execFileSync('mkfifo', [fifo]);
    assert.equal((await call('PUT', '/metrics', { metrics_path: fifo })).status, 204, 'opened at once, with no reader');
    // No reader: enough flushes to fill the pipe (64 KiB) and then drop, without stalling the API.
    for (let i = 0; i < 1500; i++)
      assert.equal((await call('PUT', '/actions', { action_type: 'FlushMetrics' })).status, 204);
    assert.ok(vmm.dropped > 0, 'a full FIFO drops lines rather than blocking');
    assert.equal((await call('GET', '/')).status, 200, 'the API still answers');
    // A reader gets the lines that fitted.
    const head = execFileSync('head', ['-c', '200', fifo], { encoding: 'utf8' });
    assert.match(head, /"utc_timestamp_ms":\d+/);
    const missing = await call('PUT', '/logger', { log_path: join(dir, 'no', 'such', 'dir', 'log') });
    assert.equal(missing.status, 400);
    assert.match(faultOf(missing), /Cannot open the log file .*: ENOENT/);
  });
});
