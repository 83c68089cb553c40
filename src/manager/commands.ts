// The `kiln` VM-manager verbs (virsh/multipass/limactl style): create, start, stop,
// pause, resume, restart, console, ls, info, logs, rm, daemon. Each talks to the daemon
// (started on demand); --json on every verb that prints.
import { readFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { KilnError } from '../errors.js';
import { buildInitramfs, buildMinimalKernel } from '../guestkit/build.js';
import { parseSize } from '../size.js';
import { daemonCall, normalizeSpec, runDaemon } from './daemon.js';
import type { VmStatus } from './manager.js';
import { Store } from './store.js';

export const MANAGER_VERBS = ['create', 'start', 'stop', 'pause', 'resume', 'restart', 'console', 'ls', 'info', 'logs', 'rm', 'daemon'] as const;


class ManagerUsageError extends KilnError {}
export { ManagerUsageError };

/** Relays the terminal to a VM's serial socket until Ctrl-A x or the VM ends. */
function attachSerial(path: string, progress: (line: string) => void): Promise<number> {
  return new Promise((resolve) => {
    const socket = createConnection(path);
    const stdin = process.stdin;
    const raw = stdin.isTTY === true;
    let escape = false;
    const done = (code: number) => {
      stdin.off('data', onData);
      if (raw) stdin.setRawMode(false);
      stdin.pause();
      socket.destroy();
      resolve(code);
    };
    const onData = (chunk: Buffer) => {
      for (const byte of chunk) {
        if (escape) {
          escape = false;
          if (byte === 0x78 /* x */) return done(0);
          socket.write(Uint8Array.of(byte));
          continue;
        }
        if (raw && byte === 0x01) escape = true;
        else socket.write(Uint8Array.of(byte));
      }
    };
    socket.on('connect', () => {
      progress('attached to the serial console; Ctrl-A x detaches (the VM keeps running)');
      if (raw) stdin.setRawMode(true);
      stdin.on('data', onData);
      stdin.resume();
    });
    socket.on('data', (d: Buffer) => process.stdout.write(d));
    socket.on('close', () => done(0));
    socket.on('error', (err) => {
      progress(`cannot attach to the serial console: ${err.message}`);
      done(1);
    });
  });
}

function table(rows: VmStatus[]): string {
  const head = ['NAME', 'STATE', 'VCPUS', 'MEMORY', 'PID'];
  const data = rows.map((r) => [r.name, r.state, String(r.cpus), `${r.memoryMiB}M`, r.pid === null ? '-' : String(r.pid)]);
  const widths = head.map((h, i) => Math.max(h.length, ...data.map((d) => d[i]!.length)));
  return [head, ...data].map((row) => row.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

function specFromFlags(name: string, v: Record<string, string | boolean | string[] | undefined>): Record<string, unknown> {
  const str = (k: string) => v[k] as string | undefined;
  const list = (k: string) => (v[k] as string[] | undefined) ?? [];
  const spec: Record<string, unknown> = { name };
  if (str('kernel')) spec.kernel = str('kernel');
  if (str('initrd')) spec.initrd = str('initrd');
  if (str('cmdline')) spec.cmdline = str('cmdline');
  if (str('cpus')) spec.cpus = Number(str('cpus'));
  if (str('memory')) spec.memoryMiB = Math.floor(parseSize(str('memory')!) / (1024 * 1024));
  spec.disks = list('disk').map((d) => {
    const [path, ...opts] = d.split(',');
    for (const o of opts) if (o !== 'ro' && o !== 'root') throw new ManagerUsageError(`--disk ${d}: unknown option '${o}' (ro, root)`);
    return { path, readOnly: opts.includes('ro'), root: opts.includes('root') };
  });
  spec.nets = list('net').map((n) => {
    const m = /^tap=([^,]+)(?:,mac=(.+))?$/.exec(n);
    if (!m) throw new ManagerUsageError(`--net ${n}: expected tap=NAME[,mac=MAC]`);
    return { tap: m[1], ...(m[2] ? { mac: m[2] } : {}) };
  });
  if (v.rng === true) spec.rng = true;
  if (str('vsock')) {
    const m = /^(\d+),(.+)$/.exec(str('vsock')!);
    if (!m) throw new ManagerUsageError(`--vsock ${str('vsock')}: expected CID,SOCKET`);
    spec.vsock = { guestCid: Number(m[1]), uds: m[2] };
  }
  if (str('balloon')) spec.balloonMiB = Math.floor(parseSize(str('balloon')!) / (1024 * 1024));
  if (str('cpu-weight')) spec.cpuWeight = Number(str('cpu-weight'));
  if (str('cpu-quota')) spec.cpuQuotaPercent = Number(str('cpu-quota'));
  if (str('pin')) spec.pinCpus = str('pin')!.split(',').map(Number);
  return spec;
}

export async function managerCommand(verb: string, argv: string[], progress: (line: string) => void): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      json: { type: 'boolean', default: false },
      force: { type: 'boolean', default: false },
      file: { type: 'string', short: 'f' },
      bytes: { type: 'string' },
      kernel: { type: 'string' },
      initrd: { type: 'string' },
      cmdline: { type: 'string' },
      cpus: { type: 'string' },
      memory: { type: 'string' },
      disk: { type: 'string', multiple: true },
      net: { type: 'string', multiple: true },
      rng: { type: 'boolean' },
      vsock: { type: 'string' },
      balloon: { type: 'string' },
      'cpu-weight': { type: 'string' },
      'cpu-quota': { type: 'string' },
      pin: { type: 'string' },
    },
  });
  const store = new Store();
  const out = (human: string, json: unknown) => process.stdout.write(values.json ? `${JSON.stringify(json, null, 2)}\n` : `${human}\n`);
  const name = positionals[0];
  const needName = () => {
    if (!name) throw new ManagerUsageError(`kiln ${verb} needs a VM name`);
    return encodeURIComponent(name);
  };
  switch (verb) {
    case 'daemon':
      await runDaemon(store, progress);
      return 0;
    case 'create': {
      let raw: unknown;
      if (values.file) {
        const text = readFileSync(values.file, 'utf8');
        try {
          raw = values.file.endsWith('.json') ? JSON.parse(text) : parseYaml(text);
        } catch (err) {
          throw new KilnError(`cannot read ${values.file}: ${(err as Error).message}`);
        }
        if (name) raw = { ...(raw as object), name };
      } else {
        raw = specFromFlags(needName() && name!, values);
      }
      normalizeSpec(raw); // a bad definition is refused here, before the daemon is involved
      const s = (await daemonCall(store, 'POST', '/vms', raw)) as VmStatus;
      out(`created '${s.name}' (${s.cpus} vCPU, ${s.memoryMiB} MiB)`, s);
      return 0;
    }
    case 'ls': {
      const { vms, broken } = (await daemonCall(store, 'GET', '/vms')) as { vms: VmStatus[]; broken: Array<{ name: string; file: string; error: string }> };
      out(vms.length ? table(vms) : 'no VMs', { vms, broken });
      for (const b of broken) process.stderr.write(`kiln: the definition of '${b.name}' (${b.file}) cannot be read: ${b.error}; it is left as it is\n`);
      return 0;
    }
    case 'info': {
      const info = (await daemonCall(store, 'GET', `/vms/${needName()}`)) as VmStatus & { definition: unknown };
      out(`${table([info])}\n${JSON.stringify(info.definition, null, 2)}`, info);
      return 0;
    }
    case 'logs': {
      const { log } = (await daemonCall(store, 'GET', `/vms/${needName()}/logs${values.bytes ? `?bytes=${Number(values.bytes)}` : ''}`)) as { log: string };
      if (values.json) out('', { log });
      else process.stdout.write(log);
      return 0;
    }
    case 'console': {
      // The scroll-back first, then the live serial console (Ctrl-A x detaches).
      const { log } = (await daemonCall(store, 'GET', `/vms/${needName()}/logs?bytes=16384`)) as { log: string };
      process.stdout.write(log);
      const info = (await daemonCall(store, 'GET', `/vms/${needName()}`)) as VmStatus;
      if (info.state === 'stopped') {
        progress(`'${name}' is not running; that was the end of its console log`);
        return 0;
      }
      return attachSerial(join(store.runDir(name!), 'serial.sock'), progress);
    }
    case 'start':
    case 'stop':
    case 'pause':
    case 'resume':
    case 'restart': {
      if (verb === 'start' || verb === 'restart') {
        // The default guest is built here, with its progress on this terminal (the daemon then finds it cached).
        const info = (await daemonCall(store, 'GET', `/vms/${needName()}`)) as { definition: { kernel?: string } };
        if (!info.definition.kernel) {
          await buildMinimalKernel(progress);
          await buildInitramfs(progress);
        }
        progress(`${verb === 'start' ? 'starting' : 'restarting'} '${name}'`);
      }
      const s = (await daemonCall(store, 'POST', `/vms/${needName()}/${verb}`, verb === 'stop' ? { force: values.force } : {})) as VmStatus;
      out(`${s.name}: ${s.state}`, s);
      return 0;
    }
    case 'rm': {
      await daemonCall(store, 'DELETE', `/vms/${needName()}`);
      out(`removed '${name}'`, { removed: name });
      return 0;
    }
    default:
      throw new ManagerUsageError(`unknown command '${verb}'`);
  }
}
