// Shared test helpers: the /dev/kvm gate, temporary directories, and a VM with the
// standard test devices.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';
import type { DeviceSpec } from '../src/devices/catalogue.js';
import type { DeviceContext } from '../src/devices/device.js';
import type { GuestMemory } from '../src/memory/guest-memory.js';
import { loadProgram, type KitProgram } from '../src/guest/kit.js';
import * as layout from '../src/layout.js';
import { Vm, type VmResult } from '../src/vm.js';
import * as libc from '../src/kvm/libc.js';

/** Tests that run guests need /dev/kvm; where it is absent they skip and say why. */
export const kvmSkip: string | false = existsSync('/dev/kvm') ? false : 'needs /dev/kvm (this host has no KVM)';
if (kvmSkip) process.stdout.write(`# SKIPPING guest tests: ${kvmSkip}\n`);

/** Whether a host tool runs (e.g. `toolAvailable('iasl', '-v')`), for tests that need it. */
export function toolAvailable(cmd: string, ...args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A temporary directory removed when the test file ends. */
export function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-test-'));
  after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface TestVm {
  readonly vm: Vm;
  readonly progress: DeviceSpec<'progress'>;
  readonly pioTest: DeviceSpec<'test-device'>;
  readonly mmioTest: DeviceSpec<'test-device'>;
}

/** A VM with the progress port, debug-exit, and the kit's test device on both buses. */
export function createTestVm(
  options: {
    vcpus?: number;
    memoryBytes?: number;
    serialFd?: number;
    irqchip?: boolean;
    log?: (line: string) => void;
    /** Guest RAM from a snapshot's memory file. */
    memoryFileFd?: number;
  } = {},
): TestVm {
  const vm = Vm.create({
    memoryBytes: options.memoryBytes ?? 4 * layout.MiB,
    vcpus: options.vcpus ?? 1,
    irqchip: options.irqchip ?? false,
    ...(options.log ? { log: options.log } : {}),
    ...(options.memoryFileFd !== undefined ? { memoryFileFd: options.memoryFileFd } : {}),
  });
  const progress = vm.addDevice({
    id: 'progress',
    kind: 'progress',
    bus: 'pio',
    base: layout.PORT_PROGRESS,
    size: layout.PORT_PROGRESS_SIZE,
  });
  vm.addDevice({
    id: 'debug-exit',
    kind: 'debug-exit',
    bus: 'pio',
    base: layout.PORT_DEBUG_EXIT,
    size: layout.PORT_DEBUG_EXIT_SIZE,
  });
  vm.addDevice({
    id: 'debug-exit-mmio',
    kind: 'debug-exit',
    bus: 'mmio',
    base: layout.DEBUG_EXIT_MMIO_BASE,
    size: layout.DEBUG_EXIT_MMIO_SIZE,
  });
  if (options.serialFd !== undefined) {
    vm.addDevice({
      id: 'com1',
      kind: 'serial',
      bus: 'pio',
      base: layout.PORT_COM1,
      size: layout.PORT_COM_SIZE,
      options: { outFd: options.serialFd, irq: layout.IRQ_COM1 },
    });
  }
  const pioTest = vm.addDevice({
    id: 'pio-test',
    kind: 'test-device',
    bus: 'pio',
    base: layout.PORT_TEST_DEVICE,
    size: layout.PORT_TEST_DEVICE_SIZE,
    options: { registerBytes: layout.PORT_TEST_DEVICE_SIZE },
  });
  const mmioTest = vm.addDevice({
    id: 'mmio-test',
    kind: 'test-device',
    bus: 'mmio',
    base: layout.TEST_DEVICE_MMIO_BASE,
    size: layout.TEST_DEVICE_MMIO_SIZE,
    options: { registerBytes: 64 },
  });
  return { vm, progress, pioTest, mmioTest };
}

/** Runs `program` to its end on a fresh test VM; the VM is destroyed afterwards. */
export async function runProgram(
  program: KitProgram,
  setup: (t: TestVm) => void = () => undefined,
  check: (t: TestVm, result: VmResult) => void = () => undefined,
  options: { vcpus?: number } = {},
): Promise<VmResult> {
  const t = createTestVm(options);
  try {
    loadProgram(t.vm, program);
    setup(t);
    await t.vm.start();
    const result = await t.vm.wait();
    check(t, result);
    return result;
  } finally {
    await t.vm.destroy();
  }
}

/**
 * A DeviceContext for driving a device model directly from a test: the given callbacks,
 * and for the rest no VM (MSIs are dropped, there is no guest memory or PCI function).
 */
export function deviceContext(
  parts: Pick<DeviceContext, 'requestExit' | 'requestReset' | 'setIrq'> & Partial<DeviceContext>,
): DeviceContext {
  const noMemory = new Proxy({}, { get: () => assert.fail('this device context has no guest memory') }) as GuestMemory;
  return {
    signalMsi: () => undefined,
    log: (line) => process.stderr.write(`# device log: ${line}\n`),
    memory: noMemory,
    vmFd: -1,
    pciFunctions: new Map(),
    ...parts,
  } as DeviceContext;
}

/**
 * For tests that open TAPs on this process's main thread (kiln-vmm's API in-process: PUT
 * /network-interfaces opens the TAP): as root, moves the main thread into a network
 * namespace of its own until the file's tests end, so no TAP appears on the host. Without
 * root (no TAP can be opened at all) it returns the reason to skip.
 */
export function privateNetns(): string | false {
  if (process.getuid?.() !== 0 || !existsSync('/dev/net/tun')) return 'needs root and /dev/net/tun (opening a TAP)';
  const name = `kiln-test-${process.pid}`;
  execFileSync('ip', ['netns', 'add', name]);
  const host = openSync('/proc/thread-self/ns/net', 'r');
  const ns = openSync(`/run/netns/${name}`, 'r');
  const entered = libc.setns(ns, libc.CLONE_NEWNET);
  closeSync(ns);
  if (entered !== 0) {
    closeSync(host);
    execFileSync('ip', ['netns', 'del', name]);
    throw new Error(`setns into ${name}: ${libc.errnoName(libc.errno())}`);
  }
  after(() => {
    libc.setns(host, libc.CLONE_NEWNET);
    closeSync(host);
    execFileSync('ip', ['netns', 'del', name]);
  });
  return false;
}
