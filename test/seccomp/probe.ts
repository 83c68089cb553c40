// Run by seccomp.test.ts in a child process (a process-wide filter would otherwise stay
// on the test runner):
// - `vm`: a ring-3 guest loops on port I/O under Kiln's default filters; prints each
//   thread's seccomp state, then whether the main thread may still exec.
// - `forbidden vcpu|io`: a worker loads that thread's filter and makes a call that is not
//   on its list (mkdir); the process must die of SIGSYS.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { setTimeout as sleep } from 'node:timers/promises';
import { readProgress } from '../../src/devices/progress.js';
import { loadProgram } from '../../src/guest/kit.js';
import { MiB } from '../../src/layout.js';
import { addStandardDevices } from '../../src/platform/standard.js';
import { installProgram } from '../../src/seccomp/install.js';
import { compilePolicy, DEFAULT_POLICY, type ThreadCategory } from '../../src/seccomp/policy.js';
import { Vm } from '../../src/vm.js';

const programs = compilePolicy(DEFAULT_POLICY);

function threadStates(): Array<{ comm: string; seccomp: number; filters: number; noNewPrivs: number }> {
  return readdirSync('/proc/self/task').map((tid) => {
    const status = readFileSync(`/proc/self/task/${tid}/status`, 'utf8');
    const field = (name: string) => Number(new RegExp(`^${name}:\\s*(\\d+)`, 'm').exec(status)?.[1] ?? -1);
    return {
      comm: readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim(),
      seccomp: field('Seccomp'),
      filters: field('Seccomp_filters'),
      noNewPrivs: field('NoNewPrivs'),
    };
  });
}

if (!isMainThread) {
  installProgram(programs[workerData as ThreadCategory], { allThreads: false });
  const dir = join(tmpdir(), `kiln-seccomp-probe-${process.pid}`);
  mkdirSync(dir);
  rmdirSync(dir);
  parentPort!.postMessage('survived');
} else if (process.argv[2] === 'forbidden') {
  const worker = new Worker(new URL(import.meta.url), { workerData: process.argv[3] });
  worker.on('message', (m) => process.stdout.write(`${String(m)}\n`));
} else {
  const vm = Vm.create({ memoryBytes: 4 * MiB, vcpus: 2 });
  const { progress } = addStandardDevices(vm, -1);
  loadProgram(vm, {
    mode: 'protected32',
    cpl: 3,
    source: `mov $PORT_PROGRESS, %dx\n1: inc %eax\n out %eax, %dx\n jmp 1b`,
  });
  await vm.start({ seccomp: programs });
  // The guest has run under the filters (its first progress writes) before it is stopped.
  for (let i = 0; i < 500 && readProgress(progress.state).recent.length === 0; i++) await sleep(10);
  const threads = threadStates();
  await vm.stop();
  const result = await vm.wait();
  const exec = spawnSync('/bin/true');
  process.stdout.write(
    `${JSON.stringify({
      threads,
      exits: result.vcpus.map((v) => v.exits),
      execError: (exec.error as NodeJS.ErrnoException | undefined)?.code ?? null,
    })}\n`,
  );
  await vm.destroy();
}
