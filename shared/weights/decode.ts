// Raw little-endian tensor bytes → typed arrays, and positioned reads from a file descriptor.
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { endianness } from 'node:os';
import { DTYPE_SIZE, WeightsError, type WeightDType } from './types.ts';

// Typed-array views use host byte order; the files are little-endian.
const HOST_LE = endianness() === 'LE';

/** Opens a weights file for reading; a missing or unreadable file becomes a WeightsError naming the path. */
export function openForRead(path: string): number {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'file not found' : code === 'EISDIR' ? 'is a directory' : (e as Error).message;
    throw new WeightsError(`${path}: cannot open weights file: ${why}`);
  }
  if (!fstatSync(fd).isFile()) {
    closeSync(fd);
    throw new WeightsError(`${path}: cannot open weights file: not a regular file`);
  }
  return fd;
}

/** Reads exactly `dst.byteLength` bytes at `position`, in bounded chunks (readSync caps one call at 2 GiB). */
export function readFully(fd: number, dst: Uint8Array, position: number, what: string): void {
  const CHUNK = 1 << 30;
  let done = 0;
  while (done < dst.byteLength) {
    const len = Math.min(CHUNK, dst.byteLength - done);
    const n = readSync(fd, dst, done, len, position + done);
    if (n <= 0) throw new WeightsError(`unexpected end of file while reading ${what} (got ${done} of ${dst.byteLength} bytes)`);
    done += n;
  }
}

let f16Table: Float32Array | undefined;

/** All 65536 half-precision values as float32 (256 KiB, built once). */
function halfTable(): Float32Array {
  if (f16Table) return f16Table;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    let v: number;
    if (exp === 0) v = sign * frac * 2 ** -24;
    else if (exp === 31) v = frac === 0 ? sign * Infinity : NaN;
    else v = sign * (1 + frac / 1024) * 2 ** (exp - 15);
    t[h] = v;
  }
  f16Table = t;
  return t;
}

export function f16ToF32(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  const t = halfTable();
  for (let i = 0; i < bits.length; i++) out[i] = t[bits[i]];
  return out;
}

export function bf16ToF32(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  const u = new Uint32Array(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return out;
}

/** Float32 → IEEE half bits, round to nearest even (used by the writer). */
export function f32ToF16Bits(src: Float32Array, out = new Uint16Array(src.length)): Uint16Array {
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < src.length; i++) {
    f[0] = src[i];
    const x = u[0];
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    let mant = x & 0x7fffff;
    let h: number;
    if (exp === 0xff) {
      h = sign | 0x7c00 | (mant ? 0x200 : 0);
    } else {
      const e = exp - 127 + 15;
      if (e >= 31) h = sign | 0x7c00;
      else if (e <= 0) {
        if (e < -10) h = sign;
        else {
          mant |= 0x800000;
          const shift = 14 - e;
          let hm = mant >>> shift;
          const rem = mant & ((1 << shift) - 1);
          const half = 1 << (shift - 1);
          if (rem > half || (rem === half && hm & 1)) hm++;
          h = sign | hm;
        }
      } else {
        h = sign | (e << 10) | (mant >>> 13);
        const rem = mant & 0x1fff;
        if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++; // carry into exponent is correct IEEE behaviour
      }
    }
    out[i] = h;
  }
  return out;
}

function viewOf<T>(bytes: Uint8Array, bytesPer: number, make: (b: ArrayBuffer, off: number, n: number) => T, copy: () => T): T {
  if (HOST_LE && bytes.byteOffset % bytesPer === 0) return make(bytes.buffer as ArrayBuffer, bytes.byteOffset, bytes.byteLength / bytesPer);
  return copy();
}

function u16(bytes: Uint8Array): Uint16Array {
  return viewOf(
    bytes,
    2,
    (b, o, n) => new Uint16Array(b, o, n),
    () => {
      const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const out = new Uint16Array(bytes.byteLength / 2);
      for (let i = 0; i < out.length; i++) out[i] = dv.getUint16(2 * i, true);
      return out;
    },
  );
}

/** Decodes little-endian raw bytes of a float dtype into float32. */
export function bytesToF32(bytes: Uint8Array, dtype: WeightDType, name: string): Float32Array {
  const n = bytes.byteLength / DTYPE_SIZE[dtype];
  const dv = () => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (dtype) {
    case 'F32':
      return viewOf(
        bytes,
        4,
        (b, o, k) => new Float32Array(b, o, k),
        () => {
          const d = dv();
          const out = new Float32Array(n);
          for (let i = 0; i < n; i++) out[i] = d.getFloat32(4 * i, true);
          return out;
        },
      );
    case 'F16':
      return f16ToF32(u16(bytes));
    case 'BF16':
      return bf16ToF32(u16(bytes));
    case 'F64': {
      const d = dv();
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = d.getFloat64(8 * i, true);
      return out;
    }
    default:
      throw new WeightsError(`tensor '${name}' has dtype ${dtype}, not a float dtype (use readI64)`);
  }
}

/** Decodes little-endian raw bytes of an integer dtype into int64. */
export function bytesToI64(bytes: Uint8Array, dtype: WeightDType, name: string): BigInt64Array {
  const n = bytes.byteLength / DTYPE_SIZE[dtype];
  const d = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (dtype) {
    case 'I64':
      return viewOf(
        bytes,
        8,
        (b, o, k) => new BigInt64Array(b, o, k),
        () => {
          const out = new BigInt64Array(n);
          for (let i = 0; i < n; i++) out[i] = d.getBigInt64(8 * i, true);
          return out;
        },
      );
    case 'I32': {
      const out = new BigInt64Array(n);
      for (let i = 0; i < n; i++) out[i] = BigInt(d.getInt32(4 * i, true));
      return out;
    }
    case 'I16': {
      const out = new BigInt64Array(n);
      for (let i = 0; i < n; i++) out[i] = BigInt(d.getInt16(2 * i, true));
      return out;
    }
    case 'I8': {
      const out = new BigInt64Array(n);
      for (let i = 0; i < n; i++) out[i] = BigInt(d.getInt8(i));
      return out;
    }
    case 'U8':
    case 'BOOL': {
      const out = new BigInt64Array(n);
      for (let i = 0; i < n; i++) out[i] = BigInt(bytes[i]);
      return out;
    }
    default:
      throw new WeightsError(`tensor '${name}' has dtype ${dtype}, not an integer dtype (use readF32)`);
  }
}
