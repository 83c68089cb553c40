#!/usr/bin/env node
// The `kiln` command.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createLinuxVm } from './boot/linux.js';
import { CPU_TEMPLATES } from './cpu/templates.js';
import { addStandardDevices, loadDemo } from './demo.js';
import type { DeviceSpec } from './devices/device.js';
import { readProgress } from './devices/progress.js';
import type { SerialHost } from './devices/serial.js';
import { KilnError } from './errors.js';
import { buildCloudKernel, buildInitramfs, buildMinimalKernel, buildRootfs, cacheDir } from './guestkit/build.js';
import { parseSize } from './size.js';
import { MANAGER_USAGE } from './manager/usage.js';
import type { DiskConfig, NetConfig } from './virtio/attach.js';
import { Vm, type VmResult } from './vm.js';

const VERSION = '0.1.0';

const USAGE = `Usage: kiln <command> [options]

Commands:
  run               boot a guest and attach its serial console (Ctrl-A x quits, Ctrl-A p presses the power button)
  guest build [ARTIFACT...]
                    build guest kit artifacts into the cache: minimal-kernel, initramfs, rootfs, cloud-kernel
                    (default: minimal-kernel initramfs)
  version           print Kiln's version

Options for run (with no guest named, Kiln boots the kit's minimal Linux, building it first if needed):
  --kernel PATH     a Linux kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage
  --initrd PATH     an initramfs or initrd
  --cmdline TEXT    extra kernel command line (Kiln adds console=ttyS0 and what the CPU template needs)
  --host-decompress decompress a bzImage's payload on the host and boot the ELF inside (fast on software KVM)
  --demo            boot the built-in demo guest instead
  --memory SIZE     guest RAM: MiB, or with a unit (128M, 1G); default 128M
  --cpus N          number of vCPUs; default 1
  --cpu-template T  ${Object.keys(CPU_TEMPLATES).join(', ')} (default: pvm on software KVM, host elsewhere)
  --disk PATH[,ro][,serial=ID]
                    a raw disk image as a virtio-blk drive (repeatable; the first is /dev/vda)
  --net tap=NAME[,mac=MAC] | passt=SOCKET[,mac=MAC]
                    a virtio-net NIC on a TAP (needs CAP_NET_ADMIN) or on passt's socket (repeatable)
  --rng             an entropy device (virtio-rng, fed by the host's getrandom)
  --vsock CID,SOCKET
                    vsock for guest CID; host clients connect to SOCKET and send "CONNECT <port>"
  --console-socket PATH
                    a virtio console (hvc0) on a Unix socket Kiln listens on
  --balloon SIZE    a memory balloon, starting at SIZE (e.g. 0, 64M)
  --on-reboot WHAT  exit (default) or restart when the guest reboots
  --json            print one JSON result (with the serial output) instead of attaching the console
  --verbose         log unhandled port and MMIO accesses (once each)

${MANAGER_USAGE.trim()}

Options for guest build:
  --json            print the artifacts' paths as JSON
`;

/** Exit statuses scripts can rely on. */
const EXIT_USAGE = 2;
const EXIT_ERROR = 1;
/** The VM ended abnormally (triple fault, KVM failure). */
const EXIT_VM_FAILED = 3;

class UsageError extends KilnError {}

const progress = (line: string) => process.stderr.write(`kiln: ${line}\n`);

function describe(result: VmResult): string {
  if (result.reason === 'guest-exit') return result.reset ? `the guest rebooted (${result.detail})` : `${result.detail}; exit status ${result.exitCode}`;
  const lines = [`VM ended: ${result.detail}`];
  for (const v of result.vcpus) {
    if (!v.regs) continue;
    const r = v.regs as Record<string, bigint>;
    const hex = (n: bigint | undefined) => `0x${(n ?? 0n).toString(16)}`;
    lines.push(`  vcpu${v.vcpu} (${v.reason}): rip=${hex(r.rip)} rsp=${hex(r.rsp)} rflags=${hex(r.rflags)} rax=${hex(r.rax)} rcx=${hex(r.rcx)} rdx=${hex(r.rdx)}`);
  }
  return lines.join('\n');
}

function compatSummary(result: VmResult): string | null {
  const totals: Record<string, number> = {};
  for (const v of result.vcpus) for (const [k, n] of Object.entries(v.compat ?? {})) totals[k] = (totals[k] ?? 0) + n;
  const parts = Object.entries(totals).map(([k, n]) => `${k} x${n}`);
  return parts.length ? `software-KVM compatibility: ${parts.join(', ')}` : null;
}

interface Prepared {
  readonly vm: Vm;
  readonly progress: DeviceSpec;
  readonly serial: SerialHost | null;
  pressPowerButton(): void;
}

/** Connects the terminal to the guest's UART: raw mode, Ctrl-A x quits, Ctrl-A p powers off. */
function attachConsole(p: Prepared): () => void {
  const stdin = process.stdin;
  if (!p.serial) return () => undefined;
  const serial = p.serial;
  const raw = stdin.isTTY === true;
  if (raw) stdin.setRawMode(true);
  let escape = false;
  const onData = (chunk: Buffer) => {
    if (!raw) {
      serial.input(chunk);
      return;
    }
    for (const byte of chunk) {
      if (escape) {
        escape = false;
        if (byte === 0x78 /* x */) void p.vm.stop();
        else if (byte === 0x70 /* p */) p.pressPowerButton();
        else if (byte === 0x01) serial.input(Uint8Array.of(0x01));
        continue;
      }
      if (byte === 0x01) escape = true;
      else serial.input(Uint8Array.of(byte));
    }
  };
  stdin.on('data', onData);
  stdin.resume();
  return () => {
    stdin.off('data', onData);
    if (raw) stdin.setRawMode(false);
    stdin.pause();
  };
}

/** `--disk PATH[,ro][,serial=ID]` */
export function parseDiskFlag(flag: string): DiskConfig {
  const [path, ...opts] = flag.split(',');
  if (!path) throw new UsageError(`--disk needs a path (got '${flag}')`);
  let readOnly = false;
  let serial: string | undefined;
  for (const o of opts) {
    if (o === 'ro') readOnly = true;
    else if (o.startsWith('serial=')) serial = o.slice('serial='.length);
    else throw new UsageError(`--disk ${flag}: unknown option '${o}' (expected ro or serial=ID)`);
  }
  return { path, readOnly, ...(serial !== undefined ? { serial } : {}) };
}

/** `--net tap=NAME[,mac=MAC]` or `--net passt=SOCKET[,mac=MAC]` */
export function parseNetFlag(flag: string): NetConfig {
  const fields = Object.fromEntries(flag.split(',').map((kv) => [kv.slice(0, kv.indexOf('=') < 0 ? kv.length : kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
  const unknown = Object.keys(fields).filter((k) => !['tap', 'passt', 'mac'].includes(k));
  if (unknown.length > 0 || (!fields.tap === !fields.passt)) throw new UsageError(`--net ${flag}: expected tap=NAME or passt=SOCKET, optionally with mac=MAC`);
  return { ...(fields.tap ? { tap: fields.tap } : { passt: fields.passt! }), ...(fields.mac ? { mac: fields.mac } : {}) };
}

/** `--vsock CID,SOCKET` */
export function parseVsockFlag(flag: string): { guestCid: number; uds: string } {
  const m = /^(\d+),(.+)$/.exec(flag);
  if (!m) throw new UsageError(`--vsock ${flag}: expected CID,SOCKET (e.g. 3,/tmp/vm.vsock)`);
  return { guestCid: Number(m[1]), uds: m[2]! };
}

async function run(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      demo: { type: 'boolean', default: false },
      kernel: { type: 'string' },
      initrd: { type: 'string' },
      cmdline: { type: 'string' },
      memory: { type: 'string', default: '128M' },
      cpus: { type: 'string', default: '1' },
      'cpu-template': { type: 'string' },
      'on-reboot': { type: 'string', default: 'exit' },
      'host-decompress': { type: 'boolean', default: false },
      disk: { type: 'string', multiple: true, default: [] },
      net: { type: 'string', multiple: true, default: [] },
      rng: { type: 'boolean', default: false },
      vsock: { type: 'string' },
      'console-socket': { type: 'string' },
      balloon: { type: 'string' },
      json: { type: 'boolean', default: false },
      verbose: { type: 'boolean', default: false },
    },
    strict: true,
  });
  const disks = values.disk.map(parseDiskFlag);
  const nets = values.net.map(parseNetFlag);
  const vsock = values.vsock === undefined ? undefined : parseVsockFlag(values.vsock);
  const balloon = values.balloon === undefined ? undefined : { targetMiB: Math.floor(parseSize(values.balloon) / (1024 * 1024)) };
  const virtioWanted = disks.length > 0 || nets.length > 0 || values.rng || vsock || values['console-socket'] || balloon;
  if (values.demo && virtioWanted) throw new UsageError('virtio devices (--disk, --net, --rng, --vsock, --console-socket, --balloon) need a Linux guest, not --demo');
  const cpus = Number(values.cpus);
  if (!/^\d+$/.test(values.cpus) || cpus < 1) throw new UsageError(`--cpus must be a whole number of at least 1 (got '${values.cpus}')`);
  if (values['on-reboot'] !== 'exit' && values['on-reboot'] !== 'restart') throw new UsageError(`--on-reboot must be 'exit' or 'restart' (got '${values['on-reboot']}')`);
  if (values.demo && (values.kernel || values.initrd)) throw new UsageError('--demo and --kernel/--initrd are different guests: choose one');
  if (!values.kernel && values.initrd) throw new UsageError('--initrd needs --kernel');
  const memoryBytes = parseSize(values.memory);

  let kernelPath = values.kernel;
  let initrdPath = values.initrd;
  if (!values.demo && !kernelPath) {
    // The default guest: the kit's minimal Linux and test init.
    kernelPath = (await buildMinimalKernel(progress)).vmlinux;
    initrdPath = (await buildInitramfs(progress)).path;
  }

  let captureDir: string | null = null;
  let serialFd = 1;
  if (values.json) {
    captureDir = mkdtempSync(join(tmpdir(), 'kiln-serial-'));
    serialFd = openSync(join(captureDir, 'serial.log'), 'w');
  }
  try {
    for (;;) {
      const prepared: Prepared = values.demo
        ? (() => {
            const vm = Vm.create({ memoryBytes, vcpus: cpus, logUnhandled: values.verbose });
            const { progress: progressPort } = addStandardDevices(vm, serialFd);
            loadDemo(vm);
            return { vm, progress: progressPort, serial: null, pressPowerButton: () => undefined };
          })()
        : (() => {
            const lv = createLinuxVm({
              kernelPath: kernelPath!,
              initrdPath,
              cmdline: values.cmdline,
              cpus,
              memoryBytes,
              cpuTemplate: values['cpu-template'],
              serialOutFd: serialFd,
              logUnhandled: values.verbose,
              hostDecompress: values['host-decompress'],
              virtio: {
                disks,
                nets,
                rng: values.rng,
                ...(vsock ? { vsock } : {}),
                ...(values['console-socket'] ? { consoleSocket: values['console-socket'] } : {}),
                ...(balloon ? { balloon } : {}),
              },
            });
            if (!values.json) progress(`booting ${kernelPath} (${lv.boot.format}, ${cpus} vCPU, ${values.memory}); Ctrl-A x quits`);
            return { vm: lv.vm, progress: lv.progress, serial: lv.serial, pressPowerButton: () => lv.pressPowerButton() };
          })();
      const { vm } = prepared;
      let result: VmResult;
      try {
        const started = Date.now();
        await vm.start();
        if (process.env.KILN_TIMING) progress(`timing: first KVM_RUN ${(vm.firstRunAt - performance.timeOrigin).toFixed(1)} ms after process start`);
        const detach = values.json ? () => undefined : attachConsole(prepared);
        const stopOnSignal = () => void vm.stop();
        process.once('SIGINT', stopOnSignal);
        process.once('SIGTERM', stopOnSignal);
        result = await vm.wait();
        process.off('SIGINT', stopOnSignal);
        process.off('SIGTERM', stopOnSignal);
        detach();
        const status = result.reason === 'guest-exit' ? (result.exitCode ?? 0) : result.reason === 'stopped' || result.reason === 'hlt' ? 0 : EXIT_VM_FAILED;
        const summary = compatSummary(result);
        if (captureDir) {
          closeSync(serialFd);
          serialFd = -1;
          const serial = readFileSync(join(captureDir, 'serial.log'), 'utf8');
          process.stdout.write(
            `${JSON.stringify({
              status,
              reason: result.reason,
              reset: result.reset,
              detail: result.detail,
              exitCode: result.exitCode,
              seconds: (Date.now() - started) / 1000,
              progress: readProgress(prepared.progress.state),
              serial,
              vcpus: result.vcpus.map((v) => ({ vcpu: v.vcpu, reason: v.reason, exits: v.exits, compat: v.compat ?? {} })),
            })}\n`,
          );
        } else {
          process.stderr.write(`\nkiln: ${describe(result)}\n`);
          if (summary) process.stderr.write(`kiln: ${summary}\n`);
        }
        if (result.reset && values['on-reboot'] === 'restart' && !captureDir) {
          progress('restarting the guest');
          continue;
        }
        return status;
      } finally {
        await vm.destroy();
      }
    }
  } finally {
    if (serialFd > 2) closeSync(serialFd);
    if (captureDir) rmSync(captureDir, { recursive: true, force: true });
  }
}

async function guest(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, options: { json: { type: 'boolean', default: false } }, allowPositionals: true, strict: true });
  const [verb, ...artifacts] = positionals;
  if (verb !== 'build') throw new UsageError(`unknown guest command '${verb ?? ''}' (try: kiln guest build)`);
  const wanted = artifacts.length ? artifacts : ['minimal-kernel', 'initramfs'];
  const builders: Record<string, () => Promise<Record<string, string | boolean>>> = {
    'minimal-kernel': async () => ({ ...(await buildMinimalKernel(progress)) }),
    initramfs: async () => ({ ...(await buildInitramfs(progress)) }),
    rootfs: async () => ({ ...(await buildRootfs(progress)) }),
    'cloud-kernel': async () => ({ ...(await buildCloudKernel(progress)) }),
  };
  for (const a of wanted) if (!builders[a]) throw new UsageError(`unknown guest artifact '${a}' (known: ${Object.keys(builders).join(', ')})`);
  const out: Record<string, Record<string, string | boolean>> = {};
  for (const a of wanted) {
    progress(`guest kit: ${a}`);
    out[a] = await builders[a]!();
    if (!values.json) process.stdout.write(`${a}: ${Object.entries(out[a]!).filter(([k]) => k !== 'built').map(([k, v]) => `${k}=${v}`).join(' ')}${out[a]!.built ? '' : ' (cached)'}\n`);
  }
  if (values.json) process.stdout.write(`${JSON.stringify({ cache: cacheDir(), artifacts: out })}\n`);
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'run':
      return run(rest);
    case 'guest':
      return guest(rest);
    case 'create':
    case 'start':
    case 'stop':
    case 'pause':
    case 'resume':
    case 'restart':
    case 'console':
    case 'ls':
    case 'info':
    case 'logs':
    case 'rm':
    case 'daemon':
      {
        // Loaded on demand: `kiln run` starts faster without the manager's modules.
        const { managerCommand, ManagerUsageError } = await import('./manager/commands.js');
        try {
          return await managerCommand(command, rest, progress);
        } catch (err) {
          if (err instanceof ManagerUsageError) throw new UsageError(err.message);
          throw err;
        }
      }
    case 'version':
    case '--version':
      process.stdout.write(`kiln ${VERSION}\n`);
      return 0;
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? EXIT_USAGE : 0;
    default:
      throw new UsageError(`unknown command '${command}'`);
  }
}

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
  },
  (err: unknown) => {
    if (err instanceof UsageError || (err instanceof Error && 'code' in err && String(err.code).startsWith('ERR_PARSE_ARGS'))) {
      process.stderr.write(`kiln: ${err.message}\n\n${USAGE}`);
      process.exitCode = EXIT_USAGE;
    } else if (err instanceof KilnError) {
      process.stderr.write(`kiln: ${err.message}\n`);
      process.exitCode = EXIT_ERROR;
    } else {
      // An unexpected failure is a Kiln bug: show the stack only when asked.
      const message = err instanceof Error ? err.message : String(err);
      process.stderr.write(`kiln: internal error: ${message}\n`);
      if (process.env.KILN_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
      process.exitCode = EXIT_ERROR;
    }
  },
);
