// The `kiln` VM-manager verbs (virsh/multipass/limactl style): create, start, stop,
// pause, resume, restart, console, ls, info, logs, rm, daemon. Each talks to the daemon
// (started on demand); --json on every verb that prints. Their options are declared
// per verb in src/cli.ts; this module is loaded only when one of them runs.
import { readFileSync, statSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { parseNetFlag } from '../config/flags.js';
import { ConfigError } from '../config/vm-config.js';
import { relayStdin } from '../console-relay.js';
import { KilnError } from '../errors.js';
import { EXIT_ERROR } from '../exit-status.js';
import { buildInitramfs, buildMinimalKernel } from '../guestkit/build.js';
import { daemonCall, runDaemon } from './daemon.js';
import { parseDefinition } from './definition.js';
import { JAIL_VSOCK } from './jail.js';
import type { SnapshotMeta } from './snapshots.js';
import type {
  DashboardReply,
  InfoReply,
  ListReply,
  LogsReply,
  PoolReply,
  RemovedReply,
  StartReply,
  UpgradeReply,
  VmStatus,
} from './protocol.js';
import { Store } from './store.js';
import { uptimeText } from '../duration.js';
import { definitionInput, type CreateOptions } from './create-input.js';
import { parsePeer, readToken } from './peer.js';
import { createSecureContext } from 'node:tls';

const progress = (line: string) => process.stderr.write(`kiln: ${line}\n`);

function print(json: boolean | undefined, human: string, doc: unknown): void {
  process.stdout.write(json ? `${JSON.stringify(doc, null, 2)}\n` : `${human}\n`);
}

const path = (name: string) => `/vms/${encodeURIComponent(name)}`;

function table(rows: readonly VmStatus[]): string {
  const head = ['NAME', 'STATE', 'VCPUS', 'MEMORY', 'PID'];
  const data = rows.map((r) => [
    r.name,
    r.state,
    String(r.cpus),
    `${r.memoryMiB}M`,
    r.pid === null ? '-' : String(r.pid),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...data.map((d) => d[i]!.length)));
  return [head, ...data]
    .map((row) =>
      row
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

export async function create(name: string | undefined, o: CreateOptions): Promise<number> {
  const input = definitionInput(name, o);
  parseDefinition(input); // a bad definition is refused here, with the same words the daemon would use
  const s = await daemonCall<VmStatus>(new Store(), 'POST', '/vms', input);
  print(o.json, `created '${s.name}' (${s.cpus} vCPU, ${s.memoryMiB} MiB)`, s);
  return 0;
}

export async function list(o: { json?: boolean }): Promise<number> {
  const { vms, broken } = await daemonCall<ListReply>(new Store(), 'GET', '/vms');
  print(o.json, vms.length ? table(vms) : 'no VMs', { vms, broken });
  for (const b of broken)
    progress(`the definition of '${b.name}' (${b.file}) is broken: ${b.error}; it is left as it is`);
  return 0;
}

/** `kiln info`'s readable summary. */
export function infoText(i: InfoReply): string {
  const d = i.definition;
  const lines: Array<[string, string]> = [
    ['Name', i.name],
    ['State', i.state],
    ['PID', i.pid === null ? '-' : String(i.pid)],
    ['Uptime', uptimeText(i.startedAt)],
    ['vCPUs', `${d.cpus}${d.pinCpus.length ? ` (pinned to host CPUs ${d.pinCpus.join(',')})` : ''}`],
    ['Memory', `${d.memoryMiB} MiB`],
    ['Kernel', d.kernel ?? "the guest kit's minimal Linux (with a shell on the serial console)"],
    ...d.disks.map((x): [string, string] => [
      'Disk',
      `${x.id}: ${x.path}${x.readOnly ? ' (read-only)' : ''}${x.root ? ' (root)' : ''}`,
    ]),
    ...d.nets.map((x): [string, string] => [
      'NIC',
      `${x.id}: ${x.tap !== undefined ? `tap ${x.tap}` : `passt ${x.passt}`}${x.mac ? ` mac ${x.mac}` : ''}`,
    ]),
    ...(d.vsock
      ? [
          [
            'vsock',
            `CID ${d.vsock.guestCid}, socket ${d.vsock.uds}${
              i.jail?.jailed && i.jail.root
                ? ` (in the jail; guest-initiated connections reach listeners at ${i.jail.root}${JAIL_VSOCK}_PORT)`
                : ''
            }`,
          ] as [string, string],
        ]
      : []),
    ...(d.consoleSocket !== undefined ? [['Console', `virtio console on ${d.consoleSocket}`] as [string, string]] : []),
    ['Cgroup', i.cgroup.dirs.length ? i.cgroup.dirs.join(', ') : 'none (no cgroup hierarchy)'],
    [
      'Limits',
      `CPU weight ${i.cgroup.cpuWeight}, CPU quota ${i.cgroup.cpuQuotaPercent ? `${i.cgroup.cpuQuotaPercent}%` : 'none'}, memory ${Math.round(i.cgroup.memoryLimitBytes / (1024 * 1024))} MiB`,
    ],
    [
      'Jail',
      i.jail === null
        ? '-'
        : i.jail.jailed
          ? `uid ${i.jail.uid}, chroot ${i.jail.root}, seccomp, no new privileges`
          : "NONE: started with --no-jail, the VMM runs as root in the host's namespaces (debugging only)",
    ],
    ['Console log', i.consoleLog],
    ['Snapshots', i.snapshots?.length ? i.snapshots.join(', ') : 'none'],
  ];
  return lines.map(([k, v]) => `${`${k}:`.padEnd(13)}${v}`).join('\n');
}

export async function info(name: string, o: { json?: boolean }): Promise<number> {
  const i = await daemonCall<InfoReply>(new Store(), 'GET', path(name));
  print(o.json, infoText(i), i);
  return 0;
}

export async function pool(o: { json?: boolean }): Promise<number> {
  const p = await daemonCall<PoolReply>(new Store(), 'GET', '/pool');
  print(
    o.json,
    `pool: ${p.idle} ready, ${p.starting} starting, size ${p.size}${p.size === 0 ? ' (kiln daemon --pool N, or "pool" in daemon.json)' : ''}`,
    p,
  );
  return 0;
}

export async function logs(name: string, o: { json?: boolean; bytes?: string }): Promise<number> {
  if (o.bytes !== undefined && !/^\d+$/.test(o.bytes))
    throw new ConfigError('--bytes', `must be a whole number of bytes (got '${o.bytes}')`);
  const { log } = await daemonCall<LogsReply>(
    new Store(),
    'GET',
    `${path(name)}/logs${o.bytes ? `?bytes=${o.bytes}` : ''}`,
  );
  if (o.json) print(true, '', { log });
  else process.stdout.write(log);
  return 0;
}

export async function lifecycle(
  verb: 'start' | 'stop' | 'restart' | 'pause' | 'resume',
  name: string,
  o: { json?: boolean; force?: boolean; jail?: boolean },
): Promise<number> {
  const store = new Store();
  if (verb === 'start' || verb === 'restart') {
    // The default guest is built here, with its progress on this terminal (the daemon then finds it cached).
    const i = await daemonCall<InfoReply>(store, 'GET', path(name));
    if (i.definition.kernel === undefined) {
      // A start the daemon would refuse (limits, missing files) is refused before the build.
      if (verb === 'start') await daemonCall(store, 'GET', `${path(name)}/preflight`);
      await buildMinimalKernel(progress);
      await buildInitramfs(progress);
    }
    progress(`${verb === 'start' ? 'starting' : 'restarting'} '${name}'`);
  }
  if (verb === 'stop' || verb === 'restart') {
    progress(
      o.force
        ? `stopping '${name}' at once (SIGTERM)`
        : `stopping '${name}': pressed its ACPI power button; waiting up to 30 s for the guest to power off, then SIGTERM (--force: at once)`,
    );
  }
  const s = await daemonCall<StartReply>(
    store,
    'POST',
    `${path(name)}/${verb}`,
    verb === 'stop' ? { force: o.force === true } : o.jail === false ? { jail: false } : {},
  );
  print(o.json, `${s.name}: ${s.state}`, s);
  const wanted = { start: 'running', restart: 'running', resume: 'running', pause: 'paused', stop: 'stopped' }[verb];
  if (s.state !== wanted) {
    progress(`'${name}' is ${s.state}, not ${wanted}`);
    return EXIT_ERROR;
  }
  return 0;
}

export async function remove(name: string, o: { json?: boolean }): Promise<number> {
  const r = await daemonCall<RemovedReply>(new Store(), 'DELETE', path(name));
  print(o.json, `removed '${r.removed}'`, r);
  return 0;
}

/** The scroll-back, then the live serial console until Ctrl-A x, the VM's end, or (piped) the input's end. */
export async function console(name: string, log: (line: string) => void, linger = '2'): Promise<number> {
  if (!/^\d+(\.\d+)?$/.test(linger)) throw new ConfigError('--linger', `must be a number of seconds (got '${linger}')`);
  const store = new Store();
  const { log: scrollBack } = await daemonCall<LogsReply>(store, 'GET', `${path(name)}/logs?bytes=16384`);
  process.stdout.write(scrollBack);
  const i = await daemonCall<InfoReply>(store, 'GET', path(name));
  if (i.state === 'stopped') {
    log(`'${name}' is not running; that was the end of its console log`);
    return 0;
  }
  return attachSerial(join(store.runDir(name), 'serial.sock'), log, Number(linger) * 1000);
}

function attachSerial(socketPath: string, log: (line: string) => void, lingerMs: number): Promise<number> {
  return new Promise((resolvePromise) => {
    const socket = createConnection(socketPath);
    let detach: () => void = () => undefined;
    let quiet: NodeJS.Timeout | null = null;
    let inputEnded = false;
    const done = (code: number) => {
      detach();
      if (quiet) clearTimeout(quiet);
      socket.destroy();
      resolvePromise(code);
    };
    const armQuiet = () => {
      if (quiet) clearTimeout(quiet);
      quiet = setTimeout(() => done(0), lingerMs);
    };
    socket.on('connect', () => {
      if (process.stdin.isTTY) log('attached to the serial console; Ctrl-A x detaches (the VM keeps running)');
      detach = relayStdin({
        send: (bytes) => socket.write(bytes),
        quit: () => done(0),
        inputEnded: () => {
          inputEnded = true;
          armQuiet();
        },
      });
    });
    socket.on('data', (d: Buffer) => {
      process.stdout.write(d);
      if (inputEnded) armQuiet();
    });
    socket.on('close', () => done(0));
    socket.on('error', (err) => {
      log(`cannot attach to the serial console: ${err.message}`);
      done(1);
    });
  });
}

/** `kiln dashboard`: the daemon serves the web UI; a one-time address opens a session in a browser. */
export async function dashboard(o: { json?: boolean; listen?: string }): Promise<number> {
  if (o.listen !== undefined) parsePeer(o.listen, '--listen', true);
  const r = await daemonCall<DashboardReply>(new Store(), 'POST', '/dashboard', {
    ...(o.listen !== undefined ? { listen: o.listen } : {}),
  });
  if (o.json) print(true, '', { url: r.url, listen: r.listen, loopback: r.loopback });
  else {
    process.stdout.write(`${r.url}\n`);
    progress(
      `the dashboard serves on ${r.listen}; that address opens one session within 10 minutes (run kiln dashboard again for another)`,
    );
    if (!r.loopback)
      progress(
        `${r.listen} is NOT loopback: other machines can reach it (plain HTTP). Prefer loopback and an SSH tunnel: ssh -L 7070:127.0.0.1:7070 HOST`,
      );
  }
  return 0;
}

/**
 * Reads a file given on the command line (`what` names it in errors: "the token file F",
 * "--tls-key F"); a secret must be its owner's alone.
 */
function readGivenFile(file: string, what: string, secret: boolean): string {
  try {
    const st = statSync(file);
    if (secret && (st.mode & 0o077) !== 0)
      throw new KilnError(`${what} is readable by others (mode ${(st.mode & 0o777).toString(8)}): chmod 600 it`);
    return readFileSync(file, 'utf8');
  } catch (err) {
    if (err instanceof KilnError) throw err;
    throw new KilnError(`cannot read ${what}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** Reads a token file (kiln daemon --token-file, kiln migrate --token-file): it must be its owner's alone. */
function tokenFrom(file: string): string {
  return readToken(readGivenFile(file, `the token file ${file}`, true), file);
}

/** Reads a PEM file for the migration channel's TLS; a private key must be its owner's alone. */
function pemFrom(file: string, flag: string, secret: boolean): string {
  const text = readGivenFile(file, `${flag} ${file}`, secret);
  if (!/-----BEGIN [A-Z0-9 ]+-----/.test(text)) throw new KilnError(`${flag} ${file} is not a PEM file`);
  return text;
}

/** --tls-cert and --tls-key, checked to be a certificate and its key. */
function tlsServerFrom(certFile: string, keyFile: string): { cert: string; key: string } {
  const cert = pemFrom(certFile, '--tls-cert', false);
  const key = pemFrom(keyFile, '--tls-key', true);
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    throw new KilnError(
      `--tls-cert ${certFile} and --tls-key ${keyFile} are not a certificate and its key: ${(err as Error).message}`,
    );
  }
  return { cert, key };
}

/** --tls-ca: PEM certificates to check the other daemon's against. */
function tlsCaFrom(file: string): string {
  const ca = pemFrom(file, '--tls-ca', false);
  if (!/-----BEGIN CERTIFICATE-----/.test(ca)) throw new KilnError(`--tls-ca ${file} holds no certificate`);
  try {
    createSecureContext({ ca });
  } catch (err) {
    throw new KilnError(`--tls-ca ${file}: ${(err as Error).message}`);
  }
  return ca;
}

/** The most pool processes a daemon keeps (each costs tens of MiB while idle). */
export const MAX_POOL = 64;

/** A pool size from --pool or daemon.json's "pool": a whole number 0..MAX_POOL. */
export function parsePoolSize(value: unknown, where: string): number {
  const n = typeof value === 'string' && /^\d+$/.test(value) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > MAX_POOL)
    throw new KilnError(
      `${where}: the pool size must be a whole number from 0 to ${MAX_POOL} (got ${JSON.stringify(value)})`,
    );
  return n;
}

/** The daemon's configuration file, <state>/daemon.json: {"pool": N}; absent means defaults. */
export function readDaemonConfig(store: Store): { pool: number } {
  const file = join(store.dir, 'daemon.json');
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return { pool: 0 };
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new KilnError(`${file} is not JSON: ${(err as Error).message}`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    throw new KilnError(`${file} must be a JSON object`);
  const unknown = Object.keys(json).filter((k) => k !== 'pool');
  if (unknown.length) throw new KilnError(`${file}: unknown setting(s) ${unknown.join(', ')} (known: pool)`);
  const pool = (json as { pool?: unknown }).pool;
  return { pool: pool === undefined ? 0 : parsePoolSize(pool, file) };
}

export async function daemon(
  log: (line: string) => void,
  o: { listen?: string; tokenFile?: string; tlsCert?: string; tlsKey?: string; pool?: string } = {},
): Promise<number> {
  if ((o.listen === undefined) !== (o.tokenFile === undefined))
    throw new KilnError('--listen and --token-file go together (migrations from other hosts need both)');
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined))
    throw new KilnError('--tls-cert and --tls-key go together');
  if (o.tlsCert !== undefined && o.listen === undefined)
    throw new KilnError('--tls-cert and --tls-key secure --listen: give it too');
  const listen =
    o.listen !== undefined
      ? {
          address: parsePeer(o.listen, '--listen'),
          token: tokenFrom(o.tokenFile!),
          ...(o.tlsCert !== undefined ? { tls: tlsServerFrom(o.tlsCert, o.tlsKey!) } : {}),
        }
      : undefined;
  const store = new Store();
  const pool = o.pool !== undefined ? parsePoolSize(o.pool, '--pool') : readDaemonConfig(store).pool;
  await runDaemon(store, log, { ...(listen ? { listen } : {}), pool });
  return 0;
}

export async function upgrade(name: string, o: { json?: boolean }): Promise<number> {
  progress(`upgrading '${name}' into a new VMM of this Kiln (it keeps running; it pauses only at the switch)`);
  const s = await daemonCall<UpgradeReply>(new Store(), 'POST', `${path(name)}/upgrade`, {}, progress);
  print(o.json, `${s.name}: ${s.state} (pid ${s.pid}); guest memory ${s.memory}, paused ${s.downtimeMs} ms`, s);
  return s.state === 'running' || s.state === 'paused' ? 0 : EXIT_ERROR;
}

export async function migrate(
  name: string,
  o: { json?: boolean; to: string; tokenFile: string; downtimeMs?: string; copyDisks?: boolean; tlsCa?: string },
): Promise<number> {
  const downtimeMs = o.downtimeMs !== undefined ? Number(o.downtimeMs) : undefined;
  if (downtimeMs !== undefined && (!Number.isSafeInteger(downtimeMs) || downtimeMs < 1))
    throw new KilnError(`--downtime-ms must be a whole number of milliseconds, not '${o.downtimeMs}'`);
  parsePeer(o.to, '--to');
  const tlsCa = o.tlsCa !== undefined ? tlsCaFrom(o.tlsCa) : undefined;
  progress(`migrating '${name}' to ${o.to}${tlsCa ? ' over TLS' : ''} (it keeps running until the last moment)`);
  const r = await daemonCall<{ migrated: string; to: string }>(
    new Store(),
    'POST',
    `${path(name)}/migrate`,
    {
      to: o.to,
      token: tokenFrom(o.tokenFile),
      ...(downtimeMs !== undefined ? { downtimeMs } : {}),
      ...(o.copyDisks ? { copyDisks: true } : {}),
      ...(tlsCa !== undefined ? { tlsCa } : {}),
    },
    progress,
  );
  print(o.json, `${r.migrated}: running on ${r.to}`, r);
  return 0;
}

const mib = (bytes: number) => `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;

function snapshotLine(s: SnapshotMeta): string {
  const kind = s.type === 'diff' ? `diff of ${s.base}` : 'full';
  return `${s.tag.padEnd(24)} ${s.createdAt}  ${kind}, memory ${mib(s.memoryBytes)} (${mib(s.memoryOnDisk)} on disk), ${s.disks.length} disk cop${s.disks.length === 1 ? 'y' : 'ies'}`;
}

export async function snapshot(
  name: string,
  tag: string | undefined,
  o: { json?: boolean; diff?: boolean },
): Promise<number> {
  progress(`snapshotting '${name}' (paused meanwhile)`);
  const s = await daemonCall<SnapshotMeta>(
    new Store(),
    'POST',
    `${path(name)}/snapshots`,
    {
      ...(tag !== undefined ? { tag } : {}),
      ...(o.diff ? { diff: true } : {}),
    },
    progress,
  );
  print(
    o.json,
    `${name}: ${s.type === 'diff' ? `diff snapshot '${s.tag}' (of '${s.base}')` : `snapshot '${s.tag}'`} taken in ${s.createMs} ms (state ${mib(s.stateBytes)}, memory ${mib(s.memoryBytes)}, ${mib(s.memoryOnDisk)} on disk)`,
    s,
  );
  return 0;
}

export async function snapshots(name: string, o: { json?: boolean }): Promise<number> {
  const r = await daemonCall<{ snapshots: SnapshotMeta[] }>(new Store(), 'GET', `${path(name)}/snapshots`);
  print(o.json, r.snapshots.length ? r.snapshots.map(snapshotLine).join('\n') : `'${name}' has no snapshots`, r);
  return 0;
}

export async function snapshotRemove(name: string, tag: string, o: { json?: boolean }): Promise<number> {
  const r = await daemonCall<{ removed: string }>(
    new Store(),
    'DELETE',
    `${path(name)}/snapshots/${encodeURIComponent(tag)}`,
  );
  print(o.json, `removed snapshot '${r.removed}' of '${name}'`, r);
  return 0;
}

export async function snapshotMerge(name: string, tag: string, o: { json?: boolean }): Promise<number> {
  progress(`merging diff snapshot '${tag}' of '${name}' with the snapshots under it`);
  const s = await daemonCall<SnapshotMeta>(
    new Store(),
    'POST',
    `${path(name)}/snapshots/${encodeURIComponent(tag)}/merge`,
    {},
    progress,
  );
  print(o.json, `${name}: snapshot '${s.tag}' is whole (memory ${mib(s.memoryOnDisk)} on disk)`, s);
  return 0;
}

export async function restore(name: string, tag: string, o: { json?: boolean; jail?: boolean }): Promise<number> {
  progress(`restoring '${name}' from '${tag}' (its writable disks go back to the snapshot's)`);
  const s = await daemonCall<StartReply>(
    new Store(),
    'POST',
    `${path(name)}/restore`,
    {
      tag,
      ...(o.jail === false ? { jail: false } : {}),
    },
    progress,
  );
  print(o.json, `${s.name}: ${s.state}`, s);
  return s.state === 'running' ? 0 : EXIT_ERROR;
}

export async function clone(
  name: string,
  newName: string,
  o: { json?: boolean; from?: string; net?: string[] },
): Promise<number> {
  progress(`cloning '${name}' as '${newName}'${o.from ? ` from '${o.from}'` : ' (a snapshot of it now)'}`);
  const nets = (o.net ?? []).map(parseNetFlag);
  const s = await daemonCall<StartReply>(
    new Store(),
    'POST',
    `${path(name)}/clone`,
    {
      name: newName,
      ...(o.from !== undefined ? { from: o.from } : {}),
      ...(nets.length > 0 ? { nets } : {}),
    },
    progress,
  );
  print(o.json, `${s.name}: ${s.state}`, s);
  return s.state === 'running' ? 0 : EXIT_ERROR;
}
