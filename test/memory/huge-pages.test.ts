// Huge pages for guest RAM: Transparent asks the host for them on the guest's mappings
// (madvise: the kernel marks the mapping THP-eligible); 2M takes them from the hugetlb
// pool, whose free pages the API checks when huge_pages is set (an honest 400 on a host
// with too few), and a VM whose memory is not whole 2 MiB pages is refused.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { hugePagesFree } from '../../src/host.js';
import { Vmm } from '../../src/api/vmm.js';
import { parseMachineConfig } from '../../src/api/resources.js';
import { Vm } from '../../src/vm.js';
import { MiB } from '../../src/layout.js';
import { kvmSkip } from '../helpers.js';

/** The smaps fields of the mapping that starts at `addr`. */
function smapsOf(addr: bigint): Map<string, string> {
  const lines = readFileSync('/proc/self/smaps', 'utf8').split('\n');
  const start = lines.findIndex((l) => /^[0-9a-f]+-[0-9a-f]+ /.test(l) && BigInt(`0x${l.split('-')[0]}`) === addr);
  assert.ok(start >= 0, `a mapping at 0x${addr.toString(16)}`);
  const fields = new Map<string, string>();
  for (const line of lines.slice(start + 1)) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) break;
    const m = /^(\w+):\s+(.*)$/.exec(line);
    if (m) fields.set(m[1]!, m[2]!);
  }
  return fields;
}

test(
  'huge_pages Transparent: the guest RAM mappings are marked for transparent huge pages',
  { skip: kvmSkip },
  async () => {
    const thp = readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8');
    const vm = Vm.create({ memoryBytes: 64 * MiB, vcpus: 1, hugePages: 'Transparent' });
    const plain = Vm.create({ memoryBytes: 64 * MiB, vcpus: 1 });
    try {
      const region = vm.memory.descriptor.regions[0]!;
      const smaps = smapsOf(region.hostAddr);
      assert.match(smaps.get('VmFlags') ?? '', /\bhg\b/, 'MADV_HUGEPAGE is set on the mapping');
      if (!thp.includes('[never]')) assert.equal(smaps.get('THPeligible'), '1');
      assert.doesNotMatch(smapsOf(plain.memory.descriptor.regions[0]!.hostAddr).get('VmFlags') ?? '', /\bhg\b/);
    } finally {
      await vm.destroy();
      await plain.destroy();
    }
  },
);

test('huge_pages 2M: refused with the pool short, and for memory that is not whole 2 MiB pages', () => {
  const vmm = new Vmm('huge', -1, () => undefined);
  const pool = hugePagesFree();
  const need = 128 / 2;
  const put = () => vmm.setMachineConfig(parseMachineConfig({ vcpu_count: 1, mem_size_mib: 128, huge_pages: '2M' }));
  if (pool && pool.pages < need) {
    assert.throws(put, new RegExp(`needs ${need} free 2 MiB huge pages for 128 MiB; this host has ${pool.pages}`));
    assert.equal(vmm.config.hugePages, undefined, 'nothing changed');
  } else {
    put();
    assert.equal(vmm.config.hugePages, '2M');
  }
  assert.throws(
    () => vmm.setMachineConfig(parseMachineConfig({ vcpu_count: 1, mem_size_mib: 129, huge_pages: '2M' })),
    /memoryMiB: must be a whole number of 2 MiB huge pages \(got 129\)/,
  );
});
