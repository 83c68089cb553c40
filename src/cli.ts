#!/usr/bin/env node
// The `kiln` command.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { addStandardDevices, loadDemo } from './demo.js';
import { readProgress } from './devices/progress.js';
import { KilnError } from './errors.js';
import { parseSize } from './size.js';
import { Vm, type VmResult } from './vm.js';

const VERSION = '0.1.0';

const USAGE = `Usage: kiln <command> [options]

Commands:
  run --demo        boot the built-in demo guest and show its serial output
  version           print Kiln's version

Options for run:
  --memory SIZE     guest RAM: MiB, or with a unit (128M, 1G); default 128M
  --cpus N          number of vCPUs; default 1
  --json            print one JSON result (with the serial output) instead of streaming
  --verbose         log unhandled port and MMIO accesses (once each)
`;

/** Exit statuses scripts can rely on. */
const EXIT_USAGE = 2;
const EXIT_ERROR = 1;
/** The VM ended abnormally (triple fault, KVM failure). */
const EXIT_VM_FAILED = 3;

class UsageError extends KilnError {}

function describe(result: VmResult): string {
  if (result.reason === 'guest-exit') return `guest exited with status ${result.exitCode}`;
  const lines = [`VM ended: ${result.detail}`];
  for (const v of result.vcpus) {
    if (!v.regs) continue;
    const r = v.regs as Record<string, bigint>;
    const hex = (n: bigint | undefined) => `0x${(n ?? 0n).toString(16)}`;
    lines.push(`  vcpu${v.vcpu} (${v.reason}): rip=${hex(r.rip)} rsp=${hex(r.rsp)} rflags=${hex(r.rflags)} rax=${hex(r.rax)} rcx=${hex(r.rcx)} rdx=${hex(r.rdx)}`);
  }
  return lines.join('\n');
}

async function run(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      demo: { type: 'boolean', default: false },
      memory: { type: 'string', default: '128M' },
      cpus: { type: 'string', default: '1' },
      json: { type: 'boolean', default: false },
      verbose: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (!values.demo) throw new UsageError('kiln run needs a guest: use --demo (Linux kernels arrive with --kernel in a later release)');
  const cpus = Number(values.cpus);
  if (!/^\d+$/.test(values.cpus) || cpus < 1) throw new UsageError(`--cpus must be a whole number of at least 1 (got '${values.cpus}')`);
  const memoryBytes = parseSize(values.memory);

  let captureDir: string | null = null;
  let serialFd = 1;
  if (values.json) {
    captureDir = mkdtempSync(join(tmpdir(), 'kiln-serial-'));
    serialFd = openSync(join(captureDir, 'serial.log'), 'w');
  }
  try {
    const vm = Vm.create({ memoryBytes, vcpus: cpus, logUnhandled: values.verbose });
    try {
      addStandardDevices(vm, serialFd);
      const progress = vm.devices.find((d) => d.kind === 'progress')!;
      loadDemo(vm);
      await vm.start();
      const stopOnSignal = () => void vm.stop();
      process.once('SIGINT', stopOnSignal);
      process.once('SIGTERM', stopOnSignal);
      const result = await vm.wait();
      process.off('SIGINT', stopOnSignal);
      process.off('SIGTERM', stopOnSignal);
      const status = result.reason === 'guest-exit' ? result.exitCode! : result.reason === 'stopped' || result.reason === 'hlt' ? 0 : EXIT_VM_FAILED;
      if (captureDir) {
        closeSync(serialFd);
        serialFd = -1;
        const serial = readFileSync(join(captureDir, 'serial.log'), 'utf8');
        process.stdout.write(
          `${JSON.stringify({ status, reason: result.reason, detail: result.detail, exitCode: result.exitCode, progress: readProgress(progress.state), serial, vcpus: result.vcpus.map((v) => ({ vcpu: v.vcpu, reason: v.reason, exits: v.exits })) })}\n`,
        );
      } else {
        process.stderr.write(`kiln: ${describe(result)}\n`);
      }
      return status;
    } finally {
      await vm.destroy();
    }
  } finally {
    if (serialFd > 2) closeSync(serialFd);
    if (captureDir) rmSync(captureDir, { recursive: true, force: true });
  }
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'run':
      return run(rest);
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
