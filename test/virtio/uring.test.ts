// The I/O thread's io_uring (src/virtio/uring.ts): a batch of writev and readv moves every
// request's bytes with one submit, in order; a read with nothing to read ends -EAGAIN at
// once instead of waiting; and the ring refuses every operation but readv and writev (an
// io_uring's operations pass beside seccomp, so this restriction is what keeps a
// compromised I/O thread from opening files or sockets through it).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import * as libc from '../../src/kvm/libc.js';
import { programAllows } from '../../src/seccomp/bpf.js';
import { compilePolicy, DEFAULT_POLICY } from '../../src/seccomp/policy.js';
import { allowRings, IORING_OP_READV, IORING_OP_WRITEV, IoRing } from '../../src/virtio/uring.js';

const SOCK_SEQPACKET = 5;
const SOCK_NONBLOCK = 0o4000;
const IORING_OP_NOP = 0;
const IORING_OP_OPENAT = 18;

const ring = IoRing.open(8, 4);
const skip = ring ? false : 'this host gives no io_uring (kernel.io_uring_disabled or a container filter)';
if (skip) console.log(`# SKIPPING io_uring tests: ${skip}`);

/** Points slot `slot`'s first iovec at `buf` (native memory). */
function point(r: IoRing, slot: number, buf: { addr: bigint; bytes: Uint8Array }, len: number): void {
  const iov = r.iovs(slot);
  iov.writeBigUInt64LE(buf.addr, 0);
  iov.writeBigUInt64LE(BigInt(len), 8);
}

describe('io_uring batches for the I/O thread', { skip }, () => {
  test('writev and readv in one submit each: bytes whole and in order; an empty socket ends -EAGAIN at once', () => {
    const r = ring!;
    const sv = new Int32Array(2);
    assert.equal(libc.socketpair(libc.AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, sv), 0);
    const bufs = Array.from({ length: 4 }, () => libc.mapAnonymous(4096));
    try {
      const messages = ['first frame', 'second', 'the third and longest one'];
      messages.forEach((m, i) => {
        Buffer.from(bufs[i]!.bytes.buffer).write(m);
        point(r, i, bufs[i]!, m.length);
        r.prepare(i, IORING_OP_WRITEV, sv[0]!, 1);
      });
      assert.equal(r.submit(3), true);
      assert.deepEqual(
        [...r.results.subarray(0, 3)],
        messages.map((m) => m.length),
      );
      for (let i = 0; i < 4; i++) {
        bufs[i]!.bytes.fill(0);
        point(r, i, bufs[i]!, 4096);
        r.prepare(i, IORING_OP_READV, sv[1]!, 1);
      }
      assert.equal(r.submit(4), true, 'returns although the fourth read finds nothing');
      assert.deepEqual([...r.results.subarray(0, 4)], [...messages.map((m) => m.length), -libc.EAGAIN]);
      messages.forEach((m, i) => assert.equal(Buffer.from(bufs[i]!.bytes.buffer).toString('latin1', 0, m.length), m));
    } finally {
      for (const b of bufs) libc.munmap(b.addr, 4096);
      libc.close(sv[0]!);
      libc.close(sv[1]!);
    }
  });

  test('any operation but readv and writev is refused (EACCES)', () => {
    const r = ring!;
    for (const op of [IORING_OP_NOP, IORING_OP_OPENAT]) {
      r.prepare(0, op as typeof IORING_OP_READV, -1, 0);
      assert.equal(r.submit(1), true);
      assert.equal(r.results[0], -libc.EACCES, `operation ${op}`);
    }
    ring!.close();
  });

  test("the I/O thread's filter lets it enter a ring, not make or change one; a filter without io_uring_enter means no rings", () => {
    const io = compilePolicy(DEFAULT_POLICY).io;
    assert.equal(programAllows(io, 'io_uring_enter'), true);
    assert.equal(programAllows(io, 'io_uring_setup'), false);
    assert.equal(programAllows(io, 'io_uring_register'), false);
    const older = compilePolicy({
      ...DEFAULT_POLICY,
      io: { ...DEFAULT_POLICY.io, rules: DEFAULT_POLICY.io.rules.filter((r) => r.syscall !== 'io_uring_enter') },
    }).io;
    assert.equal(programAllows(older, 'io_uring_enter'), false);
    allowRings(false);
    try {
      assert.equal(IoRing.open(4, 1), null, 'devices fall back to a call per request');
    } finally {
      allowRings(true);
    }
  });
});
