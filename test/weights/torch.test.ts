import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  openSafetensors,
  openTorchCheckpoint,
  openWeights,
  expectShape,
  MissingTensorError,
  ShapeMismatchError,
  UnsafePickleError,
  WeightsError,
  type WeightFile,
} from '../../shared/weights/index.ts';
import { fixture, GOLDEN_DIT, tempDir } from './helpers.ts';

const dir = tempDir();
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function bytesOf(a: Float32Array | BigInt64Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

/** Every tensor of `expected` is in `f` with the same shape and bit-identical values. */
function expectSameTensors(f: WeightFile, expectedPath: string): void {
  const e = openSafetensors(expectedPath);
  try {
    expect([...f.names()].sort()).toEqual([...e.names()].sort());
    for (const n of e.names()) {
      const ei = e.info(n);
      expect(f.info(n).shape, n).toEqual(ei.shape);
      if (ei.dtype === 'I64') expect(bytesOf(f.readI64(n)).equals(bytesOf(e.readI64(n))), n).toBe(true);
      else expect(bytesOf(f.readF32(n)).equals(bytesOf(e.readF32(n))), n).toBe(true);
    }
  } finally {
    e.close();
  }
}

describe('torch.save checkpoints: golden DiT weights', () => {
  it('dit-tiny-p2/weights.pt (bare state_dict) equals weights.safetensors exactly', () => {
    const f = openWeights(join(GOLDEN_DIT, 'dit-tiny-p2/weights.pt'));
    try {
      expect(f.format).toBe('torch');
      expect((f as ReturnType<typeof openTorchCheckpoint>).selected).toBeNull();
      expectSameTensors(f, join(GOLDEN_DIT, 'dit-tiny-p2/weights.safetensors'));
      expect(expectShape(f, 'x_embedder.proj.weight', f.info('x_embedder.proj.weight').shape).dtype).toBe('F32');
    } finally {
      f.close();
    }
  });

  it('checkpoint-train-layout.pt loads "ema" by default, equal to weights.safetensors; "model" on request', () => {
    const p = join(GOLDEN_DIT, 'dit-tiny-p4-nosigma/checkpoint-train-layout.pt');
    const f = openTorchCheckpoint(p);
    try {
      expect(f.selected).toBe('ema');
      expectSameTensors(f, join(GOLDEN_DIT, 'dit-tiny-p4-nosigma/weights.safetensors'));
    } finally {
      f.close();
    }
    const m = openTorchCheckpoint(p, { prefer: 'model' });
    try {
      expect(m.selected).toBe('model');
      // The golden "model" half is all zeros (see golden README), so it must differ from ema.
      const w = m.readF32('final_layer.linear.weight');
      expect(w.length).toBeGreaterThan(0);
      expect(w.every((v) => v === 0)).toBe(true);
    } finally {
      m.close();
    }
  });
});

describe('torch.save checkpoints: fixtures made by torch', () => {
  it('bare state_dict with f32/f16/bf16/i64, transposed/offset/strided views, scalar, empty, Parameter', () => {
    const f = openTorchCheckpoint(fixture('bare-state-dict.pt'));
    try {
      expect(f.names()).toEqual([
        'steps',
        'proj.weight',
        'proj.bias',
        'norm.weight',
        'norm.bias',
        'view.transposed',
        'view.offset',
        'view.strided',
        'half.weight',
        'half.view',
        'bf16.weight',
        'scalar',
        'empty',
        'nested.deep.param',
      ]);
      expect(f.info('half.view')).toEqual({ name: 'half.view', dtype: 'F16', shape: [3, 3] });
      expect(f.info('bf16.weight').dtype).toBe('BF16');
      expect(f.info('scalar').shape).toEqual([]);
      expect(f.info('empty').shape).toEqual([0, 3]);
      expect(f.readF32('empty').length).toBe(0);
      expect(f.readI64('steps')).toEqual(BigInt64Array.from([3n, -7n, 1n << 40n]));
      expectSameTensors(f, fixture('bare-state-dict.expected.safetensors'));
    } finally {
      f.close();
    }
  });

  for (const variant of ['protocol4.pt', 'deflated.pt', 'archive-layout.pt']) {
    it(`${variant} reads the same tensors`, () => {
      const f = openWeights(fixture(variant));
      try {
        expectSameTensors(f, fixture('bare-state-dict.expected.safetensors'));
      } finally {
        f.close();
      }
    });
  }

  it('training layout {model, ema, opt, args}: prefers ema, optimizer state and Namespace are inert', () => {
    const f = openTorchCheckpoint(fixture('train-layout.pt'));
    try {
      expect(f.selected).toBe('ema');
      expectSameTensors(f, fixture('train-layout.ema.expected.safetensors'));
    } finally {
      f.close();
    }
    const m = openWeights(fixture('train-layout.pt'), { prefer: 'model' });
    try {
      expectSameTensors(m, fixture('train-layout.model.expected.safetensors'));
    } finally {
      m.close();
    }
  });

  it('nested dicts under state_dict flatten to dotted names', () => {
    const f = openTorchCheckpoint(fixture('nested.pt'));
    try {
      expect(f.selected).toBe('state_dict');
      expect(f.names()).toEqual(['encoder.w', 'encoder.b', 'head']);
      expectSameTensors(f, fixture('nested.expected.safetensors'));
    } finally {
      f.close();
    }
  });

  it('missing tensor and shape mismatch name the tensor (and both shapes)', () => {
    const f = openWeights(fixture('bare-state-dict.pt'));
    try {
      expect(() => f.readF32('proj.nothing')).toThrow(MissingTensorError);
      expect(() => f.info('proj.nothing')).toThrow(/missing tensor 'proj\.nothing' in .*bare-state-dict\.pt/);
      expect(() => expectShape(f, 'proj.weight', [6, 4])).toThrow(ShapeMismatchError);
      expect(() => expectShape(f, 'proj.weight', [6, 4])).toThrow(/'proj\.weight'.*expected \[6, 4\], got \[4, 6\]/);
      expect(() => f.readI64('proj.weight')).toThrow(/'proj\.weight'.*F32/);
    } finally {
      f.close();
    }
  });
});

describe('torch.save checkpoints: malicious pickles are refused without running anything', () => {
  const marker = '/tmp/ditpipe-weights-pwned';
  it.each([
    ['malicious-os-system.pt', /refusing pickle global 'posix\.system'/],
    ['malicious-eval.pt', /refusing pickle global '__builtin__\.eval'/],
    ['malicious-call-storage.pt', /calls global 'torch\.FloatStorage'.*refused/],
  ])('%s', (name, msg) => {
    rmSync(marker, { force: true });
    expect(() => openWeights(fixture(name))).toThrow(UnsafePickleError);
    expect(() => openTorchCheckpoint(fixture(name))).toThrow(msg);
    expect(existsSync(marker)).toBe(false);
  });
});

describe('torch.save checkpoints: bad inputs', () => {
  it('truncated zip', () => {
    expect(() => openWeights(fixture('truncated.pt'))).toThrow(WeightsError);
    expect(() => openWeights(fixture('truncated.pt'))).toThrow(/end-of-central-directory/);
  });
  it('corrupt data.pkl fails its CRC', () => {
    expect(() => openWeights(fixture('corrupt-pickle.pt'))).toThrow(/data\.pkl' fails its CRC check/);
  });
  it('missing storage entry names the tensor', () => {
    expect(() => openWeights(fixture('missing-storage.pt'))).toThrow(
      /tensor 'steps': storage '0' \(zip entry bare-state-dict\/data\/0\) is missing/,
    );
  });
  it('big-endian byteorder', () => {
    expect(() => openWeights(fixture('big-endian.pt'))).toThrow(/byteorder 'big' is not supported/);
  });
  it('legacy non-zip torch format', () => {
    const p = join(dir, 'legacy.pt');
    writeFileSync(p, Buffer.from([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e]));
    expect(() => openWeights(p)).toThrow(/legacy \(pre-1\.6, non-zip\) torch\.save format/);
  });
  it('zip without data.pkl', () => {
    const p = join(dir, 'nopkl.pt');
    // A valid, empty zip: just an end-of-central-directory record.
    const eocd = Buffer.alloc(22);
    eocd.writeUInt32LE(0x06054b50, 0);
    writeFileSync(p, eocd);
    expect(() => openTorchCheckpoint(p)).toThrow(/not a torch\.save zip checkpoint \(expected one <name>\/data\.pkl entry, found 0\)/);
  });
  it('storage shorter than the tensor view names the tensor', () => {
    // Shrink storage 1 (proj.weight, 24 floats) in the directory: patch the numel in the pickle instead.
    const src = readFileSync(fixture('bare-state-dict.pt'));
    const p = join(dir, 'short-storage.pt');
    copyFileSync(fixture('bare-state-dict.pt'), p);
    // proj.weight storage is persisted with numel 24 as BININT1 0x18 right after its 'cpu' location string.
    const at = src.indexOf(Buffer.from([0x4b, 0x18, 0x74]));
    expect(at).toBeGreaterThan(0);
    const patched = Buffer.from(src);
    patched[at + 1] = 0x10; // numel 16 < 24 elements the view needs
    // Keep the CRC valid so the bounds check (not the CRC) is what fires.
    fixCrc(patched, 'bare-state-dict/data.pkl');
    writeFileSync(p, patched);
    expect(() => openWeights(p)).toThrow(/tensor 'proj\.weight': view .* reaches element 23 of a 16-element storage/);
  });
  it('zip64 end-of-central-directory (as torch writes for > 4 GiB files) is followed', () => {
    const src = Buffer.from(readFileSync(join(GOLDEN_DIT, 'dit-tiny-p2/weights.pt')));
    const e = src.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
    expect(src.lastIndexOf(Buffer.from([0x50, 0x4b, 0x06, 0x07]))).toBe(e - 20);
    src.writeUInt16LE(0xffff, e + 8);
    src.writeUInt16LE(0xffff, e + 10);
    src.writeUInt32LE(0xffffffff, e + 12);
    src.writeUInt32LE(0xffffffff, e + 16);
    const p = join(dir, 'zip64.pt');
    writeFileSync(p, src);
    const f = openWeights(p);
    try {
      expectSameTensors(f, join(GOLDEN_DIT, 'dit-tiny-p2/weights.safetensors'));
    } finally {
      f.close();
    }
  });
});

import { crc32 } from 'node:zlib';
/** Recomputes the CRC of a stored entry in both its local header and central directory record. */
function fixCrc(zip: Buffer, name: string): void {
  const nameBuf = Buffer.from(name);
  let cd = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
  cd = zip.readUInt32LE(cd + 16);
  for (let p = cd; zip.readUInt32LE(p) === 0x02014b50;) {
    const nl = zip.readUInt16LE(p + 28);
    const xl = zip.readUInt16LE(p + 30);
    const cl = zip.readUInt16LE(p + 32);
    if (zip.subarray(p + 46, p + 46 + nl).equals(nameBuf)) {
      const lh = zip.readUInt32LE(p + 42);
      const size = zip.readUInt32LE(p + 20);
      const data = lh + 30 + zip.readUInt16LE(lh + 26) + zip.readUInt16LE(lh + 28);
      const c = crc32(zip.subarray(data, data + size)) >>> 0;
      zip.writeUInt32LE(c, p + 16);
      zip.writeUInt32LE(c, lh + 14);
      return;
    }
    p += 46 + nl + xl + cl;
  }
  throw new Error(`entry ${name} not found`);
}
