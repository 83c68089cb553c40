// A booted Linux through kiln-vmm's snapshot API: the kit's Linux with a shell, paused and
// snapshotted (PUT /snapshot/create), its VMM ended; a fresh kiln-vmm loads it
// (PUT /snapshot/load, resume_vm) and the shell answers a command typed on the serial
// console, its entropy device still gives bytes, and its clock goes on from where it was.
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { buildInitramfs, buildMinimalKernel } from '../../src/guestkit/build.js';
import { unixHttp } from '../../src/manager/manager.js';
import { kvmSkip, tempDir } from '../helpers.js';
import { ask, put, startVmm } from '../vmm-driver.js';

const log = (line: string) => process.stderr.write(`# ${line}\n`);

describe('kiln-vmm snapshots of a booted Linux', { skip: kvmSkip }, () => {
  test(
    'a Linux with a shell, snapshotted and loaded in a fresh kiln-vmm, answers on its console with its devices working',
    { timeout: 15 * 60_000 },
    async () => {
      const kernel = await buildMinimalKernel(log);
      const initrd = await buildInitramfs(log);
      const dir = tempDir();
      const state = join(dir, 'linux.snap');
      const mem = join(dir, 'linux.mem');
      const a = await startVmm(dir, 'original');
      try {
        await put(a.api, '/boot-source', {
          kernel_image_path: kernel.vmlinux,
          initrd_path: initrd.path,
          boot_args: 'kiln.shell',
        });
        await put(a.api, '/machine-config', { vcpu_count: 1, mem_size_mib: 128 });
        await put(a.api, '/entropy', {});
        await put(a.api, '/actions', { action_type: 'InstanceStart' });
        await ask(a, 'echo booted-$((6*7))', /booted-42/, 600);
        // A snapshot is taken of a paused VM only.
        const running = await unixHttp(a.api, 'PUT', '/snapshot/create', { snapshot_path: state, mem_file_path: mem });
        assert.equal(running.status, 400);
        assert.match(JSON.stringify(running.body), /pause it first/);
        await put(a.api, '/vm', { state: 'Paused' }, 'PATCH');
        await put(a.api, '/snapshot/create', { snapshot_path: state, mem_file_path: mem, snapshot_type: 'Full' });
      } finally {
        a.child.kill('SIGTERM');
        await a.exited;
      }
      assert.equal(statSync(mem).size, 128 * 1024 * 1024);
      log(`state file ${statSync(state).size} bytes; memory file ${statSync(mem).blocks * 512} bytes on disk`);

      const b = await startVmm(dir, 'restored');
      try {
        const t0 = Date.now();
        await put(b.api, '/snapshot/load', {
          snapshot_path: state,
          mem_backend: { backend_type: 'File', backend_path: mem },
          resume_vm: true,
        });
        log(`snapshot/load answered in ${Date.now() - t0} ms`);
        // Loading again, or configuring after a load, is refused.
        const again = await unixHttp(b.api, 'PUT', '/snapshot/load', {
          snapshot_path: state,
          mem_backend: { backend_type: 'File', backend_path: mem },
        });
        assert.equal(again.status, 400);
        const info = (await unixHttp(b.api, 'GET', '/')).body as { state: string };
        assert.equal(info.state, 'Running');
        await ask(b, 'echo restored-$((6*7))', /restored-42/, 120);
        await ask(b, 'head -c 16 /dev/hwrng | wc -c', /\n\s*16\s*\r?\n/, 60);
      } finally {
        b.child.kill('SIGTERM');
        await b.exited;
      }
    },
  );
});
