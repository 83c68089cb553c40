// kiln-vmm's main (started by vmm-cli.ts): one VM per process behind Firecracker's API, for orchestrators that drive
// Firecracker (Kata Containers, firecracker-containerd, flintlock). Flags as
// Firecracker's: --api-sock, --config-file (the same JSON, booted at once), --no-api,
// --id, --version. SIGTERM stops the VM and exits 0 (SIGHUP, SIGXFSZ, SIGXCPU with
// Firecracker's statuses); when the guest powers off the
// process exits with the guest's status.
import { readFileSync, statSync } from 'node:fs';
import { isatty } from 'node:tty';
import { constants as osConstants } from 'node:os';
import * as libc from './kvm/libc.js';
import type { Server } from 'node:http';
import { parseArgs } from 'node:util';
import { checkInstanceId, parseConfigFile, parseLogger, parseMetrics } from './api/resources.js';
import { FIRECRACKER_API_VERSION, KILN_VERSION, listenApi } from './api/server.js';
import { Vmm } from './api/vmm.js';
import { SerialInput, SerialSocket } from './api/serial-socket.js';
import { describeStateFile, formatVersion, SNAPSHOT_VERSION } from './snapshot/format.js';
import { ConfigError, hasVirtio, parseVmConfig } from './config/vm-config.js';
import { KilnError } from './errors.js';
import { installProcessFilter } from './seccomp/install.js';
import { endWarmWorkers, prewarmUpTo } from './warm-workers.js';
import { MmdsStore } from './mmds/store.js';
import { prepareSpareVm } from './vm.js';
import { rehearse } from './rehearsal.js';
import {
  compilePolicy,
  DEFAULT_POLICY,
  defaultPrograms,
  parseFilterFile,
  policyToJson,
  type SeccompPrograms,
} from './seccomp/policy.js';
import { EXIT_ERROR, EXIT_OK, EXIT_USAGE, vmExitStatus } from './exit-status.js';

const DEFAULT_API_SOCK = '/run/firecracker.socket';

async function main(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        'api-sock': { type: 'string', default: DEFAULT_API_SOCK },
        'config-file': { type: 'string' },
        // Kiln's own: the VM as one VmConfig JSON (what the manager writes; passt NICs, a console socket, CPU templates).
        'kiln-config': { type: 'string' },
        'no-api': { type: 'boolean', default: false },
        id: { type: 'string', default: 'anonymous-instance' },
        // Kiln's own: the serial console as a Unix socket (for `kiln console`).
        'serial-sock': { type: 'string' },
        version: { type: 'boolean', default: false },
        'no-seccomp': { type: 'boolean', default: false },
        'seccomp-filter': { type: 'string' },
        // Kiln's own: prints the built-in filters as a --seccomp-filter file.
        'print-seccomp-filter': { type: 'boolean', default: false },
        // Passed by Firecracker's jailer (and kiln-jailer): when the jailer started, for the boot timer.
        'start-time-us': { type: 'string' },
        'start-time-cpu-us': { type: 'string' },
        'parent-cpu-time-us': { type: 'string' },
        'boot-timer': { type: 'boolean', default: false },
        'describe-snapshot': { type: 'string' },
        'snapshot-version': { type: 'boolean', default: false },
        'http-api-max-payload-size': { type: 'string' },
        // The logger and metrics, as PUT /logger and PUT /metrics would set them.
        'log-path': { type: 'string' },
        level: { type: 'string' },
        'show-level': { type: 'boolean', default: false },
        'show-log-origin': { type: 'boolean', default: false },
        module: { type: 'string' },
        'metrics-path': { type: 'string' },
        // The microVM metadata service's contents and size limit.
        metadata: { type: 'string' },
        'mmds-size-limit': { type: 'string' },
      },
      strict: true,
    }));
  } catch (err) {
    process.stderr.write(
      `kiln-vmm: ${(err as Error).message}\nUsage: kiln-vmm [--api-sock PATH] [--config-file FILE | --kiln-config FILE] [--no-api] [--id ID] [--serial-sock PATH] [--no-seccomp | --seccomp-filter FILE] [--version]\n`,
    );
    return EXIT_USAGE;
  }
  if (values.version) {
    // Orchestrators parse "Firecracker vX.Y.Z" from the first line.
    process.stdout.write(`Firecracker v${FIRECRACKER_API_VERSION} (Kiln ${KILN_VERSION})\n`);
    return 0;
  }
  if (values['print-seccomp-filter']) {
    process.stdout.write(policyToJson(DEFAULT_POLICY));
    return 0;
  }
  if (values['snapshot-version']) {
    // The snapshot format this kiln-vmm writes (and the one it loads).
    process.stdout.write(`${formatVersion(SNAPSHOT_VERSION)}\n`);
    return 0;
  }
  if (values['describe-snapshot'] !== undefined) {
    try {
      process.stdout.write(`${formatVersion(describeStateFile(values['describe-snapshot']))}\n`);
      return 0;
    } catch (err) {
      process.stderr.write(`kiln-vmm: ${(err as Error).message}\n`);
      return EXIT_ERROR;
    }
  }
  const configFile = values['config-file'] ?? values['kiln-config'];
  if (values['config-file'] && values['kiln-config']) {
    process.stderr.write('kiln-vmm: give --config-file or --kiln-config, not both\n');
    return EXIT_USAGE;
  }
  if (values['no-api'] && !configFile) {
    process.stderr.write('kiln-vmm: --no-api needs --config-file (nothing could configure the VM)\n');
    return EXIT_USAGE;
  }
  const log = (line: string) => process.stderr.write(`kiln-vmm: ${line}\n`);
  let id: string;
  try {
    id = checkInstanceId(values.id);
  } catch (err) {
    log((err as Error).message);
    return EXIT_USAGE;
  }
  if (values['no-seccomp'] && values['seccomp-filter']) {
    log('give --no-seccomp or --seccomp-filter, not both');
    return EXIT_USAGE;
  }
  let seccomp: SeccompPrograms | null = null;
  if (!values['no-seccomp']) {
    try {
      const file = values['seccomp-filter'];
      seccomp = file ? compilePolicy(parseFilterFile(readFileSync(file, 'utf8'), file)) : defaultPrograms();
    } catch (err) {
      log((err as Error).message);
      return EXIT_USAGE;
    }
  }
  let numbers;
  try {
    numbers = {
      maxPayload: positiveFlag(values, 'http-api-max-payload-size'),
      startUs: positiveFlag(values, 'start-time-us'),
      startCpuUs: positiveFlag(values, 'start-time-cpu-us'),
      parentCpuUs: positiveFlag(values, 'parent-cpu-time-us'),
      mmdsLimit: positiveFlag(values, 'mmds-size-limit'),
    };
  } catch (err) {
    log((err as Error).message);
    return EXIT_USAGE;
  }
  const serialSocket = values['serial-sock'] ? new SerialSocket(1) : null;
  const vmm = new Vmm(id, serialSocket ? serialSocket.writeFd : 1, log);
  vmm.seccomp = seccomp;
  if (numbers.maxPayload !== undefined) vmm.maxPayloadBytes = numbers.maxPayload;
  if (values['boot-timer'])
    vmm.bootTimer = {
      // Firecracker's: from the jailer's start when it says, else from this process's.
      startUs: numbers.startUs ?? Math.round(performance.timeOrigin * 1000),
      startCpuUs: (numbers.startCpuUs ?? 0) + (numbers.parentCpuUs ?? 0),
    };
  try {
    if (values['log-path'] !== undefined || values.level !== undefined || values.module !== undefined)
      vmm.setLogger(
        parseLogger({
          ...(values['log-path'] !== undefined ? { log_path: values['log-path'] } : {}),
          ...(values.level !== undefined ? { level: values.level } : {}),
          show_level: values['show-level'],
          show_log_origin: values['show-log-origin'],
          ...(values.module !== undefined ? { module: values.module } : {}),
        }),
      );
    if (values['metrics-path'] !== undefined) vmm.setMetrics(parseMetrics({ metrics_path: values['metrics-path'] }));
  } catch (err) {
    log((err as Error).message);
    return EXIT_ERROR;
  }
  // MMDS's data store: its size limit defaults to the API's payload limit, as Firecracker's does.
  vmm.mmds = new MmdsStore(numbers.mmdsLimit ?? vmm.maxPayloadBytes);
  if (values.metadata !== undefined) {
    try {
      // A regular file no larger than the store may hold (never /dev/zero or a FIFO).
      const st = statSync(values.metadata);
      if (!st.isFile()) throw new KilnError('not a regular file');
      if (st.size > vmm.mmds.limitBytes * 4)
        throw new KilnError(`${st.size} bytes: larger than the data store's limit of ${vmm.mmds.limitBytes} bytes`);
      vmm.mmds.put(JSON.parse(readFileSync(values.metadata, 'utf8')));
    } catch (err) {
      log(`cannot use the metadata file ${values.metadata}: ${(err as Error).message}`);
      return EXIT_ERROR;
    }
  }
  // Firecracker feeds its standard input to the guest's serial port (an interactive
  // console for whoever launched it); a terminal is put in raw mode meanwhile.
  const stdinInput = new SerialInput();
  const endStdin = readStdinInto(stdinInput);
  // The process-wide filter goes on before the API is served; the vCPU and I/O threads get theirs at InstanceStart.
  if (seccomp) installProcessFilter(seccomp.process);
  if (serialSocket) await serialSocket.listen(values['serial-sock']!);
  vmm.onStart = (live) => {
    serialSocket?.attach(live.serial);
    stdinInput.attach(live.serial);
  };
  // Handled from before the API socket exists: an orchestrator may SIGTERM as soon as it sees it.
  const stopped = new Promise<number>((resolve) => {
    const stop = () => resolve(EXIT_OK);
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    // Firecracker's fatal signals and their exit statuses: logged, counted in one last metrics line.
    for (const [signal, name, status] of FATAL_SIGNALS)
      process.once(signal, () => {
        vmm.interceptedSignal(name, osConstants.signals[signal]);
        resolve(status);
      });
  });
  // Node ignores SIGPIPE (a write then fails with EPIPE); Firecracker counts it and goes on.
  process.on('SIGPIPE', () => vmm.countSignal('sigpipe'));
  let server: Server | null = null;
  const finish = async (code: number): Promise<number> => {
    endStdin();
    stdinInput.close();
    await vmm.shutdown();
    serialSocket?.close();
    if (server) await new Promise((resolve) => server!.close(resolve));
    return code;
  };
  try {
    if (configFile) {
      let json: unknown;
      try {
        json = JSON.parse(readFileSync(configFile, 'utf8'));
      } catch (err) {
        throw new KilnError(`cannot read the config file ${configFile}: ${(err as Error).message}`);
      }
      if (values['kiln-config']) {
        vmm.config = parseVmConfig(json);
      } else {
        const { changes, settings } = parseConfigFile(json);
        changes.forEach((change) => vmm.apply(change));
        if (settings.logger) vmm.setLogger(settings.logger);
        if (settings.metrics) vmm.setMetrics(settings.metrics);
      }
      // The threads this VM needs start now, while the rest is set up (each is an isolate
      // to start: on two cores, one not needed delays those that are).
      prewarmUpTo('vcpu', vmm.config.cpus);
      if (hasVirtio(vmm.config)) prewarmUpTo('io', 1);
    } else {
      // A vCPU thread and the I/O thread start now, while the API waits for its first
      // request: InstanceStart and /snapshot/load then find them with their modules loaded.
      prewarmUpTo('vcpu', 1);
      prewarmUpTo('io', 1);
    }
    if (!values['no-api'])
      server = await listenApi(values['api-sock'], vmm, { prepare: configFile ? 'at-first-request' : 'soon' });
    // Firecracker's api_server metrics: from the process's (or its jailer's) start to a served API.
    const cpu = process.cpuUsage();
    vmm.startup = {
      us: Math.round(
        (performance.timeOrigin + performance.now()) * 1000 - (numbers.startUs ?? performance.timeOrigin * 1000),
      ),
      cpuUs: cpu.user + cpu.system + (numbers.startCpuUs ?? 0) + (numbers.parentCpuUs ?? 0),
    };
    if (configFile) await vmm.start();
    // Waiting for the API: a rehearsal compiles the build path (rehearsal.ts), then the
    // KVM VM every configuration needs is made, so that InstanceStart and /snapshot/load
    // pay for neither.
    else setImmediate(() => void rehearse().then(prepareSpareVm));
  } catch (err) {
    if (!(err instanceof KilnError)) throw err;
    log(err.message);
    return finish(err instanceof ConfigError ? EXIT_USAGE : EXIT_ERROR);
  }
  const guestEnded = vmm.ended.then(vmExitStatus);
  return finish(await Promise.race([stopped, guestEnded]));
}

/** Signals that end kiln-vmm as they end Firecracker, with its exit statuses. */
const FATAL_SIGNALS = [
  ['SIGHUP', 'sighup', 156],
  ['SIGXFSZ', 'sigxfsz', 151],
  ['SIGXCPU', 'sigxcpu', 154],
] as const;

/** A flag's whole number (at least 0), or undefined when it is not given; throws when it is not one. */
function positiveFlag(values: Record<string, unknown>, name: string): number | undefined {
  const text = values[name];
  if (text === undefined) return undefined;
  if (typeof text !== 'string' || !/^\d+$/.test(text) || !Number.isSafeInteger(Number(text)))
    throw new KilnError(`--${name} must be a whole number (got ${String(text)})`);
  return Number(text);
}

/**
 * Feeds standard input to `input` until the returned function is called: a terminal in
 * raw mode (restored then), a pipe or a file as it comes; /dev/null or a closed stdin
 * simply ends. A source faster than the guest reads is paused.
 */
function readStdinInto(input: SerialInput): () => void {
  // A terminal is taken only by a foreground job: a background one (`kiln-vmm ... &`)
  // that read it or changed its mode would be stopped by the terminal (SIGTTIN/SIGTTOU).
  if (isatty(0) && libc.tcgetpgrp(0) !== libc.getpgrp()) return () => undefined;
  const stdin = process.stdin;
  const tty = stdin.isTTY === true;
  if (tty) stdin.setRawMode(true);
  const onData = (data: Buffer) => {
    if (!input.feed(data)) stdin.pause();
  };
  input.onRoom = () => stdin.resume();
  stdin.on('data', onData);
  stdin.on('error', () => undefined);
  // The VMM must not stay alive for its stdin alone.
  (stdin as unknown as { unref?: () => void }).unref?.();
  return () => {
    stdin.off('data', onData);
    if (tty) stdin.setRawMode(false);
    stdin.pause();
    stdin.destroy();
  };
}

/** Runs kiln-vmm with `argv` (vmm-cli.ts has started a vCPU thread ahead, if it is needed). */
export async function runVmm(argv: string[]): Promise<void> {
  process.exitCode = await main(argv);
  await endWarmWorkers();
  // The vCPU and I/O worker threads are gone; nothing else should hold the process.
  setTimeout(() => process.exit(), 200).unref();
}
