// The kvm_pvm syscall-fix stub ships as bytes (a jailed VMM has no assembler): they must be
// exactly what the source assembles to.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { SYSCALL_FIX_HEX } from '../../src/compat/syscall-fix-code.js';
import { assemble } from '../../src/guest/asm.js';

test('the shipped syscall-fix bytes are the assembly of guests/compat/syscall-fix.S', () => {
  const source = readFileSync(new URL('../../../guests/compat/syscall-fix.S', import.meta.url), 'utf8');
  const fresh = Buffer.from(assemble(`.code64\n.text\n${source}`, 0)).toString('hex');
  assert.equal(SYSCALL_FIX_HEX, fresh, 'regenerate src/compat/syscall-fix-code.ts from the source');
  // Position-independent: the same bytes wherever it is assembled.
  assert.equal(Buffer.from(assemble(`.code64\n.text\n${source}`, 0x1234560)).toString('hex'), fresh);
});
