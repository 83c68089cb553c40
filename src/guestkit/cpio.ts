// An initramfs writer: the "newc" cpio format the kernel unpacks
// (Documentation/driver-api/early-userspace/buffer-format.rst), uncompressed, because
// inflating even a small gzip archive costs tens of seconds under emulated kernel mode.

export type CpioEntry =
  | { readonly type: 'dir'; readonly path: string; readonly mode?: number }
  | { readonly type: 'file'; readonly path: string; readonly data: Uint8Array; readonly mode?: number }
  | { readonly type: 'symlink'; readonly path: string; readonly target: string }
  | {
      readonly type: 'chardev';
      readonly path: string;
      readonly major: number;
      readonly minor: number;
      readonly mode?: number;
    };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const TRAILER = 'TRAILER!!!';

const hex8 = (n: number) => n.toString(16).padStart(8, '0');
const pad4 = (n: number) => (4 - (n % 4)) % 4;

export function buildCpio(entries: readonly CpioEntry[]): Uint8Array {
  const chunks: Uint8Array[] = [];
  let length = 0;
  const push = (bytes: Uint8Array) => {
    chunks.push(bytes);
    length += bytes.length;
    if (pad4(length)) push(new Uint8Array(pad4(length)));
  };
  let ino = 1;
  const add = (path: string, mode: number, data: Uint8Array, rdev: [number, number] = [0, 0]) => {
    const name = new TextEncoder().encode(`${path.replace(/^\/+/, '')}\0`);
    const fields = [
      '070701',
      hex8(ino++),
      hex8(mode),
      hex8(0),
      hex8(0),
      hex8(1),
      hex8(0),
      hex8(data.length),
      hex8(0),
      hex8(0),
      hex8(rdev[0]),
      hex8(rdev[1]),
      hex8(name.length),
      hex8(0),
    ];
    const header = new TextEncoder().encode(fields.join(''));
    const head = new Uint8Array(header.length + name.length);
    head.set(header);
    head.set(name, header.length);
    push(head);
    if (data.length) push(data);
  };
  for (const e of entries) {
    switch (e.type) {
      case 'dir':
        add(e.path, S_IFDIR | (e.mode ?? 0o755), new Uint8Array(0));
        break;
      case 'file':
        add(e.path, S_IFREG | (e.mode ?? 0o644), e.data);
        break;
      case 'symlink':
        add(e.path, S_IFLNK | 0o777, new TextEncoder().encode(e.target));
        break;
      case 'chardev':
        add(e.path, S_IFCHR | (e.mode ?? 0o600), new Uint8Array(0), [e.major, e.minor]);
        break;
    }
  }
  add(TRAILER, 0, new Uint8Array(0));
  const out = new Uint8Array(length);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}
