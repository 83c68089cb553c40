// Port I/O and MMIO from test guests, through the real exit path: KVM_RUN on a vCPU
// thread -> kvm_run decode -> bus -> test device (state shared with this thread).
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { describe, test } from 'node:test';
import { TestDeviceState, type TestAccess } from '../../src/devices/test-device.js';
import type { Cpl, CpuMode } from '../../src/guest/modes.js';
import { KIT_CODE, KIT_DATA, PLATFORM_MMIO_SIZE, PLATFORM_MMIO_START } from '../../src/layout.js';
import { kvmSkip, runProgram } from '../helpers.js';

/** kvm_pvm runs 64-bit ring 3 natively, where `in`/`out` raise #GP even with IOPL 3. */
const softwareKvm = existsSync('/sys/module/kvm_pvm');

// The device's registers 8..11 are preset by the host; the guest reads them back.
const PRESET = [0x81, 0x92, 0xa3, 0xb4];
const STRING = 'Kiln!';

function pioSource(mode: CpuMode): string {
  // Real mode addresses data within the code segment (CS = DS = ES = KIT_CODE >> 4).
  const data = mode === 'real' ? 0x8000 : KIT_DATA;
  return `
    mov $PORT_TEST_DEVICE, %dx
    mov $0x11, %al
    out %al, %dx
    mov $(PORT_TEST_DEVICE + 2), %dx
    mov $0x2233, %ax
    out %ax, %dx
    mov $(PORT_TEST_DEVICE + 4), %dx
    mov $0x44556677, %eax
    out %eax, %dx
    mov $(PORT_TEST_DEVICE + 8), %dx
    in %dx, %al
    mov %al, ${data}
    in %dx, %ax
    mov %ax, ${data + 2}
    in %dx, %eax
    mov %eax, ${data + 4}
    cld
    mov $msg, %esi
    mov $${STRING.length}, %ecx
    mov $(PORT_TEST_DEVICE + 12), %dx
    rep outsb
    mov $${data + 16}, %edi
    mov $4, %ecx
    mov $(PORT_TEST_DEVICE + 8), %dx
    rep insb
    mov $PORT_DEBUG_EXIT, %dx
    mov $42, %al
    out %al, %dx
  msg: .ascii "${STRING}"
  `;
}

const modes: Array<[CpuMode, Cpl]> = [
  ['real', 0],
  ['protected32', 0],
  ['protected32', 3],
  ['long64', 0],
  ['long64', 3],
];

describe('port I/O from a guest', { skip: kvmSkip }, () => {
  for (const [mode, cpl] of modes) {
    const pvmLimit = softwareKvm && mode === 'long64' && cpl === 3;
    test(`${mode} at CPL${cpl}: out/in of 1, 2 and 4 bytes, rep outsb, rep insb${pvmLimit ? ' (kvm_pvm: #GP, documented)' : ''}`, async () => {
      const data = mode === 'real' ? KIT_CODE + 0x8000 : KIT_DATA;
      await runProgram(
        { mode, cpl, source: pioSource(mode) },
        (t) => new TestDeviceState(t.pioTest.state, t.pioTest.options).registers.set(PRESET, 8),
        (t, result) => {
          const device = new TestDeviceState(t.pioTest.state, t.pioTest.options);
          if (pvmLimit) {
            // The first `out` faults in the guest; with no IDT that is a triple fault.
            assert.equal(result.reason, 'shutdown');
            assert.equal(device.accesses().length, 0);
            return;
          }
          assert.equal(result.reason, 'guest-exit', result.detail);
          assert.equal(result.exitCode, 42);
          const w = (offset: number, width: number, value: number): TestAccess => ({
            offset,
            width,
            write: true,
            value,
          });
          const r = (offset: number, width: number, value: number): TestAccess => ({
            offset,
            width,
            write: false,
            value,
          });
          assert.deepEqual(device.accesses(), [
            w(0, 1, 0x11),
            w(2, 2, 0x2233),
            w(4, 4, 0x44556677),
            r(8, 1, 0x81),
            r(8, 2, 0x9281),
            r(8, 4, 0xb4a39281),
            ...[...STRING].map((c) => w(12, 1, c.charCodeAt(0))),
            ...PRESET.map(() => r(8, 1, 0x81)),
          ]);
          assert.deepEqual([...device.registers.subarray(0, 8)], [0x11, 0, 0x33, 0x22, 0x77, 0x66, 0x55, 0x44]);
          assert.equal(t.vm.memory.readU8(data), 0x81);
          assert.equal(t.vm.memory.readU16(data + 2), 0x9281);
          assert.equal(t.vm.memory.readU32(data + 4), 0xb4a39281);
          assert.deepEqual([...t.vm.memory.read(data + 16, 4)], [0x81, 0x81, 0x81, 0x81]);
        },
      );
    });
  }
});

const mmioSource = `
    mov $TEST_DEVICE_MMIO_BASE, %rbx
    movb $0x11, 0(%rbx)
    movw $0x2233, 2(%rbx)
    movl $0x44556677, 4(%rbx)
    mov $0x8899aabbccddeeff, %rax
    mov %rax, 8(%rbx)
    movb 16(%rbx), %al
    mov %al, KIT_DATA
    movw 16(%rbx), %ax
    mov %ax, KIT_DATA + 2
    movl 16(%rbx), %eax
    mov %eax, KIT_DATA + 4
    movq 16(%rbx), %rax
    mov %rax, KIT_DATA + 8
    movl 0x800(%rbx), %eax
    mov %eax, KIT_DATA + 16
    movl $1, 0x20(%rbx)
    ud2
`;

describe('MMIO from a guest', { skip: kvmSkip }, () => {
  for (const cpl of [0, 3] as const) {
    test(`long64 at CPL${cpl}: reads and writes of 1, 2, 4 and 8 bytes reach the device`, async () => {
      const preset = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
      await runProgram(
        { mode: 'long64', cpl, source: mmioSource },
        (t) => new TestDeviceState(t.mmioTest.state, t.mmioTest.options).registers.set(preset, 16),
        (t, result) => {
          // The program ends with ud2: with no IDT, a triple fault ends the VM.
          assert.equal(result.reason, 'shutdown', result.detail);
          const device = new TestDeviceState(t.mmioTest.state, t.mmioTest.options);
          assert.deepEqual(
            device.accesses().map((a) => [a.offset, a.width, a.write, a.value]),
            [
              [0, 1, true, 0x11],
              [2, 2, true, 0x2233],
              [4, 4, true, 0x44556677],
              // The access log keeps values as numbers (53 bits); the register bytes below are checked exactly.
              // eslint-disable-next-line no-loss-of-precision
              [8, 8, true, 0x8899aabbccddeeff],
              [16, 1, false, 0x01],
              [16, 2, false, 0x2301],
              [16, 4, false, 0x67452301],
              // eslint-disable-next-line no-loss-of-precision
              [16, 8, false, 0xefcdab8967452301],
              [0x800, 4, false, 0xffffffff],
              [0x20, 4, true, 1],
            ],
          );
          assert.deepEqual([...device.registers.subarray(8, 16)], [0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88]);
          assert.equal(t.vm.memory.readU8(KIT_DATA), 0x01);
          assert.equal(t.vm.memory.readU16(KIT_DATA + 2), 0x2301);
          assert.equal(t.vm.memory.readU32(KIT_DATA + 4), 0x67452301);
          assert.equal(t.vm.memory.readU64(KIT_DATA + 8), 0xefcdab8967452301n);
          // Past the device's 64 register bytes, reads float high.
          assert.equal(t.vm.memory.readU32(KIT_DATA + 16), 0xffffffff);
        },
      );
    });
  }

  test('an access to an address with no device reads all-ones and does not stop the guest', async () => {
    await runProgram(
      {
        mode: 'long64',
        cpl: 0,
        source: `mov $${PLATFORM_MMIO_START + PLATFORM_MMIO_SIZE / 2}, %rbx\n movl (%rbx), %eax\n movl $5, (%rbx)\n mov %eax, KIT_DATA\n mov $PORT_DEBUG_EXIT, %dx\n mov $3, %al\n out %al, %dx`,
      },
      undefined,
      (t, result) => {
        assert.equal(result.exitCode, 3, result.detail);
        assert.equal(t.vm.memory.readU32(KIT_DATA), 0xffffffff);
      },
    );
  });
});
