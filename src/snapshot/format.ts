// The snapshot state file: Kiln's own format, checked whole before anything is restored.
//
//   bytes 0-7    "KILNSNAP"
//   bytes 8-11   format version (u32 little-endian)
//   bytes 12-15  zero
//   bytes 16-23  length N of the body (u64 little-endian)
//   N bytes      the body: UTF-8 JSON (byte arrays as {"$b64": ...}, or from 1 KiB on as
//                {"$z": base64 of raw DEFLATE}, 64-bit values as {"$u64": "0x..."})
//   32 bytes     SHA-256 of everything before it
//
// JSON rather than a packed binary layout: the state is small (tens of KiB; guest RAM is
// in the memory file), a person can read it with jq, and a new field does not move every
// other one. Device state is mostly zeros (PCI configuration space for every slot is 1
// MiB), so large arrays are deflated: the file shrinks from ~1 MiB to tens of KiB and
// checking and parsing it takes a fraction of the time. The version changes whenever a
// restore could misread an older file; Kiln reads only its own version and says so.
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, openSync, readFileSync, readSync, constants as fsConstants } from 'node:fs';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { KilnError } from '../errors.js';

export const SNAPSHOT_MAGIC = 'KILNSNAP';
export const SNAPSHOT_VERSION = 2;
/** Arrays this long or longer are deflated. */
const DEFLATE_FROM = 1024;
/** No deflated array inflates past this (a hostile file with a valid checksum cannot exhaust memory). */
const MAX_INFLATED_BYTES = 16 * 1024 * 1024;
const HEADER_BYTES = 24;
const DIGEST_BYTES = 32;
/** Far above any real state file (tens of KiB per vCPU); a larger file is not read. */
export const MAX_STATE_FILE_BYTES = 64 * 1024 * 1024;

export class SnapshotError extends KilnError {
  override readonly name: string = 'SnapshotError';
}

function replacer(_key: string, value: unknown): unknown {
  if (value instanceof Uint8Array) {
    const bytes = Buffer.from(value.buffer, value.byteOffset, value.length);
    if (bytes.length >= DEFLATE_FROM) return { $z: deflateRawSync(bytes, { level: 1 }).toString('base64') };
    return { $b64: bytes.toString('base64') };
  }
  if (typeof value === 'bigint') return { $u64: `0x${value.toString(16)}` };
  return value;
}

function reviver(_key: string, value: unknown): unknown {
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const o = value as Record<string, unknown>;
    const keys = Object.keys(o);
    if (keys.length === 1 && typeof o.$b64 === 'string') return new Uint8Array(Buffer.from(o.$b64, 'base64'));
    if (keys.length === 1 && typeof o.$u64 === 'string') return BigInt(o.$u64);
    if (keys.length === 1 && typeof o.$z === 'string') {
      const bytes = inflateRawSync(Buffer.from(o.$z, 'base64'), { maxOutputLength: MAX_INFLATED_BYTES });
      return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
    }
  }
  return value;
}

/** The whole state file for `body`. */
export function encodeStateFile(body: unknown): Buffer {
  const json = Buffer.from(JSON.stringify(body, replacer), 'utf8');
  const header = Buffer.alloc(HEADER_BYTES);
  header.write(SNAPSHOT_MAGIC, 0, 'latin1');
  header.writeUInt32LE(SNAPSHOT_VERSION, 8);
  header.writeBigUInt64LE(BigInt(json.length), 16);
  const digest = createHash('sha256').update(header).update(json).digest();
  return Buffer.concat([header, json, digest]);
}

/** Checks magic, version, length and checksum, then parses the body; throws SnapshotError saying what is wrong. */
export function decodeStateFile(bytes: Uint8Array, path = 'the state file'): unknown {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  if (buf.length < HEADER_BYTES + DIGEST_BYTES || buf.toString('latin1', 0, 8) !== SNAPSHOT_MAGIC)
    throw new SnapshotError(`${path} is not a Kiln snapshot (no ${SNAPSHOT_MAGIC} header)`);
  const version = buf.readUInt32LE(8);
  if (version !== SNAPSHOT_VERSION)
    throw new SnapshotError(
      `${path} is snapshot format version ${version}; this Kiln reads version ${SNAPSHOT_VERSION}`,
    );
  const length = buf.readBigUInt64LE(16);
  if (length !== BigInt(buf.length - HEADER_BYTES - DIGEST_BYTES))
    throw new SnapshotError(
      `${path} is truncated or has extra bytes (${buf.length} bytes; its header says ${HEADER_BYTES + DIGEST_BYTES + Number(length)})`,
    );
  const end = buf.length - DIGEST_BYTES;
  const digest = createHash('sha256').update(buf.subarray(0, end)).digest();
  if (!digest.equals(buf.subarray(end))) throw new SnapshotError(`${path} is corrupted (its checksum does not match)`);
  try {
    return JSON.parse(buf.toString('utf8', HEADER_BYTES, end), reviver);
  } catch (err) {
    throw new SnapshotError(`${path}: its body cannot be read (${(err as Error).message})`);
  }
}

/** A snapshot format version as Firecracker prints one (`--snapshot-version`, `--describe-snapshot`). */
export const formatVersion = (version: number): string => `v${version}.0.0`;

/**
 * The format version a state file's header names (what `kiln-vmm --describe-snapshot`
 * prints), read without checking the rest: a file this Kiln cannot load is described too.
 */
export function describeStateFile(path: string): number {
  return withStateFile(path, (fd) => {
    const header = Buffer.alloc(HEADER_BYTES);
    const got = readSync(fd, header, 0, HEADER_BYTES, 0);
    if (got < HEADER_BYTES || header.toString('latin1', 0, 8) !== SNAPSHOT_MAGIC)
      throw new SnapshotError(`the snapshot file ${path} is not a Kiln snapshot (no ${SNAPSHOT_MAGIC} header)`);
    return header.readUInt32LE(8);
  });
}

/** Reads a state file (a regular file, at most MAX_STATE_FILE_BYTES, never blocking) and decodes it. */
export function readStateFile(path: string): unknown {
  return withStateFile(path, (fd, size) => {
    if (size > MAX_STATE_FILE_BYTES)
      throw new SnapshotError(`the snapshot file ${path} is ${size} bytes: too large to be a Kiln state file`);
    return decodeStateFile(readFileSync(fd), `the snapshot file ${path}`);
  });
}

/**
 * `use` on the state file at `path`, opened without blocking and checked to be a
 * regular file; any failure is a SnapshotError naming the file.
 */
function withStateFile<T>(path: string, use: (fd: number, size: number) => T): T {
  let fd = -1;
  try {
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
    const st = fstatSync(fd);
    if (!st.isFile()) throw new SnapshotError(`the snapshot file ${path} is not a regular file`);
    return use(fd, st.size);
  } catch (err) {
    if (err instanceof KilnError) throw err;
    throw new SnapshotError(
      `cannot read the snapshot file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  } finally {
    if (fd >= 0) closeSync(fd);
  }
}
