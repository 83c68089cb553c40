#!/usr/bin/env node
// The `kiln` command: `kiln run` boots a guest in this process; `kiln guest build`
// builds the guest kit; the VM-manager verbs (create, start, ...) talk to the daemon.
// Every verb has its own options (commander): an option another verb takes is refused.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import { configFromFlags, type VmFlags } from './config/flags.js';
import { ConfigError } from './config/vm-config.js';
import { CPU_TEMPLATES } from './cpu/templates.js';
import type { DeviceSpec } from './devices/catalogue.js';
import type { SerialHost } from './devices/serial.js';
import { KilnError } from './errors.js';
import { EXIT_ERROR, EXIT_USAGE, vmExitStatus } from './exit-status.js';
import { KILN_VERSION } from './version.js';
import type { Vm, VmResult } from './vm.js';

/**
 * What `kiln run` (a VM in this process) and `kiln guest build` need, loaded only for them:
 * the manager's verbs and `--version` start without koffi, the device models or the guest
 * kit (the manager's code is loaded only for its verbs, below).
 */
const runtime = async () => {
  const [linux, relay, demo, progressState, standard, vm, policy, kit] = await Promise.all([
    import('./boot/linux.js'),
    import('./console-relay.js'),
    import('./demo.js'),
    import('./devices/progress.js'),
    import('./platform/standard.js'),
    import('./vm.js'),
    import('./seccomp/policy.js'),
    import('./guestkit/build.js'),
  ]);
  return { ...linux, ...relay, ...demo, ...progressState, ...standard, ...vm, ...policy, ...kit };
};

class UsageError extends KilnError {}

const progress = (line: string) => process.stderr.write(`kiln: ${line}\n`);

function describe(result: VmResult): string {
  if (result.reason === 'guest-exit')
    return result.reset ? `the guest rebooted (${result.detail})` : `${result.detail}; exit status ${result.exitCode}`;
  const lines = [`VM ended: ${result.detail}`];
  for (const v of result.vcpus) {
    if (!v.regs) continue;
    const r = v.regs as Record<string, bigint>;
    const hex = (n: bigint | undefined) => `0x${(n ?? 0n).toString(16)}`;
    lines.push(
      `  vcpu${v.vcpu} (${v.reason}): rip=${hex(r.rip)} rsp=${hex(r.rsp)} rflags=${hex(r.rflags)} rax=${hex(r.rax)} rcx=${hex(r.rcx)} rdx=${hex(r.rdx)}`,
    );
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

const collect = (value: string, previous: string[]) => [...previous, value];

/** The VM options `kiln run` and `kiln create` share (one grammar: src/config/flags.ts). */
function addVmOptions(cmd: Command): Command {
  return cmd
    .option('--kernel <path>', 'a Linux kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage')
    .option('--initrd <path>', 'an initramfs or initrd')
    .option('--cmdline <text>', 'extra kernel command line (Kiln adds console=ttyS0 and what the CPU template needs)')
    .option('--memory <size>', 'guest RAM: MiB, or with a unit (128M, 1G); default 128M')
    .option('--cpus <n>', 'number of vCPUs (1-254); default 1')
    .addOption(
      new Option('--cpu-template <name>', 'CPU template (default: pvm on software KVM, host elsewhere)').choices(
        Object.keys(CPU_TEMPLATES),
      ),
    )
    .option(
      '--disk <spec>',
      'PATH[,ro][,root][,serial=ID][,id=ID]: a raw disk image as a virtio-blk drive (repeatable; the root disk is /dev/vda)',
      collect,
      [],
    )
    .option(
      '--net <spec>',
      'tap=NAME[,mac=MAC][,id=ID] | passt=SOCKET[,mac=MAC][,id=ID]: a virtio-net NIC (repeatable)',
      collect,
      [],
    )
    .option('--rng', "an entropy device (virtio-rng, fed by the host's getrandom)")
    .option(
      '--vsock <spec>',
      'CID,SOCKET: vsock for guest CID; host clients connect to SOCKET and send "CONNECT <port>"',
    )
    .option('--console-socket <path>', 'a virtio console (hvc0) on a Unix socket Kiln listens on')
    .option('--balloon <size>', 'a memory balloon, starting at SIZE (e.g. 0, 64M)');
}

interface CreateValues {
  json?: boolean;
  file?: string;
  cpuWeight?: string;
  cpuQuota?: string;
  pin?: string;
}

interface RunValues extends VmFlags {
  demo?: boolean;
  onReboot: string;
  hostDecompress?: boolean;
  json?: boolean;
  verbose?: boolean;
  seccomp: boolean;
}

async function run(values: RunValues): Promise<number> {
  const rt = await runtime();
  const { addStandardDevices, buildInitramfs, buildMinimalKernel, createLinuxVm, defaultPrograms } = rt;
  const { loadDemo, readProgress, relayStdin, Vm } = rt;
  if (values.demo && (values.kernel || values.initrd))
    throw new UsageError('--demo and --kernel/--initrd are different guests: choose one');
  if (values.onReboot !== 'exit' && values.onReboot !== 'restart')
    throw new UsageError(`--on-reboot must be 'exit' or 'restart' (got '${values.onReboot}')`);
  let config = configFromFlags(values);
  const virtioWanted =
    config.disks.length > 0 ||
    config.nets.length > 0 ||
    config.rng ||
    config.vsock ||
    config.consoleSocket ||
    config.balloon;
  if (values.demo && virtioWanted)
    throw new UsageError(
      'virtio devices (--disk, --net, --rng, --vsock, --console-socket, --balloon) need a Linux guest, not --demo',
    );
  const memoryBytes = config.memoryMiB * 1024 * 1024;
  const cpus = config.cpus;

  if (!values.demo && config.kernel === undefined) {
    // The default guest: the kit's minimal Linux and test init.
    config = {
      ...config,
      kernel: (await buildMinimalKernel(progress)).vmlinux,
      initrd: (await buildInitramfs(progress)).path,
    };
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
            const lv = createLinuxVm(config, {
              serialOutFd: serialFd,
              logUnhandled: values.verbose,
              hostDecompress: values.hostDecompress,
            });
            if (!values.json)
              progress(
                `booting ${config.kernel} (${lv.boot.format}, ${cpus} vCPU, ${config.memoryMiB}M); Ctrl-A x quits`,
              );
            return {
              vm: lv.vm,
              progress: lv.progress,
              serial: lv.serial,
              pressPowerButton: () => lv.pressPowerButton(),
            };
          })();
      const { vm } = prepared;
      let result: VmResult;
      try {
        const started = Date.now();
        // The same filters as kiln-vmm's (the process-wide one goes on once, at the first start).
        await vm.start({ seccomp: values.seccomp ? defaultPrograms() : null });
        if (process.env.KILN_TIMING)
          progress(
            `timing: first KVM_RUN ${(vm.firstRunAt - performance.timeOrigin).toFixed(1)} ms after process start`,
          );
        const detach =
          values.json || !prepared.serial
            ? () => undefined
            : relayStdin({
                send: (b) => void prepared.serial!.input(b),
                quit: () => void vm.stop(),
                powerButton: () => prepared.pressPowerButton(),
              });
        const stopOnSignal = () => void vm.stop();
        process.once('SIGINT', stopOnSignal);
        process.once('SIGTERM', stopOnSignal);
        result = await vm.wait();
        process.off('SIGINT', stopOnSignal);
        process.off('SIGTERM', stopOnSignal);
        detach();
        const status = vmExitStatus(result);
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
              vcpus: result.vcpus.map((v) => ({
                vcpu: v.vcpu,
                reason: v.reason,
                exits: v.exits,
                compat: v.compat ?? {},
              })),
            })}\n`,
          );
        } else {
          process.stderr.write(`\nkiln: ${describe(result)}\n`);
          if (summary) process.stderr.write(`kiln: ${summary}\n`);
        }
        if (result.reset && values.onReboot === 'restart' && !captureDir) {
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

async function guest(artifacts: string[], values: { json?: boolean }): Promise<number> {
  const { buildCloudKernel, buildInitramfs, buildMinimalKernel, buildRootfs, cacheDir } = await runtime();
  const wanted = artifacts.length ? artifacts : ['minimal-kernel', 'initramfs'];
  const builders: Record<string, () => Promise<Record<string, string | boolean>>> = {
    'minimal-kernel': async () => ({ ...(await buildMinimalKernel(progress)) }),
    initramfs: async () => ({ ...(await buildInitramfs(progress)) }),
    rootfs: async () => ({ ...(await buildRootfs(progress)) }),
    'cloud-kernel': async () => ({ ...(await buildCloudKernel(progress)) }),
  };
  for (const a of wanted)
    if (!Object.hasOwn(builders, a))
      throw new UsageError(`unknown guest artifact '${a}' (known: ${Object.keys(builders).join(', ')})`);
  const out: Record<string, Record<string, string | boolean>> = {};
  for (const a of wanted) {
    progress(`guest kit: ${a}`);
    const built = await builders[a]!();
    out[a] = built;
    if (!values.json)
      process.stdout.write(
        `${a}: ${Object.entries(built)
          .filter(([k]) => k !== 'built')
          .map(([k, v]) => `${k}=${v}`)
          .join(' ')}${built.built ? '' : ' (cached)'}\n`,
      );
  }
  if (values.json) process.stdout.write(`${JSON.stringify({ cache: cacheDir(), artifacts: out })}\n`);
  return 0;
}

/** The manager's implementation, loaded only for its verbs: `kiln run` starts faster without it. */
const manager = () => import('./manager/commands.js');

function program(setStatus: (status: number) => void): Command {
  const kiln = new Command('kiln')
    .description('A virtual machine monitor and VM manager for Linux/KVM')
    .version(`kiln ${KILN_VERSION}`, '-V, --version', "print Kiln's version")
    .helpCommand('help [command]', 'help for a command')
    .showHelpAfterError()
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(`kiln: ${text.replace(/^error: /, '')}`) });
  const done = (p: Promise<number>) => p.then(setStatus);

  addVmOptions(
    kiln
      .command('run')
      .description(
        "boot a guest and attach its serial console (Ctrl-A x quits, Ctrl-A p presses the power button); with no guest named, the kit's minimal Linux",
      ),
  )
    .option('--demo', 'boot the built-in demo guest instead')
    .option(
      '--host-decompress',
      "decompress a bzImage's payload on the host and boot the ELF inside (fast on software KVM)",
    )
    .addOption(
      new Option('--on-reboot <what>', 'what a guest reboot does').choices(['exit', 'restart']).default('exit'),
    )
    .option('--json', 'print one JSON result (with the serial output) instead of attaching the console')
    .option('--verbose', 'log unhandled port and MMIO accesses (once each)')
    .option('--no-seccomp', "debugging only: run without kiln-vmm's seccomp filters")
    .action((values: RunValues) => done(run(values)));

  kiln
    .command('guest')
    .description('the guest kit')
    .command('build')
    .description('build guest kit artifacts into the cache (default: minimal-kernel initramfs)')
    .argument('[artifact...]', 'minimal-kernel, initramfs, rootfs, cloud-kernel')
    .option('--json', "print the artifacts' paths as JSON")
    .action((artifacts: string[], values: { json?: boolean }) => done(guest(artifacts, values)));

  kiln
    .command('version')
    .description("print Kiln's version")
    .action(() => {
      process.stdout.write(`kiln ${KILN_VERSION}\n`);
      setStatus(0);
    });

  const verb = (name: string, description: string) =>
    kiln.command(name).description(description).option('--json', 'print one JSON document');
  addVmOptions(
    verb('create', 'define a VM (flags, or -f FILE with the same fields as JSON or YAML)').argument(
      '[name]',
      'its name (lower-case letters, digits, -)',
    ),
  )
    .option('-f, --file <path>', 'a definition file, JSON or YAML (name, kernel, cpus, memoryMiB, disks, nets, ...)')
    .option('--cpu-weight <n>', 'cgroup CPU weight, 1-10000 (default 100)')
    .option('--cpu-quota <percent>', 'at most this many percent of one host CPU (default: no quota)')
    .option('--pin <cpus>', 'host CPUs for the vCPU threads, e.g. 0,1 (vCPU N on the (N mod count)-th)')
    .action(async (name: string | undefined, values: VmFlags & CreateValues) =>
      done((await manager()).create(name, { ...values, vm: values })),
    );
  verb('start', 'start a VM (its VMM jailed: own uid, chroot, namespaces, seccomp)')
    .argument('<name>')
    .option('--no-jail', "debugging only: run the VMM as root in the host's namespaces (kiln info says so)")
    .action(async (name: string, values: { json?: boolean; jail?: boolean }) =>
      done((await manager()).lifecycle('start', name, values)),
    );
  verb('stop', 'stop a VM: the ACPI power button, then SIGTERM after 30 s')
    .argument('<name>')
    .option('--force', 'stop it at once (SIGTERM)')
    .action(async (name: string, values: { json?: boolean; force?: boolean }) =>
      done((await manager()).lifecycle('stop', name, values)),
    );
  verb('restart', 'stop a VM, then start it')
    .argument('<name>')
    .option('--no-jail', "debugging only: run the VMM as root in the host's namespaces")
    .action(async (name: string, values: { json?: boolean; jail?: boolean }) =>
      done((await manager()).lifecycle('restart', name, values)),
    );
  verb('pause', 'pause a running VM')
    .argument('<name>')
    .action(async (name: string, values: { json?: boolean }) =>
      done((await manager()).lifecycle('pause', name, values)),
    );
  verb('resume', 'resume a paused VM')
    .argument('<name>')
    .action(async (name: string, values: { json?: boolean }) =>
      done((await manager()).lifecycle('resume', name, values)),
    );
  verb('ls', 'list the VMs (and the definitions that are broken)').action(async (values: { json?: boolean }) =>
    done((await manager()).list(values)),
  );
  verb('info', "a VM's state, resources, cgroup and console log")
    .argument('<name>')
    .action(async (name: string, values: { json?: boolean }) => done((await manager()).info(name, values)));
  verb('pool', "the daemon's pool of VMMs started ahead (kiln daemon --pool N)").action(
    async (values: { json?: boolean }) => done((await manager()).pool(values)),
  );
  verb(
    'dashboard',
    'serve the web dashboard from the daemon (loopback unless --listen says otherwise) and print a one-time address that opens it',
  )
    .option('--listen <addr:port>', 'where it serves (default 127.0.0.1:7070; port 0: any free port)')
    .action(async (values: { json?: boolean; listen?: string }) => done((await manager()).dashboard(values)));
  verb('logs', "a VM's console log")
    .argument('<name>')
    .option('--bytes <n>', 'the last N bytes (default 65536)')
    .action(async (name: string, values: { json?: boolean; bytes?: string }) =>
      done((await manager()).logs(name, values)),
    );
  kiln
    .command('console')
    .description(
      "a VM's serial console: the scroll-back, then live (Ctrl-A x detaches); piped input is typed into the guest until it ends",
    )
    .argument('<name>')
    .option(
      '--linger <seconds>',
      'with piped input: keep printing until the guest has been quiet this long after the input ends',
      '2',
    )
    .action(async (name: string, values: { linger: string }) =>
      done((await manager()).console(name, progress, values.linger)),
    );
  const snap = verb('snapshot', "save a running VM's whole state and writable disks (paused meanwhile)")
    .argument('<name>')
    .argument('[tag]', "the snapshot's name (default: snap-YYYYMMDD-HHMMSS)")
    .option('--diff', 'only the memory changed since the last snapshot of this run (or the one it was restored from)')
    .action(async (name: string, tag: string | undefined, values: { json?: boolean; diff?: boolean }) =>
      done((await manager()).snapshot(name, tag, values)),
    );
  snap
    .command('rm')
    .description('remove a snapshot')
    .argument('<name>')
    .argument('<tag>')
    .option('--json', 'print one JSON document')
    // --json after the arguments is the parent's option too (commander): read both.
    .action(async (name: string, tag: string, _values: unknown, cmd: Command) =>
      done((await manager()).snapshotRemove(name, tag, cmd.optsWithGlobals<{ json?: boolean }>())),
    );
  snap
    .command('merge')
    .description('make a diff snapshot whole (its chain laid over the full one), so those under it can be removed')
    .argument('<name>')
    .argument('<tag>')
    .option('--json', 'print one JSON document')
    .action(async (name: string, tag: string, _values: unknown, cmd: Command) =>
      done((await manager()).snapshotMerge(name, tag, cmd.optsWithGlobals<{ json?: boolean }>())),
    );
  verb('snapshots', "a VM's snapshots")
    .argument('<name>')
    .action(async (name: string, values: { json?: boolean }) => done((await manager()).snapshots(name, values)));
  verb('restore', 'start a stopped VM from a snapshot, its writable disks put back as they were')
    .argument('<name>')
    .argument('<tag>')
    .option('--no-jail', "debugging only: run the VMM as root in the host's namespaces")
    .action(async (name: string, tag: string, values: { json?: boolean; jail?: boolean }) =>
      done((await manager()).restore(name, tag, values)),
    );
  verb('clone', 'a new VM running from a snapshot of NAME (taken now unless --from), beside it')
    .argument('<name>')
    .argument('<newname>')
    .option('--from <tag>', 'an existing snapshot of NAME')
    .option(
      '--net <spec>',
      "each network interface's own TAP or passt socket: id=ID,tap=NAME or id=ID,passt=SOCKET (repeatable)",
      (value: string, previous: string[] = []) => [...previous, value],
    )
    .action(async (name: string, newName: string, values: { json?: boolean; from?: string; net?: string[] }) =>
      done((await manager()).clone(name, newName, values)),
    );
  verb('rm', 'remove a stopped VM (or a broken definition)')
    .argument('<name>')
    .action(async (name: string, values: { json?: boolean }) => done((await manager()).remove(name, values)));
  verb('migrate', 'move a running VM to the kiln daemon on another host (live: it keeps running meanwhile)')
    .argument('<name>')
    .requiredOption('--to <addr:port>', "the other host's daemon (kiln daemon --listen there)")
    .requiredOption('--token-file <file>', 'the token both daemons share (its first line; mode 600)')
    .option('--downtime-ms <ms>', 'the longest pause the guest may see at the switch-over (default 300)')
    .option('--copy-disks', "stream the disk images too, into new files under the other host's state directory")
    .option(
      '--tls-ca <file>',
      "encrypt the migration: the other daemon's certificate (kiln daemon --tls-cert) must chain to this PEM CA",
    )
    .action(async (name: string, _v: unknown, cmd: Command) =>
      done(
        (await manager()).migrate(
          name,
          cmd.optsWithGlobals() as {
            json?: boolean;
            to: string;
            tokenFile: string;
            downtimeMs?: string;
            copyDisks?: boolean;
            tlsCa?: string;
          },
        ),
      ),
    );
  verb('upgrade', 'move a running VM into a new VMM of the Kiln installed now, without rebooting it')
    .argument('<name>')
    .action(async (name: string, values: { json?: boolean }) => done((await manager()).upgrade(name, values)));
  kiln
    .command('daemon')
    .description('run the manager in the foreground (the verbs start it when needed)')
    .option('--listen <addr:port>', 'also take migrations from other hosts on this TCP address')
    .option('--token-file <file>', 'the token migrations must be signed with (with --listen; mode 600)')
    .option('--tls-cert <file>', 'take migrations over TLS with this PEM certificate (chain) (with --listen)')
    .option('--tls-key <file>', "the certificate's PEM private key (with --tls-cert; mode 600)")
    .option(
      '--pool <n>',
      'keep N jailed VMMs started ahead for the next start or restore (default: daemon.json, else 0)',
    )
    .action(async (values: { listen?: string; tokenFile?: string; tlsCert?: string; tlsKey?: string; pool?: string }) =>
      done((await manager()).daemon(progress, values)),
    );
  return kiln;
}

async function main(argv: string[]): Promise<number> {
  let status = EXIT_USAGE;
  const kiln = program((s) => (status = s));
  if (argv.length === 0) {
    process.stderr.write(kiln.helpInformation());
    return EXIT_USAGE;
  }
  try {
    await kiln.parseAsync(argv, { from: 'user' });
  } catch (err) {
    if (!(err instanceof CommanderError)) throw err;
    // Help and version are successes; everything else commander refuses is a usage error.
    return err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help'
      ? 0
      : EXIT_USAGE;
  }
  return status;
}

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
  },
  (err: unknown) => {
    if (err instanceof ConfigError || err instanceof UsageError) {
      process.stderr.write(`kiln: ${err.message}\n`);
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
