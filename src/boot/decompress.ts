// Host-side decompression of a bzImage's payload (the compressed vmlinux ELF inside),
// so the kernel can be booted as an ELF without running its decompressor in the guest,
// which under emulated kernel mode takes minutes. Formats by magic (boot.rst, "payload"):
// gzip in-process; xz, lzma, lz4 (legacy frames, Debian's choice), zstd and bzip2 through
// the standard tools.
import { execFileSync } from 'node:child_process';
import { gunzipSync } from 'node:zlib';
import { KilnError } from '../errors.js';
import { dataView } from '../kvm/struct.js';
import { isElf, KernelImageError } from './elf.js';
import { setup_header } from './structs.js';

const SETUP_HEADER_OFFSET = 0x1f1;

interface Format {
  readonly name: string;
  readonly magic: readonly number[];
  readonly tool?: readonly [string, ...string[]];
  readonly pkg?: string;
}

const FORMATS: readonly Format[] = [
  { name: 'gzip', magic: [0x1f, 0x8b] },
  { name: 'xz', magic: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], tool: ['xz', '-dc', '--single-stream'], pkg: 'xz-utils' },
  { name: 'lzma', magic: [0x5d, 0x00, 0x00], tool: ['xz', '-dc', '--format=lzma'], pkg: 'xz-utils' },
  { name: 'lz4', magic: [0x02, 0x21, 0x4c, 0x18], tool: ['lz4', '-dc'], pkg: 'lz4' },
  { name: 'zstd', magic: [0x28, 0xb5, 0x2f, 0xfd], tool: ['zstd', '-dc'], pkg: 'zstd' },
  { name: 'bzip2', magic: [0x42, 0x5a, 0x68], tool: ['bzip2', '-dc'], pkg: 'bzip2' },
];

/** The payload's compression format, by its magic bytes. */
export function payloadFormat(payload: Uint8Array): Format | undefined {
  return FORMATS.find((f) => f.magic.every((b, i) => payload[i] === b));
}

function run(format: Format, input: Uint8Array): Uint8Array {
  if (!format.tool) return new Uint8Array(gunzipSync(input));
  const [cmd, ...args] = format.tool;
  try {
    return new Uint8Array(
      execFileSync(cmd, args, { input, maxBuffer: 1024 * 2 ** 20, stdio: ['pipe', 'pipe', 'pipe'] }),
    );
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    if (e.code === 'ENOENT')
      throw new KilnError(`decompressing a ${format.name} kernel needs ${cmd}: apt-get install ${format.pkg}`);
    throw new KilnError(`${cmd} could not decompress the kernel payload: ${e.stderr?.toString().trim() || e.message}`);
  }
}

/** Extracts and decompresses a bzImage's payload; returns the vmlinux ELF inside. */
export function decompressBzImage(image: Uint8Array): { elf: Uint8Array; format: string } {
  const dv = dataView(image);
  if (image.length < SETUP_HEADER_OFFSET + setup_header.size || dv.getUint32(0x202, true) !== 0x53726448) {
    throw new KernelImageError('only a bzImage can be decompressed on the host');
  }
  const hdr = setup_header.decode(dv, SETUP_HEADER_OFFSET);
  const setupBytes = ((Number(hdr.setup_sects) || 4) + 1) * 512;
  const offset = setupBytes + Number(hdr.payload_offset);
  const length = Number(hdr.payload_length);
  if (length === 0 || offset + length > image.length)
    throw new KernelImageError('the bzImage has no payload Kiln can find (boot protocol 2.08+ records one)');
  const payload = image.subarray(offset, offset + length);
  const format = payloadFormat(payload);
  if (!format)
    throw new KernelImageError(
      `the bzImage payload is compressed in a format Kiln does not know (magic ${[...payload.subarray(0, 4)].map((b) => b.toString(16).padStart(2, '0')).join(' ')})`,
    );
  // Kbuild appends the uncompressed size (4 bytes) after most formats' stream.
  let elf: Uint8Array;
  try {
    elf = run(format, payload);
  } catch (err) {
    if (!format.tool) throw err;
    elf = run(format, payload.subarray(0, payload.length - 4));
  }
  if (!isElf(elf)) throw new KernelImageError(`the decompressed ${format.name} payload is not an ELF vmlinux`);
  return { elf, format: format.name };
}
