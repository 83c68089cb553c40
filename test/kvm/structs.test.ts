// Checks every struct size, field offset and ioctl number Kiln uses against the
// machine's own <linux/kvm.h>, compiled with gcc.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { ioc, KVM } from '../../src/kvm/ioctl.js';
import {
  boot_params,
  boot_e820_entry,
  hvm_memmap_table_entry,
  hvm_modlist_entry,
  hvm_start_info,
  setup_header,
} from '../../src/boot/structs.js';
import { allStructs } from '../../src/kvm/structs.js';
import { tempDir } from '../helpers.js';

function compileAndRun(source: string): Map<string, number> {
  const dir = tempDir();
  const src = join(dir, 'layout.c');
  const exe = join(dir, 'layout');
  writeFileSync(src, source);
  execFileSync('gcc', ['-o', exe, src]);
  const out = new Map<string, number>();
  for (const line of execFileSync(exe, { encoding: 'utf8' }).trim().split('\n')) {
    const [key, value] = line.split(' ');
    out.set(key!, Number(value));
  }
  return out;
}

test('every struct size and field offset matches <linux/kvm.h> and <asm/bootparam.h>', () => {
  const lines: string[] = [];
  const expected = new Map<string, number>();
  for (const type of [...allStructs, setup_header, boot_e820_entry, boot_params]) {
    lines.push(`printf("sizeof:${type.name} %zu\\n", sizeof(struct ${type.name}));`);
    expected.set(`sizeof:${type.name}`, type.size);
    for (const leaf of type.leaves()) {
      lines.push(`printf("offsetof:${type.name}.${leaf.path} %zu\\n", offsetof(struct ${type.name}, ${leaf.path}));`);
      expected.set(`offsetof:${type.name}.${leaf.path}`, leaf.offset);
      if (leaf.size > 0) {
        lines.push(
          `printf("sizeof:${type.name}.${leaf.path} %zu\\n", sizeof(((struct ${type.name} *)0)->${leaf.path}));`,
        );
        expected.set(`sizeof:${type.name}.${leaf.path}`, leaf.size);
      }
    }
  }
  const actual = compileAndRun(
    `#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n#include <asm/bootparam.h>\nint main(void) {\n${lines.join('\n')}\nreturn 0;\n}\n`,
  );
  assert.ok(expected.size > 300, `checks ${expected.size} sizes and offsets`);
  for (const [key, value] of expected) assert.equal(value, actual.get(key), key);
});

test('every ioctl number matches <linux/kvm.h>', () => {
  const names = Object.keys(KVM) as Array<keyof typeof KVM>;
  const actual = compileAndRun(
    `#include <stdio.h>\n#include <linux/kvm.h>\nint main(void) {\n${names.map((n) => `printf("KVM_${n} %lu\\n", (unsigned long)KVM_${n});`).join('\n')}\nreturn 0;\n}\n`,
  );
  for (const name of names) assert.equal(KVM[name], actual.get(`KVM_${name}`), `KVM_${name}`);
});

test('_IOC packs direction, size, type and number as the kernel does', () => {
  // _IOWR('T', 1, 0x10): read|write, size 16, type 'T', nr 1.
  assert.equal(ioc(3, 0x54, 1, 16), 0xc0105401);
  assert.throws(() => ioc(1, 0xae, 1, 1 << 14), /does not fit/);
});

test('PVH start-info structures have the Xen ABI sizes', () => {
  // xen/include/public/arch-x86/hvm/start_info.h: 56, 32 and 24 bytes.
  assert.equal(hvm_start_info.size, 56);
  assert.equal(hvm_start_info.offsetOf('rsdp_paddr'), 32);
  assert.equal(hvm_start_info.offsetOf('memmap_entries'), 48);
  assert.equal(hvm_modlist_entry.size, 32);
  assert.equal(hvm_memmap_table_entry.size, 24);
});
