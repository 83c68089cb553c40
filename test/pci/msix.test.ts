// MSI-X: the capability as pciutils decodes it, and the vector table's masking,
// pending bits and delivery.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { allocateDeviceState } from '../../src/devices/catalogue.js';
import {
  MSIX_CONTROL_ENABLE,
  MSIX_CONTROL_FUNCTION_MASK,
  msixCapability,
  msixStateBytes,
  MsixTable,
  PCI_CAP_ID_MSIX,
} from '../../src/pci/msix.js';
import { PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST, PciRoot } from '../../src/pci/root.js';
import { tempDir, toolAvailable } from '../helpers.js';

const layout = { vectors: 4, tableBar: 0, tableOffset: 0x2000, pbaBar: 0, pbaOffset: 0x3000 };

function functionWithMsix() {
  const root = new PciRoot(allocateDeviceState('pci-root', { role: 'cf8' }));
  const vendorCap = { id: 0x09, body: Uint8Array.of(4, 0xaa), writeMask: new Uint8Array(2) };
  root.addFunction(1, {
    vendorId: 0x1af4,
    deviceId: 0x1041,
    classCode: 0x020000,
    bars: [{ kind: 'memory32', size: 0x4000, address: 0xc0000000 }],
    capabilities: [vendorCap, msixCapability(layout)],
  });
  return root;
}

test('capabilities chain from 0x40 and the status register says so', () => {
  const root = functionWithMsix();
  const space = root.dump(1);
  const dv = new DataView(space.buffer);
  assert.equal(dv.getUint16(PCI_STATUS, true) & PCI_STATUS_CAP_LIST, PCI_STATUS_CAP_LIST);
  assert.equal(space[PCI_CAPABILITY_LIST], 0x40);
  assert.deepEqual([space[0x40], space[0x41]], [0x09, 0x44], 'vendor capability, then the next at 0x44');
  assert.equal(root.findCapability(1, PCI_CAP_ID_MSIX), 0x44);
  assert.equal(space[0x45], 0, 'end of the list');
  assert.equal(dv.getUint16(0x46, true), 3, 'table size - 1');
  assert.equal(root.findCapability(1, 0x05), -1);
});

test('the guest may set MSI-X enable and function mask, nothing else in Message Control', () => {
  const root = functionWithMsix();
  const control = Uint8Array.of(0xff, 0xff);
  root.access(1, 0x46, control, true);
  const out = new Uint8Array(2);
  root.access(1, 0x46, out, false);
  assert.equal(out[0]! | (out[1]! << 8), MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK | 3);
});

test(
  'lspci -F decodes the MSI-X capability',
  { skip: toolAvailable('lspci', '--version') ? false : 'needs lspci' },
  () => {
    const bytes = functionWithMsix().dump(1);
    const lines = ['00:01.0 Class 0000: 0000:0000'];
    for (let at = 0; at < bytes.length; at += 16)
      lines.push(
        `${at.toString(16).padStart(2, '0')}: ${[...bytes.subarray(at, at + 16)].map((b) => b.toString(16).padStart(2, '0')).join(' ')}`,
      );
    const file = join(tempDir(), 'msix.txt');
    writeFileSync(file, `${lines.join('\n')}\n`);
    const out = execFileSync('lspci', ['-F', file, '-vv'], { encoding: 'utf8' });
    assert.match(out, /Capabilities: \[44\] MSI-X: Enable- Count=4 Masked-/);
    assert.match(out, /Vector table: BAR=0 offset=00002000/);
    assert.match(out, /PBA: BAR=0 offset=00003000/);
  },
);

test('vectors start masked; a masked vector is pending and delivered once unmasked', () => {
  let control = 0;
  const delivered: string[] = [];
  const state = new SharedArrayBuffer(msixStateBytes(4));
  MsixTable.initialise(state, 0, 4);
  const table = new MsixTable(
    state,
    0,
    4,
    () => control,
    (lo, hi, data) => delivered.push(`${lo.toString(16)}:${hi}:${data}`),
  );
  const entry = (v: number, lo: number, data: number, masked: boolean) => {
    const bytes = new Uint8Array(16);
    const dv = new DataView(bytes.buffer);
    dv.setUint32(0, lo, true);
    dv.setUint32(8, data, true);
    dv.setUint32(12, masked ? 1 : 0, true);
    table.writeTable(v * 16, bytes);
  };
  const vectorControl = new Uint8Array(4);
  table.readTable(2 * 16 + 12, vectorControl);
  assert.equal(vectorControl[0], 1, 'masked at reset');

  entry(2, 0xfee00000, 0x41, false);
  table.notify(2);
  assert.deepEqual(delivered, [], 'MSI-X not enabled yet: pending');
  assert.equal(table.pending(2), true);
  const pba = new Uint8Array(8);
  table.readPba(0, pba);
  assert.equal(pba[0], 0b100);

  control = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK;
  table.deliverPending();
  assert.deepEqual(delivered, [], 'function-masked');
  control = MSIX_CONTROL_ENABLE;
  table.deliverPending();
  assert.deepEqual(delivered, ['fee00000:0:65'], 'delivered on unmask');
  assert.equal(table.pending(2), false);

  table.notify(2);
  assert.deepEqual(delivered, ['fee00000:0:65', 'fee00000:0:65'], 'unmasked: delivered at once');
  entry(3, 0xfee01000, 0x42, true);
  table.notify(3);
  assert.equal(table.pending(3), true);
  entry(3, 0xfee01000, 0x42, false);
  assert.deepEqual(delivered.at(-1), 'fee01000:0:66', 'unmasking the entry delivers');
  table.notify(9);
  assert.equal(delivered.length, 3, 'out-of-range vectors are ignored');
});

test('a table built late on another thread does not re-mask what the driver unmasked', () => {
  const state = new SharedArrayBuffer(msixStateBytes(2));
  MsixTable.initialise(state, 0, 2);
  const first = new MsixTable(
    state,
    0,
    2,
    () => 0,
    () => undefined,
  );
  first.writeTable(12, new Uint8Array(4)); // the driver unmasks vector 0
  const late = new MsixTable(
    state,
    0,
    2,
    () => 0,
    () => undefined,
  );
  const vectorControl = new Uint8Array(4);
  late.readTable(12, vectorControl);
  assert.equal(vectorControl[0], 0, 'vector 0 stays unmasked');
  late.readTable(16 + 12, vectorControl);
  assert.equal(vectorControl[0], 1, 'vector 1 is still masked from power-on');
});
