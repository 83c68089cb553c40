// A C struct codec: one declaration per kernel struct gives its size, alignment,
// field offsets (by dotted path, as `offsetof` would name them) and a decoder and
// encoder over any DataView. Layout follows the x86-64 SysV C rules: each field at
// its natural alignment, the struct padded to its largest alignment. Unnamed members
// (anonymous unions, as in kvm_run) are named '' and are transparent in paths.

export type Scalar = 'u8' | 'i8' | 'u16' | 'i16' | 'u32' | 'i32' | 'u64' | 'i64';
export type FieldType = Scalar | ArrayType | StructType;
export type Value = number | bigint | Uint8Array | Value[] | { [field: string]: Value };
export type Decoded = { [field: string]: Value };

const scalarSize: Record<Scalar, number> = { u8: 1, i8: 1, u16: 2, i16: 2, u32: 4, i32: 4, u64: 8, i64: 8 };

export class ArrayType {
  constructor(
    readonly element: FieldType,
    readonly length: number,
  ) {}
}

export interface Field {
  readonly name: string;
  readonly type: FieldType;
  readonly offset: number;
}

export function sizeOf(type: FieldType): number {
  if (typeof type === 'string') return scalarSize[type];
  if (type instanceof ArrayType) return sizeOf(type.element) * type.length;
  return type.size;
}

export function alignOf(type: FieldType): number {
  if (typeof type === 'string') return scalarSize[type];
  if (type instanceof ArrayType) return alignOf(type.element);
  return type.align;
}

const alignUp = (value: number, align: number): number => Math.ceil(value / align) * align;

export class StructType {
  readonly fields: readonly Field[];
  readonly size: number;
  readonly align: number;
  /** Offset of a trailing flexible array member (`__DECLARE_FLEX_ARRAY`), if any. */
  readonly flexOffset: number;

  constructor(
    readonly name: string,
    readonly isUnion: boolean,
    members: ReadonlyArray<readonly [string, FieldType]>,
    readonly flex?: readonly [string, FieldType],
    /** `__attribute__((packed))`: no padding, alignment 1. */
    readonly packed = false,
  ) {
    let offset = 0;
    let align = 1;
    let size = 0;
    const fields: Field[] = [];
    for (const [fieldName, type] of members) {
      const fieldAlign = packed ? 1 : alignOf(type);
      align = Math.max(align, fieldAlign);
      const at = isUnion ? 0 : alignUp(offset, fieldAlign);
      fields.push({ name: fieldName, type, offset: at });
      offset = at + sizeOf(type);
      size = Math.max(size, offset);
    }
    if (flex) align = Math.max(align, alignOf(flex[1]));
    this.fields = fields;
    this.align = align;
    this.size = alignUp(size, align);
    this.flexOffset = flex ? alignUp(size, alignOf(flex[1])) : this.size;
  }

  /** Byte offset of a field by dotted path ("io.port", "cs.selector", "entries"). */
  offsetOf(path: string): number {
    return this.resolve(path).offset;
  }

  /** The declared type at a dotted path. */
  typeOf(path: string): FieldType {
    return this.resolve(path).type;
  }

  /** Size of the struct with `count` elements in its flexible array member. */
  sizeWithFlex(count: number): number {
    if (!this.flex) throw new Error(`struct ${this.name} has no flexible array member`);
    return alignUp(this.flexOffset + count * sizeOf(this.flex[1]), this.align);
  }

  private resolve(path: string): { offset: number; type: FieldType } {
    if (this.flex && path === this.flex[0]) return { offset: this.flexOffset, type: this.flex[1] };
    const [head, ...rest] = path.split('.');
    const found = this.find(head!);
    if (!found) throw new Error(`struct ${this.name} has no field '${head}'`);
    if (rest.length === 0) return found;
    if (!(found.type instanceof StructType)) throw new Error(`field '${head}' of ${this.name} is not a struct`);
    const inner = found.type.resolve(rest.join('.'));
    return { offset: found.offset + inner.offset, type: inner.type };
  }

  private find(name: string): { offset: number; type: FieldType } | undefined {
    for (const field of this.fields) {
      if (field.name === name) return field;
      if (field.name === '' && field.type instanceof StructType) {
        const inner = field.type.find(name);
        if (inner) return { offset: field.offset + inner.offset, type: inner.type };
      }
    }
    return undefined;
  }

  /** Every leaf path (scalar or array) with its offset, for layout checks. */
  leaves(prefix = '', base = 0): Array<{ path: string; offset: number; size: number }> {
    const out: Array<{ path: string; offset: number; size: number }> = [];
    for (const field of this.fields) {
      const path = field.name === '' ? prefix.replace(/\.$/, '') : `${prefix}${field.name}`;
      if (field.type instanceof StructType) {
        out.push(...field.type.leaves(field.name === '' ? prefix : `${path}.`, base + field.offset));
      } else {
        out.push({ path, offset: base + field.offset, size: sizeOf(field.type) });
      }
    }
    if (this.flex && prefix === '') out.push({ path: this.flex[0], offset: this.flexOffset, size: 0 });
    return out;
  }

  decode(view: DataView, base = 0): Decoded {
    const out: Decoded = {};
    for (const field of this.fields) {
      const value = decodeValue(field.type, view, base + field.offset);
      if (field.name === '' && field.type instanceof StructType) Object.assign(out, value);
      else out[field.name] = value;
    }
    return out;
  }

  /** Writes the given fields; fields not named are left as they are in `view`. */
  encode(view: DataView, base: number, value: { readonly [field: string]: Value | undefined }): void {
    for (const [name, fieldValue] of Object.entries(value)) {
      if (fieldValue === undefined) continue;
      const resolved = this.find(name);
      if (!resolved) throw new Error(`struct ${this.name} has no field '${name}'`);
      encodeValue(resolved.type, view, base + resolved.offset, fieldValue);
    }
  }

  /** A zeroed buffer of this struct's size (plus `flexCount` flexible elements). */
  alloc(flexCount = 0): Buffer {
    return Buffer.alloc(flexCount > 0 ? this.sizeWithFlex(flexCount) : this.size);
  }
}

function decodeValue(type: FieldType, view: DataView, at: number): Value {
  if (typeof type === 'string') return readScalar(type, view, at);
  if (type instanceof ArrayType) {
    if (type.element === 'u8' || type.element === 'i8') {
      return new Uint8Array(view.buffer.slice(view.byteOffset + at, view.byteOffset + at + type.length));
    }
    const stride = sizeOf(type.element);
    return Array.from({ length: type.length }, (_, i) => decodeValue(type.element, view, at + i * stride));
  }
  return type.decode(view, at);
}

function encodeValue(type: FieldType, view: DataView, at: number, value: Value): void {
  if (typeof type === 'string') {
    if (typeof value !== 'number' && typeof value !== 'bigint') throw new TypeError(`expected a number for ${type}`);
    writeScalar(type, view, at, value);
    return;
  }
  if (type instanceof ArrayType) {
    const stride = sizeOf(type.element);
    const items = value instanceof Uint8Array ? Array.from(value) : (value as Value[]);
    if (items.length > type.length) throw new RangeError(`array of ${type.length} given ${items.length} items`);
    items.forEach((item, i) => encodeValue(type.element, view, at + i * stride, item));
    return;
  }
  type.encode(view, at, value as Decoded);
}

export function readScalar(type: Scalar, view: DataView, at: number): number | bigint {
  switch (type) {
    case 'u8':
      return view.getUint8(at);
    case 'i8':
      return view.getInt8(at);
    case 'u16':
      return view.getUint16(at, true);
    case 'i16':
      return view.getInt16(at, true);
    case 'u32':
      return view.getUint32(at, true);
    case 'i32':
      return view.getInt32(at, true);
    case 'u64':
      return view.getBigUint64(at, true);
    case 'i64':
      return view.getBigInt64(at, true);
  }
}

export function writeScalar(type: Scalar, view: DataView, at: number, value: number | bigint): void {
  switch (type) {
    case 'u8':
      return view.setUint8(at, Number(value));
    case 'i8':
      return view.setInt8(at, Number(value));
    case 'u16':
      return view.setUint16(at, Number(value), true);
    case 'i16':
      return view.setInt16(at, Number(value), true);
    case 'u32':
      return view.setUint32(at, Number(value), true);
    case 'i32':
      return view.setInt32(at, Number(value), true);
    case 'u64':
      return view.setBigUint64(at, BigInt.asUintN(64, BigInt(value)), true);
    case 'i64':
      return view.setBigInt64(at, BigInt.asIntN(64, BigInt(value)), true);
  }
}

export const struct = (
  name: string,
  members: ReadonlyArray<readonly [string, FieldType]>,
  flex?: readonly [string, FieldType],
) => new StructType(name, false, members, flex);
export const packedStruct = (name: string, members: ReadonlyArray<readonly [string, FieldType]>) =>
  new StructType(name, false, members, undefined, true);
export const union = (name: string, members: ReadonlyArray<readonly [string, FieldType]>) =>
  new StructType(name, true, members);
export const array = (element: FieldType, length: number) => new ArrayType(element, length);

/** A DataView over a whole Buffer (Buffers from the pool start at a non-zero byteOffset). */
export function dataView(buffer: Uint8Array): DataView {
  return new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
}

/**
 * A layout for shared memory declared with the codec, as a table of field offsets for
 * code on hot paths (`rec.getUint16(QUEUE_RECORD.enable, true)`), plus `bytes`, the size.
 */
export function layout<const M extends ReadonlyArray<readonly [string, FieldType]>>(
  name: string,
  members: M,
): { readonly [K in M[number][0]]: number } & { readonly bytes: number; readonly type: StructType } {
  const type = struct(name, members);
  const offsets: Record<string, number> = {};
  for (const field of type.fields) offsets[field.name] = field.offset;
  return { ...offsets, bytes: type.size, type } as { readonly [K in M[number][0]]: number } & {
    readonly bytes: number;
    readonly type: StructType;
  };
}
