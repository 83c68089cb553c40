// Platform behaviour proven from inside test guests: ACPI poweroff/reset and i8042
// reset through their ports, SMP bring-up through the in-kernel LAPIC (INIT/SIPI), and
// UART interrupts delivered through the in-kernel IOAPIC to a guest IDT handler.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { supportedCpuid } from '../../src/cpu/cpuid.js';
import { configureVcpu } from '../../src/cpu/setup.js';
import { irqLineSetter } from '../../src/devices/irq.js';
import { readProgress } from '../../src/devices/progress.js';
import { SerialHost } from '../../src/devices/serial.js';
import { buildProgram, loadProgram } from '../../src/guest/kit.js';
import * as layout from '../../src/layout.js';
import { addPcDevices, addStandardDevices } from '../../src/platform/standard.js';
import { Vm, type VmResult } from '../../src/vm.js';
import { kvmSkip } from '../helpers.js';

/** A VM with the platform's own devices (COM1, progress, debug-exit, ACPI PM, i8042, RTC). */
function platformVm(vcpus: number, irqchip: boolean) {
  const vm = Vm.create({ memoryBytes: 4 * layout.MiB, vcpus, irqchip });
  const { com1, progress } = addStandardDevices(vm, -1);
  addPcDevices(vm);
  return { vm, progress, com1 };
}

/** Waits for the VM to end, failing (and stopping it) if it has not within `limitMs`. */
async function endWithin(vm: Vm, limitMs: number): Promise<VmResult> {
  const timeout = sleep(limitMs, null, { ref: false });
  const result = await Promise.race([vm.wait(), timeout]);
  if (result === null) {
    await vm.stop();
    assert.fail(`the guest did not finish within ${limitMs} ms`);
  }
  return result;
}

describe('power and reset from a guest', { skip: kvmSkip }, () => {
  const cases: Array<[string, string, boolean]> = [
    ['ACPI sleep control S5 (0x34)', 'mov $PORT_ACPI_SLEEP_CONTROL, %dx\n mov $0x34, %al\n out %al, %dx', false],
    ['ACPI reset register', 'mov $PORT_ACPI_RESET, %dx\n mov $1, %al\n out %al, %dx', true],
    ['i8042 command 0xFE', 'mov $0x64, %dx\n mov $0xfe, %al\n out %al, %dx', true],
  ];
  for (const [name, source, reset] of cases) {
    test(`${name} ${reset ? 'resets' : 'powers off'} the VM`, async () => {
      const { vm } = platformVm(1, false);
      try {
        loadProgram(vm, {
          mode: 'protected32',
          cpl: 3,
          source: `${source}\n 1: jmp 1b`,
          defines: { PORT_ACPI_SLEEP_CONTROL: layout.PORT_ACPI_SLEEP_CONTROL, PORT_ACPI_RESET: layout.PORT_ACPI_RESET },
        });
        await vm.start();
        const result = await endWithin(vm, 20_000);
        assert.equal(result.reason, 'guest-exit');
        assert.equal(result.reset, reset);
        assert.equal(result.exitCode, reset ? null : 0);
      } finally {
        await vm.destroy();
      }
    });
  }
});

const AP_ENTRY = 0x7_0000;
const AP_COUNTER = 0x600;

describe('SMP bring-up through the in-kernel LAPIC', { skip: kvmSkip }, () => {
  test('the BSP starts three APs with INIT/SIPI; each reports its APIC id', async () => {
    const { vm, progress } = platformVm(4, true);
    try {
      const cpuid = supportedCpuid(vm.kvmSystem);
      vm.vcpus.forEach((v, i) => configureVcpu(v, i, 4, cpuid, true));
      // Each AP starts in real mode at AP_ENTRY, reads its APIC id from the LAPIC's ID
      // register through x2APIC mode (rdmsr 0x802), reports it and counts itself in.
      const ap = buildProgram({
        mode: 'real',
        cpl: 0,
        source: `
          mov $0x1b, %ecx
          rdmsr
          or $0xc00, %eax        /* APIC global enable + x2APIC mode */
          wrmsr
          mov $0x802, %ecx
          rdmsr                  /* x2APIC id */
          mov $PORT_PROGRESS, %dx
          out %eax, %dx
          xor %ax, %ax
          mov %ax, %ds
          lock incl ${AP_COUNTER}
        1: hlt
          jmp 1b`,
      });
      vm.memory.write(AP_ENTRY, ap);
      // The BSP (long mode, ring 0) reports its id, sends INIT then SIPI to all others,
      // and waits for the three to count in.
      loadProgram(vm, {
        mode: 'long64',
        cpl: 0,
        source: `
          mov $0x1b, %ecx
          rdmsr
          or $0xc00, %eax
          wrmsr
          mov $0x802, %ecx
          rdmsr
          mov $PORT_PROGRESS, %dx
          out %eax, %dx
          mov $0x830, %ecx       /* x2APIC ICR */
          xor %edx, %edx
          mov $0x000c4500, %eax  /* INIT, assert, all excluding self */
          wrmsr
          mov $(0x000c4600 | (${AP_ENTRY} >> 12)), %eax  /* SIPI */
          wrmsr
        1: cmpl $3, ${AP_COUNTER}
          jb 1b
          mov $PORT_DEBUG_EXIT, %dx
          mov $0, %al
          out %al, %dx`,
      });
      await vm.start();
      const result = await endWithin(vm, 60_000);
      assert.equal(result.reason, 'guest-exit', result.detail);
      const ids = readProgress(progress.state).recent;
      assert.equal(ids[0], 0, 'the BSP reports first');
      assert.deepEqual([...ids].sort(), [0, 1, 2, 3]);
    } finally {
      await vm.destroy();
    }
  });
});

/** A long-mode ring-0 guest that takes IRQ 4 through the IOAPIC on vector 0x24. */
function uartInterruptSource(ier: number, readPort: number): string {
  return `
    /* IDT gate for vector 0x24 -> handler */
    lea handler(%rip), %rax
    mov $(KIT_IDT + 0x24 * 16), %rdi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lidt idtr(%rip)
    /* LAPIC on; IOAPIC pin 4 -> vector 0x24, edge, active high, to APIC 0 */
    mov $0xff, %al          /* mask the 8259s: KVM wires the BSP's LINT0 to them (ExtINT) */
    out %al, $0x21
    out %al, $0xa1
    mov $0xfee00000, %ebx   /* LAPIC (above 2 GiB: no 32-bit displacement) */
    movl $0x1ff, 0xf0(%rbx)
    movl $0x10000, 0x350(%rbx) /* and mask LINT0 itself */
    mov $0xfec00000, %esi   /* IOAPIC: IOREGSEL at 0, IOWIN at 0x10 */
    movl $0x18, (%rsi)
    movl $0x24, 0x10(%rsi)
    movl $0x19, (%rsi)
    movl $0, 0x10(%rsi)
    mov $(PORT_COM1 + 1), %dx
    mov $${ier}, %al
    out %al, %dx
    mov $PORT_PROGRESS, %dx
    mov $1, %al
    out %al, %dx            /* ready */
    sti
  1: hlt
    jmp 1b
  handler:
    mov $${readPort}, %dx
    in %dx, %al
    movzbl %al, %eax
    mov $PORT_PROGRESS, %dx
    out %eax, %dx
    movl $0, 0xb0(%rbx)     /* EOI */
    mov $PORT_DEBUG_EXIT, %dx
    mov $7, %al
    out %al, %dx
  2: jmp 2b
  idtr:
    .word 0x25 * 16 - 1
    .quad KIT_IDT
  `;
}

describe('UART interrupts through the IOAPIC', { skip: kvmSkip }, () => {
  test('enabling THRI raises IRQ 4; the handler sees IIR = THRE', async () => {
    const { vm, progress } = platformVm(1, true);
    try {
      loadProgram(vm, {
        mode: 'long64',
        cpl: 0,
        source: uartInterruptSource(0x02, layout.PORT_COM1 + 2),
        defines: { KIT_IDT: layout.KIT_IDT },
      });
      await vm.start();
      const result = await endWithin(vm, 30_000);
      assert.equal(result.exitCode, 7, result.detail);
      const codes = readProgress(progress.state).recent;
      assert.equal(codes[0], 1);
      assert.equal(codes[1]! & 0x0f, 0x02, 'IIR: transmitter holding register empty');
    } finally {
      await vm.destroy();
    }
  });

  test('host input raises the receive interrupt; the handler reads the byte', async () => {
    const { vm, progress, com1 } = platformVm(1, true);
    try {
      loadProgram(vm, {
        mode: 'long64',
        cpl: 0,
        source: uartInterruptSource(0x01, layout.PORT_COM1),
        defines: { KIT_IDT: layout.KIT_IDT },
      });
      await vm.start();
      const limit = Date.now() + 30_000;
      while (readProgress(progress.state).count === 0 && Date.now() < limit) await sleep(10);
      await sleep(50); // let the guest reach hlt with interrupts on
      new SerialHost(com1.state, com1.options, irqLineSetter(vm.vmFd.fd)).input(Uint8Array.of(0x5a));
      const result = await endWithin(vm, 30_000);
      assert.equal(result.exitCode, 7, result.detail);
      assert.deepEqual(readProgress(progress.state).recent, [1, 0x5a]);
    } finally {
      await vm.destroy();
    }
  });
});
