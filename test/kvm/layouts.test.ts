// The binary layouts Kiln reads and writes outside KVM's own structs — ELF headers,
// the virtio-blk request header, the virtio-pci capability, epoll_event, ifreq,
// sockaddr_un and struct flock — each declared once with the struct codec and checked
// here against the host's C headers, compiled with gcc. (ACPI's tables have no C header on the host;
// they are checked by decoding them with iasl, in test/acpi.)
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr, Elf64_Shdr } from '../../src/boot/elf.js';
import { epoll_event, flock, sockaddr_un } from '../../src/kvm/libc.js';
import type { StructType } from '../../src/kvm/struct.js';
import { virtio_blk_outhdr } from '../../src/virtio/blk.js';
import { ifreq } from '../../src/virtio/net.js';
import { virtio_pci_cap, virtio_pci_notify_cap } from '../../src/virtio/pci.js';
import { tempDir } from '../helpers.js';

test('every layout matches the C headers: sizes and every field offset', () => {
  const checked: Array<[StructType, string]> = [
    [Elf64_Ehdr, 'Elf64_Ehdr'],
    [Elf64_Phdr, 'Elf64_Phdr'],
    [Elf64_Shdr, 'Elf64_Shdr'],
    [Elf64_Nhdr, 'Elf64_Nhdr'],
    [virtio_blk_outhdr, 'struct virtio_blk_outhdr'],
    [virtio_pci_cap, 'struct virtio_pci_cap'],
    [virtio_pci_notify_cap, 'struct virtio_pci_notify_cap'],
    [epoll_event, 'struct epoll_event'],
    [ifreq, 'struct ifreq'],
    [sockaddr_un, 'struct sockaddr_un'],
    [flock, 'struct flock'],
  ];
  const lines: string[] = [];
  const expected = new Map<string, number>();
  for (const [type, c] of checked) {
    lines.push(`printf("sizeof:${type.name} %zu\\n", sizeof(${c}));`);
    expected.set(`sizeof:${type.name}`, type.size);
    for (const leaf of type.leaves()) {
      lines.push(`printf("offsetof:${type.name}.${leaf.path} %zu\\n", offsetof(${c}, ${leaf.path}));`);
      expected.set(`offsetof:${type.name}.${leaf.path}`, leaf.offset);
    }
  }
  const dir = tempDir();
  writeFileSync(
    join(dir, 'layouts.c'),
    [
      '#include <stdio.h>',
      '#include <stddef.h>',
      '#include <elf.h>',
      '#include <fcntl.h>',
      '#include <sys/epoll.h>',
      '#include <sys/un.h>',
      '#include <net/if.h>',
      '#include <linux/virtio_blk.h>',
      '#include <linux/virtio_pci.h>',
      `int main(void) {\n${lines.join('\n')}\nreturn 0;\n}`,
    ].join('\n'),
  );
  execFileSync('gcc', ['-o', join(dir, 'layouts'), join(dir, 'layouts.c')]);
  const actual = new Map(
    execFileSync(join(dir, 'layouts'), { encoding: 'utf8' })
      .trim()
      .split('\n')
      .map((l) => [l.split(' ')[0]!, Number(l.split(' ')[1])] as const),
  );
  assert.ok(expected.size > 60, `checks ${expected.size} sizes and offsets`);
  for (const [key, value] of expected) assert.equal(value, actual.get(key), key);
});
