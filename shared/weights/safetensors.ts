// safetensors reader (lazy: header parsed at open, each tensor read on demand by position) and streaming writer.
import { closeSync, fstatSync, openSync, writeSync } from 'node:fs';
import { bytesToF32, bytesToI64, f32ToF16Bits, openForRead, readFully } from './decode.ts';
import {
  DTYPE_SIZE,
  isWeightDType,
  MissingTensorError,
  numelOf,
  WeightsError,
  type TensorInfo,
  type WeightDType,
  type WeightFile,
} from './types.ts';

// Same cap as the reference implementation: a header this large is corruption, not a model.
const MAX_HEADER_BYTES = 100_000_000;

interface Entry extends TensorInfo {
  begin: number; // offset into the data section
  end: number;
}

export class SafetensorsFile implements WeightFile {
  readonly format = 'safetensors' as const;
  readonly metadata: Readonly<Record<string, string>>;
  private fd: number | undefined;
  private readonly entries = new Map<string, Entry>();
  private readonly order: string[] = [];
  private readonly dataStart: number;

  constructor(readonly path: string) {
    this.fd = openForRead(path);
    try {
      const size = fstatSync(this.fd).size;
      if (size < 8) throw new WeightsError(`${path}: truncated safetensors file (${size} bytes, need at least 8 for the header length)`);
      const lenBuf = new Uint8Array(8);
      readFully(this.fd, lenBuf, 0, 'header length');
      const headerLen = new DataView(lenBuf.buffer).getBigUint64(0, true);
      if (headerLen > BigInt(MAX_HEADER_BYTES))
        throw new WeightsError(
          `${path}: header length ${headerLen} exceeds the ${MAX_HEADER_BYTES}-byte limit (corrupt or not a safetensors file)`,
        );
      const hl = Number(headerLen);
      if (8 + hl > size)
        throw new WeightsError(`${path}: header length ${hl} runs past the end of the file (${size} bytes): truncated or corrupt`);
      const hbuf = new Uint8Array(hl);
      readFully(this.fd, hbuf, 8, 'header');
      this.dataStart = 8 + hl;
      let header: unknown;
      try {
        header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(hbuf));
      } catch (e) {
        throw new WeightsError(`${path}: header is not valid JSON: ${(e as Error).message}`);
      }
      if (typeof header !== 'object' || header === null || Array.isArray(header))
        throw new WeightsError(`${path}: header must be a JSON object`);
      this.metadata = parseHeader(path, header as Record<string, unknown>, size - this.dataStart, this.entries, this.order);
    } catch (e) {
      this.close();
      throw e;
    }
  }

  names(): string[] {
    return [...this.order];
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  info(name: string): TensorInfo {
    const e = this.entry(name);
    return { name: e.name, dtype: e.dtype, shape: [...e.shape] };
  }

  /** Raw little-endian bytes of one tensor, read from disk. */
  readBytes(name: string): Uint8Array {
    const e = this.entry(name);
    if (this.fd === undefined) throw new WeightsError(`${this.path}: file is closed`);
    // Own ArrayBuffer at offset 0, so typed views are aligned.
    const buf = new Uint8Array(new ArrayBuffer(e.end - e.begin));
    readFully(this.fd, buf, this.dataStart + e.begin, `tensor '${name}' of ${this.path}`);
    return buf;
  }

  readF32(name: string): Float32Array {
    const e = this.entry(name);
    return bytesToF32(this.readBytes(name), e.dtype, name);
  }

  readI64(name: string): BigInt64Array {
    const e = this.entry(name);
    return bytesToI64(this.readBytes(name), e.dtype, name);
  }

  close(): void {
    if (this.fd !== undefined) {
      closeSync(this.fd);
      this.fd = undefined;
    }
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name);
    if (!e) throw new MissingTensorError(name, this.path);
    return e;
  }
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function parseHeader(
  path: string,
  header: Record<string, unknown>,
  dataLen: number,
  entries: Map<string, Entry>,
  order: string[],
): Record<string, string> {
  const metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
        throw new WeightsError(`${path}: __metadata__ must be an object of strings`);
      for (const [k, v] of Object.entries(raw)) {
        if (typeof v !== 'string') throw new WeightsError(`${path}: __metadata__ field '${k}' must be a string, got ${typeof v}`);
        metadata[k] = v;
      }
      continue;
    }
    const where = `${path}: tensor '${name}'`;
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new WeightsError(`${where}: header entry must be an object`);
    const r = raw as Record<string, unknown>;
    if (typeof r.dtype !== 'string') throw new WeightsError(`${where}: missing field 'dtype'`);
    if (!isWeightDType(r.dtype)) throw new WeightsError(`${where}: unsupported dtype '${r.dtype}'`);
    if (!Array.isArray(r.shape) || !r.shape.every(isNonNegInt))
      throw new WeightsError(`${where}: field 'shape' must be an array of non-negative integers`);
    const off = r.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every(isNonNegInt))
      throw new WeightsError(`${where}: field 'data_offsets' must be [begin, end] non-negative integers`);
    const [begin, end] = off as [number, number];
    if (end < begin) throw new WeightsError(`${where}: data_offsets [${begin}, ${end}] end before begin`);
    if (end > dataLen)
      throw new WeightsError(`${where}: data_offsets [${begin}, ${end}] beyond the data section (${dataLen} bytes): truncated or corrupt`);
    const shape = r.shape;
    const dtype: WeightDType = r.dtype;
    const want = numelOf(shape) * DTYPE_SIZE[dtype];
    if (end - begin !== want)
      throw new WeightsError(`${where}: ${end - begin} bytes in data_offsets but shape [${shape.join(', ')}] of ${dtype} needs ${want}`);
    entries.set(name, { name, dtype, shape, begin, end });
    order.push(name);
  }
  // Buffers must tile the data section exactly: no overlap, no holes.
  const sorted = [...entries.values()].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  for (const e of sorted) {
    if (e.begin !== cursor) {
      const kind = e.begin < cursor ? 'overlaps the previous tensor' : `leaves a gap (previous data ends at ${cursor})`;
      throw new WeightsError(`${path}: tensor '${e.name}': data_offsets [${e.begin}, ${e.end}] ${kind}`);
    }
    cursor = e.end;
  }
  if (cursor !== dataLen)
    throw new WeightsError(`${path}: data section has ${dataLen} bytes but tensors cover ${cursor} (trailing bytes or corrupt header)`);
  return metadata;
}

export function openSafetensors(path: string): SafetensorsFile {
  return new SafetensorsFile(path);
}

export type WritableDType = 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'U8';

/**
 * One tensor to write. `data` may be the array itself or a function that produces it when the
 * writer reaches this tensor, so a caller can keep only one tensor in memory at a time.
 * Float32Array data is converted to the target float dtype; otherwise the array must already
 * hold the dtype's element type (Uint16Array bits for F16/BF16, BigInt64Array for I64, ...).
 */
export interface TensorToWrite {
  name: string;
  dtype: WritableDType;
  shape: number[];
  data: TensorData | (() => TensorData);
}

export type TensorData = Float32Array | Uint16Array | BigInt64Array | Int32Array | Uint8Array;

function toBytes(t: TensorToWrite, d: TensorData): Uint8Array {
  const n = numelOf(t.shape);
  if (d.length !== n)
    throw new WeightsError(`tensor '${t.name}': data has ${d.length} elements but shape [${t.shape.join(', ')}] needs ${n}`);
  let arr: TensorData = d;
  if (d instanceof Float32Array) {
    if (t.dtype === 'F16') arr = f32ToF16Bits(d);
    else if (t.dtype === 'BF16') {
      // Round to nearest even on the upper 16 bits.
      const u = new Uint32Array(d.buffer, d.byteOffset, d.length);
      const out = new Uint16Array(d.length);
      for (let i = 0; i < d.length; i++) {
        const x = u[i];
        out[i] = (x & 0x7f800000) === 0x7f800000 && x & 0x7fffff ? (x >>> 16) | 0x40 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
      }
      arr = out;
    } else if (t.dtype !== 'F32') throw new WeightsError(`tensor '${t.name}': Float32Array data cannot be written as ${t.dtype}`);
  } else {
    const ok =
      ((t.dtype === 'F16' || t.dtype === 'BF16') && d instanceof Uint16Array) ||
      (t.dtype === 'I64' && d instanceof BigInt64Array) ||
      (t.dtype === 'I32' && d instanceof Int32Array) ||
      (t.dtype === 'U8' && d instanceof Uint8Array);
    if (!ok) throw new WeightsError(`tensor '${t.name}': ${d.constructor.name} data does not match dtype ${t.dtype}`);
  }
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1)
    throw new WeightsError('big-endian hosts are not supported by the safetensors writer');
  return new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
}

/**
 * Streams a safetensors file: header first (from names/dtypes/shapes alone), then each tensor's
 * bytes in order, so at most one tensor's data is in memory at a time when `data` is lazy.
 */
export function writeSafetensors(path: string, tensors: Iterable<TensorToWrite>, metadata?: Record<string, string>): void {
  const list = [...tensors];
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  const seen = new Set<string>();
  for (const t of list) {
    if (t.name === '__metadata__') throw new WeightsError(`tensor name '__metadata__' is reserved`);
    if (seen.has(t.name)) throw new WeightsError(`duplicate tensor name '${t.name}'`);
    seen.add(t.name);
    if (!t.shape.every(isNonNegInt))
      throw new WeightsError(`tensor '${t.name}': shape ${JSON.stringify(t.shape)} must be non-negative integers`);
    const nbytes = numelOf(t.shape) * DTYPE_SIZE[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + nbytes] };
    offset += nbytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  // Pad with spaces to 8 bytes so every tensor starts 8-aligned (readers may map it directly).
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const fd = openSync(path, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    writeAll(fd, len);
    writeAll(fd, json);
    for (const t of list) {
      const d = typeof t.data === 'function' ? t.data() : t.data;
      writeAll(fd, toBytes(t, d));
    }
  } finally {
    closeSync(fd);
  }
}

function writeAll(fd: number, bytes: Uint8Array): void {
  const CHUNK = 1 << 30;
  let done = 0;
  while (done < bytes.byteLength) done += writeSync(fd, bytes, done, Math.min(CHUNK, bytes.byteLength - done));
}
