import { describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  openSafetensors,
  openWeights,
  sha256File,
  writeSafetensors,
  expectShape,
  MissingTensorError,
  ShapeMismatchError,
  WeightsError,
} from '../../shared/weights/index.ts';

const GOLDEN = join(process.cwd(), '../shared/golden/dit/dit-tiny-p2');

// Independent parse of the file with plain Buffer reads, to check the lazy reader against.
function naive(path: string): Map<string, { dtype: string; shape: number[]; bytes: Buffer }> {
  const b = readFileSync(path);
  const n = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + n).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const m = new Map<string, { dtype: string; shape: number[]; bytes: Buffer }>();
  for (const [k, v] of Object.entries(h)) {
    if (k === '__metadata__') continue;
    m.set(k, { dtype: v.dtype, shape: v.shape, bytes: b.subarray(8 + n + v.data_offsets[0], 8 + n + v.data_offsets[1]) });
  }
  return m;
}

describe('safetensors reader on golden files', () => {
  it('golden files exist', () => {
    expect(existsSync(join(GOLDEN, 'weights.safetensors'))).toBe(true);
  });

  it('reads every F32 weight of dit-tiny-p2 equal to the raw bytes', () => {
    const path = join(GOLDEN, 'weights.safetensors');
    const ref = naive(path);
    const f = openSafetensors(path);
    try {
      expect(f.format).toBe('safetensors');
      expect(f.names().length).toBe(ref.size);
      expect(new Set(f.names())).toEqual(new Set(ref.keys()));
      for (const [name, r] of ref) {
        const info = f.info(name);
        expect(info.dtype).toBe(r.dtype);
        expect(info.shape).toEqual(r.shape);
        const a = f.readF32(name);
        expect(a.length).toBe(r.shape.reduce((x, y) => x * y, 1));
        expect(Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(r.bytes), name).toBe(true);
      }
      expect(expectShape(f, 'blocks.0.attn.qkv.weight', [192, 64]).dtype).toBe('F32');
      expect(() => expectShape(f, 'blocks.0.attn.qkv.weight', [64, 192])).toThrow(ShapeMismatchError);
      expect(() => expectShape(f, 'blocks.0.attn.qkv.weight', [64, 192])).toThrow(/blocks\.0\.attn\.qkv\.weight.*\[64, 192\].*\[192, 64\]/);
      expect(() => f.info('blocks.99.attn.qkv.weight')).toThrow(MissingTensorError);
      expect(() => f.readF32('nope.weight')).toThrow(/nope\.weight.*weights\.safetensors/);
    } finally {
      f.close();
    }
  });

  it('auto-detects safetensors whose header length starts with 0x80 (not a legacy pickle)', () => {
    const path = join(GOLDEN, '../dit-256tok-p2/io.safetensors');
    expect(readFileSync(path)[0]).toBe(0x80);
    const f = openWeights(path);
    expect(f.format).toBe('safetensors');
    expect(f.info('x').shape).toEqual([4, 4, 32, 32]);
    f.close();
  });

  it('reads I64 and F32 tensors of io.safetensors', () => {
    const path = join(GOLDEN, 'io.safetensors');
    const ref = naive(path);
    const f = openWeights(path);
    try {
      const t = ref.get('t')!;
      const want = new BigInt64Array(t.shape[0]);
      for (let i = 0; i < want.length; i++) want[i] = t.bytes.readBigInt64LE(8 * i);
      expect(f.info('t').dtype).toBe('I64');
      expect(f.readI64('t')).toEqual(want);
      expect(() => f.readF32('t')).toThrow(WeightsError);
      expect(() => f.readI64('x')).toThrow(/'x'.*F32/);
      const x = f.readF32('x');
      expect(x.length).toBe(4 * 4 * 8 * 8);
      expect(x[5]).toBe(ref.get('x')!.bytes.readFloatLE(20));
    } finally {
      f.close();
    }
  });

  it('round-trips through the writer and hashes by streaming', () => {
    const dir = mkdtempSync(join(tmpdir(), 'wst-'));
    try {
      const src = openSafetensors(join(GOLDEN, 'weights.safetensors'));
      const out = join(dir, 'copy.safetensors');
      let live = 0;
      writeSafetensors(
        out,
        src.names().map((name) => ({
          name,
          dtype: 'F32' as const,
          shape: src.info(name).shape,
          data: () => {
            live++;
            return src.readF32(name);
          },
        })),
        { source: 'golden' },
      );
      expect(live).toBe(src.names().length);
      const back = openSafetensors(out);
      expect(back.metadata).toEqual({ source: 'golden' });
      expect(back.names()).toEqual(src.names());
      for (const n of src.names()) {
        const [x, y] = [back.readF32(n), src.readF32(n)];
        expect(Buffer.from(x.buffer, x.byteOffset, x.byteLength).equals(Buffer.from(y.buffer, y.byteOffset, y.byteLength)), n).toBe(true);
      }
      back.close();
      src.close();
      expect(sha256File(out)).toBe(createHash('sha256').update(readFileSync(out)).digest('hex'));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
