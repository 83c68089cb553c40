// `npm run bench -- snapshot`: kiln-vmm's snapshots of the kit's Linux (booted to its
// shell) at 128 MiB, 1 GiB and 4 GiB of RAM, side by side with booting the same guest:
//
// - restore: from PUT /snapshot/load to the first KVM_RUN of the restored guest (kiln-vmm
//   times it and logs it), and the load request's round trip as the client sees it; the
//   load is sent 1 s after kiln-vmm serves its API (a VMM started ahead, as in a pool);
// - answer: from PUT /snapshot/load to the restored shell's answer on the serial console,
//   against a cold boot's time to the same answer;
// - create: PUT /snapshot/create's round trip on the paused VM, and the files' sizes (the
//   memory file is sparse: its size on disk is what it costs);
// - diff: the first 128 MiB restore is loaded with track_dirty_pages; after its shell
//   answered, a Diff snapshot: its create time and its memory file's size on disk.
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildInitramfs, buildMinimalKernel } from '../src/guestkit/build.js';
import { ask, bootShell, pauseAndSnapshot, put, startVmm } from '../test/vmm-driver.js';
import { median, type BenchContext } from './util.js';

const SIZES_MIB = [128, 1024, 4096];
const RESTORES = 3;
const WARM_MS = 1000;
const mib = (bytes: number) => bytes / (1024 * 1024);

export async function benchSnapshot(ctx: BenchContext): Promise<void> {
  const kernel = await buildMinimalKernel(ctx.log);
  const initrd = await buildInitramfs(ctx.log);
  const rows: Record<string, number> = {};
  let coldAnswerMs = 0;
  for (const size of SIZES_MIB) {
    const state = join(ctx.dir, `linux-${size}.snap`);
    const mem = join(ctx.dir, `linux-${size}.mem`);
    const a = await startVmm(ctx.dir, `boot-${size}`);
    try {
      const boot = await bootShell(a, { kernel: kernel.vmlinux, initrd: initrd.path, memoryMiB: size }, 900);
      if (size === 128) coldAnswerMs = boot;
      ctx.log(`${size} MiB: cold boot to the shell's answer ${(boot / 1000).toFixed(1)} s`);
      rows[`create_${size}`] = await pauseAndSnapshot(a, state, mem);
    } finally {
      a.child.kill('SIGKILL');
      await a.exited;
    }
    rows[`state_kib_${size}`] = statSync(state).size / 1024;
    rows[`mem_disk_mib_${size}`] = mib(statSync(mem).blocks * 512);
    const loads: number[] = [];
    const trips: number[] = [];
    const answers: number[] = [];
    for (let i = 0; i < RESTORES; i++) {
      const b = await startVmm(ctx.dir, `restore-${size}-${i}`);
      try {
        // A VMM started ahead of the load (as a pool keeps them): its warm worker threads
        // have loaded their modules by the time the load arrives.
        await sleep(WARM_MS);
        const t0 = performance.now();
        const diff = size === 128 && i === 0;
        await put(b.api, '/snapshot/load', {
          snapshot_path: state,
          mem_backend: { backend_type: 'File', backend_path: mem },
          resume_vm: true,
          ...(diff ? { track_dirty_pages: true } : {}),
        });
        trips.push(performance.now() - t0);
        const own = /snapshot loaded: .* in ([\d.]+) ms/.exec(b.output());
        if (own) loads.push(Number(own[1]));
        await ask(b, `echo restored-${i}-$((6*7))`, new RegExp(`restored-${i}-42`), 120);
        answers.push(performance.now() - t0);
        if (diff) {
          await put(b.api, '/vm', { state: 'Paused' }, 'PATCH');
          const d0 = performance.now();
          const diffMem = join(ctx.dir, 'linux-diff.mem');
          await put(b.api, '/snapshot/create', {
            snapshot_path: join(ctx.dir, 'linux-diff.snap'),
            mem_file_path: diffMem,
            snapshot_type: 'Diff',
          });
          rows.diff_create = performance.now() - d0;
          rows.diff_disk_mib = mib(statSync(diffMem).blocks * 512);
          ctx.log(
            `128 MiB: a Diff after the restored shell's first answer: ${rows.diff_disk_mib.toFixed(2)} MiB on disk, created in ${rows.diff_create.toFixed(0)} ms`,
          );
        }
      } finally {
        b.child.kill('SIGKILL');
        await b.exited;
      }
    }
    rows[`restore_${size}`] = median(loads);
    rows[`trip_${size}`] = median(trips);
    rows[`answer_${size}`] = median(answers);
    ctx.log(
      `${size} MiB: load to first KVM_RUN ${median(loads).toFixed(1)} ms (client round trip ${median(trips).toFixed(1)} ms), to the shell's answer ${median(answers).toFixed(0)} ms; create ${rows[`create_${size}`]!.toFixed(0)} ms; state ${rows[`state_kib_${size}`]!.toFixed(0)} KiB, memory ${mib(size * 1024 * 1024)} MiB (${rows[`mem_disk_mib_${size}`]!.toFixed(1)} MiB on disk)`,
    );
  }
  ctx.log(
    `cold boot of the 128 MiB guest to its shell's answer: ${(coldAnswerMs / 1000).toFixed(1)} s, against ${rows.answer_128!.toFixed(0)} ms restored`,
  );
  const f = (n: number) => n.toFixed(1);
  ctx.result(
    `snapshot restore_ms_128m=${f(rows.restore_128!)} restore_ms_1g=${f(rows.restore_1024!)} restore_ms_4g=${f(rows.restore_4096!)} create_ms_128m=${f(rows.create_128!)} mem_file_mib_128m=${f(rows.mem_disk_mib_128!)} diff_file_mib=${rows.diff_disk_mib!.toFixed(2)} diff_create_ms_128m=${f(rows.diff_create!)} answer_ms_128m=${rows.answer_128!.toFixed(0)} cold_answer_ms_128m=${coldAnswerMs.toFixed(0)}`,
  );
}
