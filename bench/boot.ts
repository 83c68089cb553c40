// `npm run bench -- boot`: boot time to the guest's init marker, VMM start-up (process
// start to first KVM_RUN) and VMM memory overhead, Kiln against QEMU (Debian's
// qemu-system-x86, -M microvm with the same kernel, initrd, memory and command line).
//
// - boot: from spawning the VMM to the init's "KILN_INIT" line on the serial console.
// - start-up: under strace (both VMMs alike), from the VMM's execve to its first KVM_RUN.
// - overhead: at the init marker, the VMM's resident memory (smaps) minus the resident
//   part of the guest-RAM mapping.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { composeCmdline } from '../src/boot/linux.js';
import { isSoftwareKvm } from '../src/compat/pvm.js';
import { cpuTemplate } from '../src/cpu/templates.js';
import { buildInitramfs, buildMinimalKernel, ensurePackages } from '../src/guestkit/build.js';
import { overheadMiB, type BenchContext } from './util.js';

const MEMORY_MIB = 128;
const BOOT_LIMIT_MS = 3 * 60_000;
const cli = fileURLToPath(new URL('../src/cli.cjs', import.meta.url));

interface BootRun {
  seconds: number | null;
  overheadMiB: number | null;
  note: string;
}

/** Runs a VMM until the init marker appears on its stdout (or it fails), then stops it. */
function bootOnce(cmd: string, args: string[], marker: RegExp, log?: (line: string) => void): Promise<BootRun> {
  return new Promise((resolve) => {
    const started = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KILN_TIMING: '1' } });
    let out = '';
    let done = false;
    const finish = (run: BootRun) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      resolve(run);
    };
    const timer = setTimeout(
      () => finish({ seconds: null, overheadMiB: null, note: `no init marker within ${BOOT_LIMIT_MS / 1000} s` }),
      BOOT_LIMIT_MS,
    );
    const onData = (chunk: Buffer) => {
      out += chunk.toString();
      if (out.length > 1_000_000) out = out.slice(-100_000);
      const timing = /timing: first KVM_RUN ([\d.]+) ms/.exec(out);
      if (timing && log) {
        log(`  Kiln reports its first KVM_RUN ${timing[1]} ms after its process started (no strace)`);
        log = undefined;
      }
      if (marker.test(out)) {
        const seconds = Number(process.hrtime.bigint() - started) / 1e9;
        finish({ seconds, overheadMiB: overheadMiB(child.pid!, MEMORY_MIB), note: 'reached init' });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => {
      const tail = out.trim().split('\n').slice(-3).join(' | ');
      finish({ seconds: null, overheadMiB: null, note: `exited with ${code} before init: ${tail}` });
    });
  });
}

/** Milliseconds from execve to the first KVM_RUN, from an strace of the VMM (killed after). */
function startupMs(traceFile: string, cmd: string, args: string[]): number | null {
  // SIGKILL to the whole group (strace and the VMM), so the VMM does not run on untraced.
  spawnSync(
    'timeout',
    ['-s', 'KILL', '15', 'strace', '-f', '-ttt', '-e', 'trace=execve,ioctl', '-o', traceFile, cmd, ...args],
    { stdio: 'ignore' },
  );
  const lines = existsSync(traceFile) ? readFileSync(traceFile, 'utf8').split('\n') : [];
  const ts = (line: string | undefined) =>
    line ? Number(/^\d+\s+(\d+\.\d+)/.exec(line)?.[1] ?? /^(\d+\.\d+)/.exec(line)?.[1]) : NaN;
  const exec = ts(lines.find((l) => l.includes('execve(')));
  const run = ts(lines.find((l) => l.includes('KVM_RUN')));
  return Number.isFinite(exec) && Number.isFinite(run) ? (run - exec) * 1000 : null;
}

export async function benchBoot(ctx: BenchContext): Promise<void> {
  const kernel = await buildMinimalKernel(ctx.log);
  const initrd = await buildInitramfs(ctx.log);
  ensurePackages(['qemu-system-x86', 'strace'], 'the boot benchmark', ctx.log);
  const softwareKvm = isSoftwareKvm();
  const cmdline = composeCmdline('', cpuTemplate(softwareKvm ? 'pvm' : 'host'), softwareKvm);
  const kilnArgs = [
    cli,
    'run',
    '--kernel',
    kernel.vmlinux,
    '--initrd',
    initrd.path,
    '--memory',
    `${MEMORY_MIB}M`,
    '--cpus',
    '1',
  ];
  const qemuArgs = [
    '-M',
    'microvm,accel=kvm',
    '-cpu',
    'host',
    '-m',
    `${MEMORY_MIB}M`,
    '-smp',
    '1',
    '-nodefaults',
    '-no-user-config',
    '-nographic',
    '-serial',
    'stdio',
    '-no-reboot',
    '-kernel',
    kernel.vmlinux,
    '-initrd',
    initrd.path,
    '-append',
    cmdline,
  ];
  const marker = /KILN_INIT /;

  ctx.log(`kernel ${kernel.vmlinux}, ${MEMORY_MIB} MiB, 1 vCPU, cmdline: ${cmdline}`);
  const kiln = await bootOnce(process.execPath, kilnArgs, marker, ctx.log);
  ctx.log(`  Kiln: ${kiln.seconds === null ? 'failed' : `${kiln.seconds.toFixed(2)} s`} (${kiln.note})`);
  const qemuPath = '/usr/bin/qemu-system-x86_64';
  const qemu = existsSync(qemuPath)
    ? await bootOnce(qemuPath, qemuArgs, marker)
    : { seconds: null, overheadMiB: null, note: 'qemu-system-x86_64 not installed' };
  ctx.log(`  QEMU: ${qemu.seconds === null ? 'failed' : `${qemu.seconds.toFixed(2)} s`} (${qemu.note})`);
  if (qemu.seconds === null && softwareKvm) {
    ctx.log(
      '  QEMU did not reach init on software KVM (kvm_pvm); its own error is above. It has none of the workarounds Kiln applies there.',
    );
  }
  const kilnStart = startupMs(join(ctx.dir, 'kiln.strace'), process.execPath, kilnArgs);
  const qemuStart = existsSync(qemuPath) ? startupMs(join(ctx.dir, 'qemu.strace'), qemuPath, qemuArgs) : null;
  ctx.log(
    `  start-up (execve to first KVM_RUN, under strace): Kiln ${kilnStart?.toFixed(1) ?? 'n/a'} ms, QEMU ${qemuStart?.toFixed(1) ?? 'n/a'} ms`,
  );
  ctx.log(
    `  VMM memory overhead at the init marker: Kiln ${kiln.overheadMiB?.toFixed(1) ?? 'n/a'} MiB, QEMU ${qemu.overheadMiB?.toFixed(1) ?? 'n/a'} MiB`,
  );
  const f = (v: number | null, digits: number) => (v === null ? 'failed' : v.toFixed(digits));
  ctx.result(
    `boot kiln_s=${f(kiln.seconds, 2)} qemu_s=${f(qemu.seconds, 2)} kiln_startup_ms=${f(kilnStart, 1)} qemu_startup_ms=${f(qemuStart, 1)} kiln_overhead_mib=${f(kiln.overheadMiB, 1)} qemu_overhead_mib=${f(qemu.overheadMiB, 1)}`,
  );
}
