// An encoder for the part of AML (ACPI 6.5, chapter 20) Kiln's DSDT needs: names,
// integers, strings, packages, buffers, resource templates, devices, scopes, simple
// methods (If / LEqual / Notify / Return). Each function returns the encoded bytes.

export type Aml = Uint8Array;

const concat = (parts: readonly Aml[]): Aml => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};
const bytes = (...values: number[]): Aml => Uint8Array.from(values);

// Opcodes (ACPI 6.5, 20.3).
const ZERO_OP = 0x00;
const ONE_OP = 0x01;
const ONES_OP = 0xff;
const NAME_OP = 0x08;
const BYTE_PREFIX = 0x0a;
const WORD_PREFIX = 0x0b;
const DWORD_PREFIX = 0x0c;
const STRING_PREFIX = 0x0d;
const QWORD_PREFIX = 0x0e;
const SCOPE_OP = 0x10;
const BUFFER_OP = 0x11;
const PACKAGE_OP = 0x12;
const METHOD_OP = 0x14;
const DUAL_NAME_PREFIX = 0x2e;
const MULTI_NAME_PREFIX = 0x2f;
const ROOT_CHAR = 0x5c;
const PARENT_PREFIX = 0x5e;
const EXT_OP_PREFIX = 0x5b;
const DEVICE_OP = 0x82;
const ARG0_OP = 0x68;
const NOTIFY_OP = 0x86;
const LEQUAL_OP = 0x93;
const IF_OP = 0xa0;
const RETURN_OP = 0xa4;

/** PkgLength (20.2.4): 1 to 4 bytes, counting itself. */
export function pkgLength(contentLength: number): Aml {
  for (let n = 1; n <= 4; n++) {
    const total = contentLength + n;
    if (n === 1 && total < 0x40) return bytes(total);
    if (n > 1 && total < 2 ** (4 + 8 * (n - 1))) {
      const out = [((n - 1) << 6) | (total & 0x0f)];
      for (let i = 1; i < n; i++) out.push((total >>> (4 + 8 * (i - 1))) & 0xff);
      return Uint8Array.from(out);
    }
  }
  throw new RangeError(`AML package of ${contentLength} bytes is too long`);
}

const withPkgLength = (op: Aml, content: Aml): Aml => concat([op, pkgLength(content.length), content]);

/** NameString (20.2.2): "\\_SB_.COM1", "_HID", "^PWRB"; segments padded to 4 with '_'. */
export function nameString(path: string): Aml {
  let rest = path;
  const prefix: number[] = [];
  if (rest.startsWith('\\')) {
    prefix.push(ROOT_CHAR);
    rest = rest.slice(1);
  }
  while (rest.startsWith('^')) {
    prefix.push(PARENT_PREFIX);
    rest = rest.slice(1);
  }
  const segments = rest === '' ? [] : rest.split('.');
  const seg = (s: string) => {
    if (!/^[A-Z_][A-Z0-9_]{0,3}$/.test(s)) throw new Error(`bad ACPI name segment '${s}'`);
    return new TextEncoder().encode(s.padEnd(4, '_'));
  };
  const head = Uint8Array.from(prefix);
  if (segments.length === 0) return concat([head, bytes(ZERO_OP)]);
  if (segments.length === 1) return concat([head, seg(segments[0]!)]);
  if (segments.length === 2) return concat([head, bytes(DUAL_NAME_PREFIX), seg(segments[0]!), seg(segments[1]!)]);
  return concat([head, bytes(MULTI_NAME_PREFIX, segments.length), ...segments.map(seg)]);
}

/** The smallest integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWord). */
export function integer(value: number | bigint): Aml {
  const v = BigInt(value);
  if (v === 0n) return bytes(ZERO_OP);
  if (v === 1n) return bytes(ONE_OP);
  if (v === 0xffff_ffff_ffff_ffffn) return bytes(ONES_OP);
  const le = (n: number) => Uint8Array.from({ length: n }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
  if (v <= 0xffn) return concat([bytes(BYTE_PREFIX), le(1)]);
  if (v <= 0xffffn) return concat([bytes(WORD_PREFIX), le(2)]);
  if (v <= 0xffff_ffffn) return concat([bytes(DWORD_PREFIX), le(4)]);
  return concat([bytes(QWORD_PREFIX), le(8)]);
}

export function string(text: string): Aml {
  return concat([bytes(STRING_PREFIX), new TextEncoder().encode(text), bytes(0)]);
}

/** EISAID("PNP0501") as the 32-bit compressed ID, encoded as an integer. */
export function eisaId(id: string): Aml {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new Error(`bad EISA id '${id}'`);
  const c = (i: number) => id.charCodeAt(i) - 0x40;
  const vendor = (c(0) << 10) | (c(1) << 5) | c(2);
  const product = parseInt(id.slice(3), 16);
  const value =
    ((vendor >> 8) & 0xff) | ((vendor & 0xff) << 8) | (((product >> 8) & 0xff) << 16) | ((product & 0xff) << 24);
  return concat([
    bytes(DWORD_PREFIX),
    Uint8Array.from([value & 0xff, (value >>> 8) & 0xff, (value >>> 16) & 0xff, (value >>> 24) & 0xff]),
  ]);
}

export function name(path: string, value: Aml): Aml {
  return concat([bytes(NAME_OP), nameString(path), value]);
}

export function packageOf(elements: readonly Aml[]): Aml {
  return withPkgLength(bytes(PACKAGE_OP), concat([bytes(elements.length), ...elements]));
}

export function buffer(data: Uint8Array): Aml {
  return withPkgLength(bytes(BUFFER_OP), concat([integer(data.length), data]));
}

export function scope(path: string, body: readonly Aml[]): Aml {
  return withPkgLength(bytes(SCOPE_OP), concat([nameString(path), ...body]));
}

export function device(path: string, body: readonly Aml[]): Aml {
  return withPkgLength(bytes(EXT_OP_PREFIX, DEVICE_OP), concat([nameString(path), ...body]));
}

/** Method(name, argCount) { body } (not serialized, sync level 0). */
export function method(path: string, args: number, body: readonly Aml[]): Aml {
  return withPkgLength(bytes(METHOD_OP), concat([nameString(path), bytes(args & 7), ...body]));
}

export const arg0: Aml = bytes(ARG0_OP);

export function ifThen(predicate: Aml, body: readonly Aml[]): Aml {
  return withPkgLength(bytes(IF_OP), concat([predicate, ...body]));
}

export function lEqual(a: Aml, b: Aml): Aml {
  return concat([bytes(LEQUAL_OP), a, b]);
}

export function notify(path: string, value: number): Aml {
  return concat([bytes(NOTIFY_OP), nameString(path), integer(value)]);
}

export function returnValue(value: Aml): Aml {
  return concat([bytes(RETURN_OP), value]);
}

// ---- Resource descriptors (ACPI 6.5, 6.4) ----

/** I/O port descriptor, 16-bit decode: fixed range [base, base+length). */
export function ioPort(base: number, length: number): Aml {
  return bytes(0x47, 0x01, base & 0xff, base >> 8, base & 0xff, base >> 8, 0x01, length);
}

/** IRQ descriptor (edge, active high) for ISA IRQs 0-15. */
export function irqNoFlags(irq: number): Aml {
  const mask = 1 << irq;
  return bytes(0x22, mask & 0xff, mask >> 8);
}

/** Extended interrupt descriptor: a consumer of one GSI, edge-triggered, active high, exclusive. */
export function extendedInterrupt(gsi: number): Aml {
  const flags = 0x01 /* consumer */ | 0x02; /* edge */
  return bytes(0x89, 6, 0, flags, 1, gsi & 0xff, (gsi >>> 8) & 0xff, (gsi >>> 16) & 0xff, gsi >>> 24);
}

/** Memory32Fixed descriptor (read/write). */
export function memory32Fixed(base: number, length: number): Aml {
  const le32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24];
  return bytes(0x86, 9, 0, 0x01, ...le32(base), ...le32(length));
}

// Address space descriptors (ACPI 6.5, 6.4.3.5): a bridge's producer windows, with
// fixed minimum and maximum (general flags MIF | MAF) and positive decode.
const ADDRESS_FIXED_RANGE = 0x0c;
const le = (value: number, bytes: number) =>
  Array.from({ length: bytes }, (_, i) => Math.floor(value / 2 ** (8 * i)) & 0xff);

/** WordBusNumber: the bus numbers a host bridge decodes. */
export function wordBusNumber(min: number, max: number): Aml {
  return Uint8Array.from([
    0x88,
    13,
    0,
    2,
    ADDRESS_FIXED_RANGE,
    0,
    ...le(0, 2),
    ...le(min, 2),
    ...le(max, 2),
    ...le(0, 2),
    ...le(max - min + 1, 2),
  ]);
}

/** DWordIO: an I/O port window [min, max] (entire range: ISA and non-ISA). */
export function dwordIo(min: number, max: number): Aml {
  return Uint8Array.from([
    0x87,
    23,
    0,
    1,
    ADDRESS_FIXED_RANGE,
    0x03,
    ...le(0, 4),
    ...le(min, 4),
    ...le(max, 4),
    ...le(0, 4),
    ...le(max - min + 1, 4),
  ]);
}

/** DWordMemory: a read/write, non-cacheable memory window [min, max]. */
export function dwordMemory(min: number, max: number): Aml {
  return Uint8Array.from([
    0x87,
    23,
    0,
    0,
    ADDRESS_FIXED_RANGE,
    0x01,
    ...le(0, 4),
    ...le(min, 4),
    ...le(max, 4),
    ...le(0, 4),
    ...le(max - min + 1, 4),
  ]);
}

/** ResourceTemplate: the descriptors plus the end tag with its checksum, as a Buffer. */
export function resourceTemplate(descriptors: readonly Aml[]): Aml {
  const body = concat([...descriptors, bytes(0x79)]);
  let sum = 0;
  for (const b of body) sum = (sum + b) & 0xff;
  return buffer(concat([body, bytes((0x100 - sum) & 0xff)]));
}

export { concat as amlConcat };
