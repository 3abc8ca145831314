import { afterAll, describe, expect, it } from 'vitest';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  openSafetensors,
  openWeights,
  writeSafetensors,
  sha256File,
  MissingTensorError,
  WeightsError,
} from '../../shared/weights/index.ts';
import { f32ToF16Bits, f16ToF32 } from '../../shared/weights/decode.ts';
import { fixture, rawSafetensors, tempDir } from './helpers.ts';

const dir = tempDir();
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('safetensors F16 / BF16 / I64 fixture (written by torch)', () => {
  it('decodes every dtype to the values torch reads', () => {
    const f = openSafetensors(fixture('mixed.safetensors'));
    const exp = openSafetensors(fixture('mixed.expected.safetensors'));
    try {
      expect(f.names()).toEqual(['a.f16', 'b.bf16', 'c.f32', 'd.i64']);
      expect(f.metadata).toEqual({ format: 'pt', note: 'fixture' });
      expect(f.info('a.f16')).toEqual({ name: 'a.f16', dtype: 'F16', shape: [9] });
      expect(f.info('b.bf16')).toEqual({ name: 'b.bf16', dtype: 'BF16', shape: [2, 3] });
      for (const n of ['a.f16', 'b.bf16', 'c.f32']) expect(f.readF32(n)).toEqual(exp.readF32(n));
      const a = f.readF32('a.f16');
      expect(a[2]).toBe(1);
      expect(a[4]).toBe(65504);
      expect(a[7]).toBe(Infinity);
      expect(Object.is(a[1], -0)).toBe(true);
      expect(f.readI64('d.i64')).toEqual(BigInt64Array.from([0n, -1n, 2n ** 62n, -(2n ** 62n)]));
      expect(() => f.readI64('a.f16')).toThrow(/'a\.f16'.*F16/);
      expect(() => f.readF32('d.i64')).toThrow(/'d\.i64'.*I64/);
    } finally {
      f.close();
      exp.close();
    }
  });

  it('openWeights detects safetensors by content', () => {
    const f = openWeights(fixture('mixed.safetensors'));
    expect(f.format).toBe('safetensors');
    f.close();
  });
});

describe('safetensors bad inputs', () => {
  const f32 = (n: number) => new Uint8Array(4 * n);
  const open = (p: string) => () => openSafetensors(p).close();

  it('truncated data', () => {
    expect(open(fixture('truncated.safetensors'))).toThrow(WeightsError);
    expect(open(fixture('truncated.safetensors'))).toThrow(/d\.i64.*beyond the data section/);
  });
  it('truncated header', () => {
    expect(open(fixture('truncated-header.safetensors'))).toThrow(/header length \d+ runs past the end of the file/);
  });
  it('file shorter than the length prefix', () => {
    const p = join(dir, 'three.bin');
    writeFileSync(p, new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9]).subarray(0, 3));
    expect(() => openSafetensors(p)).toThrow(/truncated safetensors file \(3 bytes/);
    expect(() => openWeights(p)).toThrow(/too short \(3 bytes\)/);
  });
  it('invalid JSON header', () => {
    expect(open(fixture('bad-json.safetensors'))).toThrow(/header is not valid JSON/);
  });
  it('absurd header length', () => {
    expect(open(rawSafetensors(dir, 'huge.safetensors', {}, new Uint8Array(0), 1n << 40n))).toThrow(/exceeds the 100000000-byte limit/);
  });
  it('header that is not an object', () => {
    expect(open(rawSafetensors(dir, 'arr.safetensors', [1, 2], new Uint8Array(0)))).toThrow(/header must be a JSON object/);
  });
  it('unknown dtype names the tensor and the dtype', () => {
    const p = rawSafetensors(dir, 'dtype.safetensors', { w: { dtype: 'F8_E4M3', shape: [2], data_offsets: [0, 2] } }, new Uint8Array(2));
    expect(open(p)).toThrow(WeightsError);
    expect(open(p)).toThrow(/tensor 'w': unsupported dtype 'F8_E4M3'/);
  });
  it('byte length that does not match the shape', () => {
    const p = rawSafetensors(dir, 'len.safetensors', { w: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 20] } }, f32(5));
    expect(open(p)).toThrow(/tensor 'w': 20 bytes in data_offsets but shape \[2, 3\] of F32 needs 24/);
  });
  it('data_offsets out of bounds', () => {
    const p = rawSafetensors(dir, 'oob.safetensors', { w: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, f32(2));
    expect(open(p)).toThrow(/tensor 'w': data_offsets \[0, 16\] beyond the data section \(8 bytes\)/);
  });
  it('data_offsets reversed / malformed', () => {
    const rev = rawSafetensors(dir, 'rev.safetensors', { w: { dtype: 'F32', shape: [0], data_offsets: [8, 4] } }, f32(2));
    expect(open(rev)).toThrow(/tensor 'w'.*end before begin/);
    const bad = rawSafetensors(dir, 'bad.safetensors', { w: { dtype: 'F32', shape: [1], data_offsets: [0] } }, f32(1));
    expect(open(bad)).toThrow(/tensor 'w': field 'data_offsets'/);
    const shape = rawSafetensors(dir, 'shape.safetensors', { w: { dtype: 'F32', shape: [-1], data_offsets: [0, 4] } }, f32(1));
    expect(open(shape)).toThrow(/tensor 'w': field 'shape'/);
    const nodt = rawSafetensors(dir, 'nodt.safetensors', { w: { shape: [1], data_offsets: [0, 4] } }, f32(1));
    expect(open(nodt)).toThrow(/tensor 'w': missing field 'dtype'/);
  });
  it('overlapping tensors', () => {
    const p = rawSafetensors(
      dir,
      'overlap.safetensors',
      { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } },
      f32(3),
    );
    expect(open(p)).toThrow(/tensor 'b'.*overlaps/);
  });
  it('gap between tensors and trailing bytes', () => {
    const gap = rawSafetensors(
      dir,
      'gap.safetensors',
      { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] } },
      f32(3),
    );
    expect(open(gap)).toThrow(/tensor 'b'.*gap/);
    const trail = rawSafetensors(dir, 'trail.safetensors', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, f32(2));
    expect(open(trail)).toThrow(/8 bytes but tensors cover 4/);
  });
  it('bad __metadata__', () => {
    const p = rawSafetensors(dir, 'meta.safetensors', { __metadata__: { epoch: 3 } }, new Uint8Array(0));
    expect(open(p)).toThrow(/__metadata__ field 'epoch' must be a string/);
  });
  it('missing tensor names the tensor and the file', () => {
    const f = openSafetensors(fixture('mixed.safetensors'));
    try {
      expect(() => f.info('e.missing')).toThrow(MissingTensorError);
      expect(() => f.readF32('e.missing')).toThrow(/missing tensor 'e\.missing' in .*mixed\.safetensors/);
      expect(f.has('e.missing')).toBe(false);
      expect(f.has('a.f16')).toBe(true);
    } finally {
      f.close();
    }
  });
  it('not a weights file at all', () => {
    expect(() => openWeights(fixture('not-weights.bin'))).toThrow(WeightsError);
    expect(() => openWeights(fixture('not-weights.bin'))).toThrow(/not-weights\.bin: neither safetensors .* nor a torch\.save zip/);
    expect(() => openWeights(join(dir, 'absent.safetensors'))).toThrow(/absent\.safetensors: cannot open weights file: file not found/);
    expect(() => openSafetensors(dir)).toThrow(WeightsError);
  });
  it('reads after close fail clearly', () => {
    const f = openSafetensors(fixture('mixed.safetensors'));
    f.close();
    expect(() => f.readF32('c.f32')).toThrow(/closed/);
  });
});

describe('safetensors writer', () => {
  it('writes F16 from f32 (round to nearest even) and I64, 8-aligned, lazily in order', () => {
    const p = join(dir, 'w.safetensors');
    const calls: string[] = [];
    const vals = new Float32Array([0, 1, -2, 0.1, 65504, 70000, 1e-8, 3.0517578125e-5, 1 + 2 ** -11]);
    writeSafetensors(
      p,
      [
        { name: 'h', dtype: 'F16', shape: [9], data: () => (calls.push('h'), vals) },
        { name: 'i', dtype: 'I64', shape: [2], data: () => (calls.push('i'), BigInt64Array.from([5n, -9n])) },
        { name: 'f', dtype: 'F32', shape: [1, 2], data: new Float32Array([1.5, -3]) },
        { name: 'raw16', dtype: 'F16', shape: [1], data: new Uint16Array([0x3c00]) },
      ],
      { k: 'v' },
    );
    expect(calls).toEqual(['h', 'i']);
    const buf = readFileSync(p);
    expect(Number(buf.readBigUInt64LE(0)) % 8).toBe(0);
    const f = openSafetensors(p);
    try {
      expect(f.metadata).toEqual({ k: 'v' });
      const h = f.readF32('h');
      expect(Array.from(h)).toEqual([0, 1, -2, f16ToF32(f32ToF16Bits(new Float32Array([0.1])))[0], 65504, Infinity, 0, 3.0517578125e-5, 1]);
      expect(Math.abs(h[3] - 0.1)).toBeLessThan(1e-4);
      expect(f.readI64('i')).toEqual(BigInt64Array.from([5n, -9n]));
      expect(f.readF32('f')).toEqual(new Float32Array([1.5, -3]));
      expect(f.readF32('raw16')).toEqual(new Float32Array([1]));
    } finally {
      f.close();
    }
    expect(sha256File(p)).toMatch(/^[0-9a-f]{64}$/);
  });

  it('f16 conversion agrees with torch on the fixture values', () => {
    const f = openSafetensors(fixture('mixed.safetensors'));
    const e = openSafetensors(fixture('mixed.expected.safetensors'));
    const back = f32ToF16Bits(e.readF32('a.f16'));
    const raw = f.readBytes('a.f16');
    expect(Array.from(back)).toEqual(Array.from(new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2)));
    f.close();
    e.close();
  });

  it('rejects wrong element counts, duplicate names and mismatched array types', () => {
    const p = join(dir, 'bad.safetensors');
    expect(() => writeSafetensors(p, [{ name: 'w', dtype: 'F32', shape: [3], data: new Float32Array(2) }])).toThrow(
      /tensor 'w': data has 2 elements but shape \[3\] needs 3/,
    );
    expect(() =>
      writeSafetensors(p, [
        { name: 'w', dtype: 'F32', shape: [1], data: new Float32Array(1) },
        { name: 'w', dtype: 'F32', shape: [1], data: new Float32Array(1) },
      ]),
    ).toThrow(/duplicate tensor name 'w'/);
    expect(() => writeSafetensors(p, [{ name: 'w', dtype: 'I64', shape: [1], data: new Float32Array(1) }])).toThrow(/tensor 'w'.*I64/);
  });
});
