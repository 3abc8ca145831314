// Minimal zip reader for torch.save archives: central directory (with ZIP64), stored or deflated entries,
// read by position so a multi-GB checkpoint is never loaded whole.
import { closeSync, fstatSync } from 'node:fs';
import { crc32, inflateRawSync } from 'node:zlib';
import { openForRead, readFully } from './decode.ts';
import { WeightsError } from './types.ts';

export interface ZipEntry {
  name: string;
  method: number; // 0 stored, 8 deflate
  compressedSize: number;
  size: number;
  crc: number;
  localHeaderOffset: number;
}

const SIG_EOCD = 0x06054b50;
const SIG_EOCD64 = 0x06064b50;
const SIG_EOCD64_LOC = 0x07064b50;
const SIG_CDH = 0x02014b50;
const SIG_LFH = 0x04034b50;

/**
 * Largest entry inflated into memory. torch.save stores tensors uncompressed (read by position);
 * only a re-zipped checkpoint deflates them, and then each read inflates the whole entry.
 */
export const MAX_INFLATED_BYTES = 1024 * 1024 * 1024;
/** Deflate cannot expand more than about 1032:1; a larger declared size is a lie. */
const MAX_DEFLATE_RATIO = 1032;

function u64(dv: DataView, off: number, what: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new WeightsError(`zip ${what} ${v} is too large`);
  return Number(v);
}

export class ZipReader {
  private fd: number | undefined;
  readonly size: number;
  readonly entries = new Map<string, ZipEntry>();
  private readonly dataOffsets = new Map<string, number>();

  constructor(readonly path: string) {
    this.fd = openForRead(path);
    try {
      this.size = fstatSync(this.fd).size;
      this.readCentralDirectory();
    } catch (e) {
      this.close();
      throw e;
    }
  }

  private read(pos: number, len: number, what: string): DataView {
    if (this.fd === undefined) throw new WeightsError(`${this.path}: file is closed`);
    if (pos < 0 || pos + len > this.size)
      throw new WeightsError(
        `${this.path}: ${what} at byte ${pos} (+${len}) lies outside the file (${this.size} bytes): truncated or corrupt zip`,
      );
    const buf = new Uint8Array(len);
    readFully(this.fd, buf, pos, `${what} of ${this.path}`);
    return new DataView(buf.buffer);
  }

  private readCentralDirectory(): void {
    // The end-of-central-directory record sits in the last 22 + 65535 (comment) bytes.
    const tailLen = Math.min(this.size, 22 + 65535);
    if (this.size < 22) throw new WeightsError(`${this.path}: truncated zip (${this.size} bytes, no end-of-central-directory record)`);
    const tailStart = this.size - tailLen;
    const tail = this.read(tailStart, tailLen, 'zip tail');
    let eocd = -1;
    for (let i = tailLen - 22; i >= 0; i--) {
      if (tail.getUint32(i, true) === SIG_EOCD) {
        eocd = i;
        break;
      }
    }
    if (eocd < 0) throw new WeightsError(`${this.path}: no zip end-of-central-directory record (truncated or not a torch.save zip)`);
    let count = tail.getUint16(eocd + 10, true);
    let cdSize = tail.getUint32(eocd + 12, true);
    let cdOffset = tail.getUint32(eocd + 16, true);
    if (
      (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) &&
      eocd >= 20 &&
      tail.getUint32(eocd - 20, true) === SIG_EOCD64_LOC
    ) {
      const e64Off = u64(tail, eocd - 20 + 8, 'zip64 EOCD offset');
      const e64 = this.read(e64Off, 56, 'zip64 end-of-central-directory');
      if (e64.getUint32(0, true) !== SIG_EOCD64) throw new WeightsError(`${this.path}: bad zip64 end-of-central-directory signature`);
      count = u64(e64, 32, 'entry count');
      cdSize = u64(e64, 40, 'central directory size');
      cdOffset = u64(e64, 48, 'central directory offset');
    }
    const cd = this.read(cdOffset, cdSize, 'zip central directory');
    let p = 0;
    for (let i = 0; i < count; i++) {
      if (p + 46 > cdSize || cd.getUint32(p, true) !== SIG_CDH)
        throw new WeightsError(`${this.path}: corrupt zip central directory at entry ${i}`);
      const flags = cd.getUint16(p + 8, true);
      const method = cd.getUint16(p + 10, true);
      const crc = cd.getUint32(p + 16, true);
      let compressedSize = cd.getUint32(p + 20, true);
      let size = cd.getUint32(p + 24, true);
      const nameLen = cd.getUint16(p + 28, true);
      const extraLen = cd.getUint16(p + 30, true);
      const commentLen = cd.getUint16(p + 32, true);
      let localHeaderOffset = cd.getUint32(p + 42, true);
      if (p + 46 + nameLen + extraLen > cdSize) throw new WeightsError(`${this.path}: corrupt zip central directory at entry ${i}`);
      const name = new TextDecoder().decode(new Uint8Array(cd.buffer, p + 46, nameLen));
      if (flags & 1) throw new WeightsError(`${this.path}: zip entry '${name}' is encrypted`);
      // ZIP64 extended information: 64-bit values present only for fields saturated at 0xffffffff.
      let e = p + 46 + nameLen;
      const eEnd = e + extraLen;
      while (e + 4 <= eEnd) {
        const id = cd.getUint16(e, true);
        const len = cd.getUint16(e + 2, true);
        if (id === 0x0001) {
          let q = e + 4;
          if (size === 0xffffffff) {
            size = u64(cd, q, 'entry size');
            q += 8;
          }
          if (compressedSize === 0xffffffff) {
            compressedSize = u64(cd, q, 'entry size');
            q += 8;
          }
          if (localHeaderOffset === 0xffffffff) localHeaderOffset = u64(cd, q, 'entry offset');
        }
        e += 4 + len;
      }
      this.entries.set(name, { name, method, compressedSize, size, crc, localHeaderOffset });
      p += 46 + nameLen + extraLen + commentLen;
    }
  }

  /** Absolute file offset of an entry's (possibly compressed) data. */
  private dataOffset(entry: ZipEntry): number {
    const cached = this.dataOffsets.get(entry.name);
    if (cached !== undefined) return cached;
    const lh = this.read(entry.localHeaderOffset, 30, `local header of '${entry.name}'`);
    if (lh.getUint32(0, true) !== SIG_LFH) throw new WeightsError(`${this.path}: bad local header for zip entry '${entry.name}'`);
    const off = entry.localHeaderOffset + 30 + lh.getUint16(26, true) + lh.getUint16(28, true);
    if (off + entry.compressedSize > this.size)
      throw new WeightsError(`${this.path}: zip entry '${entry.name}' runs past the end of the file: truncated`);
    this.dataOffsets.set(entry.name, off);
    return off;
  }

  entry(name: string): ZipEntry | undefined {
    return this.entries.get(name);
  }

  /**
   * Whole entry, decompressed and CRC-checked (for data.pkl and small entries). A deflated entry
   * is inflated against its declared size, never past it, and never past `maxBytes`: a small zip
   * cannot make the reader allocate gigabytes.
   */
  readEntry(name: string, maxBytes = MAX_INFLATED_BYTES): Uint8Array {
    const entry = this.entries.get(name);
    if (!entry) throw new WeightsError(`${this.path}: zip entry '${name}' not found`);
    if (entry.size > maxBytes) {
      throw new WeightsError(`${this.path}: zip entry '${name}' declares ${entry.size} bytes, more than the ${maxBytes}-byte limit for it`);
    }
    let data: Uint8Array;
    if (entry.method === 0) {
      if (entry.compressedSize !== entry.size)
        throw new WeightsError(`${this.path}: stored zip entry '${name}' has ${entry.compressedSize} bytes, directory says ${entry.size}`);
      data = new Uint8Array(this.read(this.dataOffset(entry), entry.compressedSize, `zip entry '${name}'`).buffer);
    } else if (entry.method === 8) {
      if (entry.size > entry.compressedSize * MAX_DEFLATE_RATIO + 1024) {
        throw new WeightsError(
          `${this.path}: zip entry '${name}' declares ${entry.size} bytes from ${entry.compressedSize} compressed, more than deflate can expand: corrupt`,
        );
      }
      const raw = new Uint8Array(this.read(this.dataOffset(entry), entry.compressedSize, `zip entry '${name}'`).buffer);
      try {
        // One byte of room past the declared size tells "more than declared" from "exactly".
        data = new Uint8Array(inflateRawSync(raw, { maxOutputLength: entry.size + 1 }));
      } catch (e) {
        const tooBig = (e as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE' || e instanceof RangeError;
        throw new WeightsError(
          tooBig
            ? `${this.path}: zip entry '${name}' inflates past its declared ${entry.size} bytes: corrupt or hostile`
            : `${this.path}: zip entry '${name}' does not inflate: ${(e as Error).message}`,
        );
      }
    } else throw new WeightsError(`${this.path}: zip entry '${name}' uses unsupported compression method ${entry.method}`);
    if (data.byteLength !== entry.size)
      throw new WeightsError(`${this.path}: zip entry '${name}' has ${data.byteLength} bytes, directory says ${entry.size}`);
    if (crc32(data) >>> 0 !== entry.crc >>> 0) throw new WeightsError(`${this.path}: zip entry '${name}' fails its CRC check (corrupt)`);
    return data;
  }

  /** Bytes [start, start+len) of an entry's uncompressed data; stored entries are read by position only. */
  readRange(name: string, start: number, len: number, dst?: Uint8Array): Uint8Array {
    const entry = this.entries.get(name);
    if (!entry) throw new WeightsError(`${this.path}: zip entry '${name}' not found`);
    if (start < 0 || start + len > entry.size)
      throw new WeightsError(`${this.path}: range [${start}, ${start + len}) outside zip entry '${name}' (${entry.size} bytes)`);
    const out = dst ?? new Uint8Array(new ArrayBuffer(len));
    if (entry.method === 0) {
      if (this.fd === undefined) throw new WeightsError(`${this.path}: file is closed`);
      readFully(this.fd, out, this.dataOffset(entry) + start, `zip entry '${name}' of ${this.path}`);
    } else {
      out.set(this.readEntry(name).subarray(start, start + len));
    }
    return out;
  }

  close(): void {
    if (this.fd !== undefined) {
      closeSync(this.fd);
      this.fd = undefined;
    }
  }
}
