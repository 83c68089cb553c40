// `npm run bench -- migrate`: live migration of the kit's Linux (booted to its shell)
// between kiln-vmm processes on this host, at 256 MiB and 1 GiB of RAM:
//
// - idle: over loopback TCP, the guest's shell waiting;
// - dirtying: over loopback TCP, the guest filling a 4 MiB buffer over and over (dd from
//   /dev/zero), no bandwidth cap;
// - upgrade (1 GiB): a live upgrade into a new kiln-vmm on the same host, over a Unix
//   socket, as `kiln upgrade` moves a VM: its guest memory file opened again through
//   /proc and inherited by the new VMM (fd 3), nothing copied; beside it, the same move
//   with memory copied (a VM whose RAM is private), for comparison.
//
// The guest's RAM is a shared memory file throughout (machine-config shared_memory, as the
// manager's VMs have it), so the TCP rows copy shmem-backed memory.
//
// For each: total time (PUT /migration/send to the destination running the VM), downtime
// (the source's vCPUs stopping to the destination resuming them, measured by the
// destination), MiB sent and pre-copy iterations.
import { closeSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildInitramfs, buildMinimalKernel } from '../src/guestkit/build.js';
import { unixHttp } from '../src/manager/manager.js';
import { openGuestMemoryOf } from '../src/memory/shared-memory.js';
import { ask, bootShell, put, startVmm, type RunningVmm } from '../test/vmm-driver.js';
import type { BenchContext } from './util.js';

const SIZES_MIB = [256, 1024];
const TOKEN = 'bench-migration-token';

interface Outcome {
  totalMs: number;
  downtimeMs: number;
  mibSent: number;
  iterations: number;
}

/**
 * Moves the VM in `from` into a fresh kiln-vmm over `listen`; resolves with the figures and
 * the new VMM. `handOver` (a live upgrade): the new VMM inherits `from`'s guest memory file
 * of `handOver` MiB and nothing is copied.
 */
async function migrate(
  ctx: BenchContext,
  from: RunningVmm,
  name: string,
  listen: string,
  handOver?: number,
): Promise<[Outcome, RunningVmm]> {
  let memoryFd: number | null = null;
  if (handOver !== undefined) {
    memoryFd = openGuestMemoryOf(from.child.pid!, handOver * 1024 * 1024);
    if (memoryFd === null) throw new Error('the source VMM maps no guest memory file');
  }
  const t0 = performance.now();
  const to = await startVmm(ctx.dir, name, memoryFd !== null ? { memoryFd } : {});
  if (memoryFd !== null) closeSync(memoryFd);
  await put(to.api, '/migration/receive', { listen, token: TOKEN, ...(memoryFd !== null ? { memory_fd: 3 } : {}) });
  const address = ((await unixHttp(to.api, 'GET', '/migration')).body as { address: string }).address;
  const t1 = performance.now();
  if (handOver !== undefined)
    ctx.log(`the new VMM started and listens ${(t1 - t0).toFixed(0)} ms after the upgrade began`);
  await put(from.api, '/migration/send', {
    destination: address,
    token: TOKEN,
    downtime_ms: 300,
    ...(handOver !== undefined ? { local: true } : {}),
  });
  for (;;) {
    const p = (await unixHttp(to.api, 'GET', '/migration')).body as {
      phase: string;
      downtime_ms?: number;
      bytes_sent: number;
      iteration: number;
      error?: string;
    };
    if (p.phase === 'failed') throw new Error(`the migration failed: ${p.error}`);
    if (p.phase === 'completed') {
      const totalMs = performance.now() - t1;
      await from.exited;
      return [
        { totalMs, downtimeMs: p.downtime_ms!, mibSent: p.bytes_sent / (1024 * 1024), iterations: p.iteration },
        to,
      ];
    }
    await sleep(5);
  }
}

export async function benchMigrate(ctx: BenchContext): Promise<void> {
  const kernel = await buildMinimalKernel(ctx.log);
  const initrd = await buildInitramfs(ctx.log);
  const rows: Record<string, Outcome> = {};
  for (const size of SIZES_MIB) {
    const vmms: RunningVmm[] = [];
    try {
      const a = await startVmm(ctx.dir, `boot-${size}`);
      vmms.push(a);
      await bootShell(a, { kernel: kernel.vmlinux, initrd: initrd.path, memoryMiB: size, sharedMemory: true }, 900);
      const [idle, b] = await migrate(ctx, a, `idle-${size}`, 'tcp:127.0.0.1:0');
      vmms.push(b);
      await ask(b, 'echo idle-moved-$((6*7))', /idle-moved-42/, 120);
      b.console.write('dd if=/dev/zero of=/dev/null bs=4M count=100000000 &\n');
      await sleep(3000);
      const [busy, c] = await migrate(ctx, b, `busy-${size}`, 'tcp:127.0.0.1:0');
      vmms.push(c);
      await ask(c, 'echo busy-moved-$((6*7))', /busy-moved-42/, 120);
      rows[`idle_${size}`] = idle;
      rows[`busy_${size}`] = busy;
      const say = (what: string, o: Outcome) =>
        ctx.log(
          `${size} MiB ${what}: total ${o.totalMs.toFixed(0)} ms, downtime ${o.downtimeMs} ms, ${o.mibSent.toFixed(1)} MiB sent, ${o.iterations} iteration(s) after the first pass`,
        );
      say('idle, loopback TCP', idle);
      say('dirtying 4 MiB over and over, loopback TCP', busy);
      if (size === 1024) {
        await ask(c, 'killall dd; echo stopped-$((6*7))', /stopped-42/, 120);
        const [copied, d] = await migrate(ctx, c, `copied-${size}`, `unix:${join(ctx.dir, 'copied.sock')}`);
        vmms.push(d);
        rows.copied_1024 = copied;
        say('idle, Unix socket, memory copied', copied);
        const [upgrade, e] = await migrate(ctx, d, `upgrade-${size}`, `unix:${join(ctx.dir, 'upgrade.sock')}`, size);
        vmms.push(e);
        await ask(e, 'echo upgraded-$((6*7))', /upgraded-42/, 120);
        rows.upgrade_1024 = upgrade;
        say('live upgrade, Unix socket, memory handed over', upgrade);
      }
    } finally {
      for (const v of vmms) if (v.child.exitCode === null) v.child.kill('SIGKILL');
      await Promise.all(vmms.map((v) => v.exited));
    }
  }
  const i = rows.idle_1024!;
  ctx.result(
    `migrate downtime_ms_1g=${i.downtimeMs} total_ms_1g=${i.totalMs.toFixed(0)} mib_sent_1g=${i.mibSent.toFixed(1)} upgrade_downtime_ms_1g=${rows.upgrade_1024!.downtimeMs} upgrade_mib_sent_1g=${rows.upgrade_1024!.mibSent.toFixed(2)} copied_upgrade_downtime_ms_1g=${rows.copied_1024!.downtimeMs} downtime_ms_256m=${rows.idle_256!.downtimeMs} busy_downtime_ms_1g=${rows.busy_1024!.downtimeMs} busy_total_ms_1g=${rows.busy_1024!.totalMs.toFixed(0)} busy_iterations_1g=${rows.busy_1024!.iterations}`,
  );
}
