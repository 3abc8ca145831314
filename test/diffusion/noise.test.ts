import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  advance,
  fillNormal,
  next,
  philox4x32,
  result,
  seedKey,
  start,
  STREAM_INITIAL,
  STREAM_STEP,
} from '../../shared/diffusion/index.ts';
import { normalFromWord } from '../../shared/diffusion/philox.ts';

interface Fixture {
  vectors: Array<{ seed: string; sample: number; step: number; stream: number; words: string[]; hex: string[] }>;
  invcdf: Array<[number, number]>;
}
const fixture = JSON.parse(readFileSync(new URL('./fixtures/noise-vectors.json', import.meta.url), 'utf8')) as Fixture;

const hex = (a: Uint32Array) => Array.from(a, (v) => v.toString(16).padStart(8, '0'));
const f32hex = (a: Float32Array) => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length), (v) => v.toString(16).padStart(8, '0'));

describe('Philox4x32-10', () => {
  it('matches the Random123 known-answer vectors', () => {
    const out = new Uint32Array(4);
    philox4x32(0, 0, 0, 0, 0, 0, out);
    expect(hex(out)).toEqual(['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']);
    philox4x32(0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, out);
    expect(hex(out)).toEqual(['408f276d', '41c83b0e', 'a20bc7c6', '6d5451fd']);
    philox4x32(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, out);
    expect(hex(out)).toEqual(['d16cfe09', '94fdcceb', '5001e420', '24126ea1']);
  });

  it('maps a uint64 seed to (low, high) key words and rejects others', () => {
    expect(seedKey(0x0123456789abcdefn)).toEqual([0x89abcdef, 0x01234567]);
    expect(() => seedKey(-1n)).toThrow(/seed: must be an unsigned 64-bit integer/);
    expect(() => seedKey(1n << 64n)).toThrow(/seed/);
  });
});

describe('normal transform', () => {
  it('is within 1.2e-9 relative of the exact inverse normal CDF', () => {
    for (const [w, ref] of fixture.invcdf) {
      expect(Math.abs(normalFromWord(w) - ref)).toBeLessThanOrEqual(1.2e-9 * Math.abs(ref));
    }
  });

  it('is odd-symmetric: word w and 2^32−1−w give opposite values', () => {
    for (const w of [0, 7, 104152956, 2 ** 31 - 1, 123456789]) {
      expect(normalFromWord(2 ** 32 - 1 - w)).toBeCloseTo(-normalFromWord(w), 12);
    }
  });
});

describe('noise streams', () => {
  it('reproduce the documented test vectors bit for bit', () => {
    for (const v of fixture.vectors) {
      const key = seedKey(BigInt(v.seed));
      const block = new Uint32Array(4);
      philox4x32(0, v.step, v.sample, v.stream, key[0], key[1], block);
      expect(hex(block)).toEqual(v.words);
      const out = new Float32Array(8);
      fillNormal(out, 0, 8, key, v.sample, v.step, v.stream);
      expect(f32hex(out)).toEqual(v.hex);
    }
  });

  it('fill of a sub-range equals the prefix of a longer fill at another offset', () => {
    const key = seedKey(99n);
    const long = new Float32Array(37);
    fillNormal(long, 0, 37, key, 3, 4, STREAM_STEP);
    const buf = new Float32Array(50);
    fillNormal(buf, 5, 10, key, 3, 4, STREAM_STEP);
    expect(Array.from(buf.subarray(5, 15))).toEqual(Array.from(long.subarray(0, 10)));
    expect(buf[4]).toBe(0);
    expect(buf[15]).toBe(0);
  });

  it('the SIMD fill equals the scalar definition (philox4x32, then normalFromWord) bit for bit', () => {
    // Lengths around multiples of 4 and of the 4-block SIMD group, a latent, and one large enough
    // to grow the WebAssembly memory; keys and counters with high bits set.
    const block = new Uint32Array(4);
    const cases: [bigint, number, number, number, number][] = [
      [0n, 0, 0, STREAM_INITIAL, 1],
      [1n, 1, 1, STREAM_STEP, 3],
      [0xffffffffffffffffn, 0xffffffff, 0xfffffffe, STREAM_STEP, 15],
      [123456789012345n, 7, 249, STREAM_STEP, 17],
      [42n, 2 ** 31, 2 ** 31 + 5, STREAM_INITIAL, 4 * 32 * 32],
      [2n ** 63n + 11n, 12, 999, STREAM_STEP, 4 * 32 * 32 - 1],
      [777n, 3, 0, STREAM_INITIAL, 4 * 128 * 128 + 2],
    ];
    for (const [seed, sample, step, stream, length] of cases) {
      const key = seedKey(seed);
      const got = new Float32Array(length + 2);
      fillNormal(got, 1, length, key, sample, step, stream);
      const want = new Float32Array(length + 2);
      for (let e = 0; e < length; e++) {
        if (e % 4 === 0) philox4x32(e / 4, step, sample, stream, key[0], key[1], block);
        want[1 + e] = normalFromWord(block[e % 4]);
      }
      expect(f32hex(got)).toEqual(f32hex(want));
    }
  });

  const N = 1 << 18;
  const draw = (seed: bigint, sample: number, step: number, stream: number) => {
    const a = new Float32Array(N);
    fillNormal(a, 0, N, seedKey(seed), sample, step, stream);
    return a;
  };

  it('has standard normal moments', () => {
    const a = draw(12345n, 0, 0, STREAM_INITIAL);
    let s1 = 0;
    let s2 = 0;
    let s3 = 0;
    let s4 = 0;
    let beyond2 = 0;
    for (const v of a) {
      s1 += v;
      s2 += v * v;
      s3 += v * v * v;
      s4 += v * v * v * v;
      if (Math.abs(v) > 2) beyond2++;
    }
    const mean = s1 / N;
    const variance = s2 / N - mean * mean;
    // 5σ bounds of the sampling error at N = 2^18.
    expect(Math.abs(mean)).toBeLessThan(5 / Math.sqrt(N));
    expect(Math.abs(variance - 1)).toBeLessThan(5 * Math.sqrt(2 / N));
    expect(Math.abs(s3 / N)).toBeLessThan(5 * Math.sqrt(15 / N));
    expect(Math.abs(s4 / N - 3)).toBeLessThan(5 * Math.sqrt(96 / N));
    expect(Math.abs(beyond2 / N - 0.0455)).toBeLessThan(0.003);
  });

  it('neighbouring seeds, samples, steps and streams are uncorrelated', () => {
    const corr = (a: Float32Array, b: Float32Array) => {
      let ab = 0;
      let aa = 0;
      let bb = 0;
      for (let i = 0; i < a.length; i++) {
        ab += a[i] * b[i];
        aa += a[i] * a[i];
        bb += b[i] * b[i];
      }
      return ab / Math.sqrt(aa * bb);
    };
    const ref = draw(7n, 10, 20, STREAM_STEP);
    const neighbours = [
      draw(8n, 10, 20, STREAM_STEP),
      draw(7n + (1n << 32n), 10, 20, STREAM_STEP),
      draw(7n, 11, 20, STREAM_STEP),
      draw(7n, 10, 21, STREAM_STEP),
      draw(7n, 10, 20, STREAM_INITIAL),
    ];
    const bound = 5 / Math.sqrt(N);
    for (const nb of neighbours) {
      expect(Math.abs(corr(ref, nb))).toBeLessThan(bound);
      let equal = 0;
      for (let i = 0; i < N; i++) if (nb[i] === ref[i]) equal++;
      expect(equal).toBeLessThan(5);
    }
    // Lag-1 and lag-4 (same word of the next block) within a stream.
    for (const lag of [1, 4]) {
      expect(Math.abs(corr(ref.subarray(0, N - lag), ref.subarray(lag)))).toBeLessThan(bound * 1.01);
    }
  });
});

describe('batch-order independence', () => {
  const shape: [number, number, number] = [2, 3, 5];
  // A deterministic stand-in for a model: depends only on the sample's own latent and timestep.
  const fakeModel = (x: Float32Array, t: Int32Array, count: number, outChannels: number) => {
    const per = shape[0] * shape[1] * shape[2];
    const out = new Float32Array(count * outChannels * shape[1] * shape[2]);
    for (let s = 0; s < count; s++) {
      for (let i = 0; i < outChannels * shape[1] * shape[2]; i++) {
        out[s * outChannels * shape[1] * shape[2] + i] = Math.tanh(x[s * per + (i % per)] * 0.7 + t[s] * 1e-3);
      }
    }
    return out;
  };
  const run = (sampler: 'ddpm' | 'ddim', count: number, offset: number | number[]) => {
    const at = typeof offset === 'number' ? { sampleIndexOffset: offset } : { sampleIndices: offset };
    const st = start({ sampler, respacing: '12', shape, count, learnSigma: true, seed: 2024n, ...at, eta: 0.5 });
    for (let p = next(st); p; p = next(st)) advance(st, fakeModel(p.x, p.t, count, 2 * shape[0]));
    return result(st);
  };

  for (const sampler of ['ddpm', 'ddim'] as const) {
    it(`${sampler}: a sample's result does not depend on the batch it runs in`, () => {
      const per = shape[0] * shape[1] * shape[2];
      const together = run(sampler, 4, 0);
      const pairLate = run(sampler, 2, 2);
      for (let k = 0; k < 4; k++) {
        const alone = run(sampler, 1, k);
        expect(Array.from(together.subarray(k * per, (k + 1) * per))).toEqual(Array.from(alone));
      }
      expect(Array.from(pairLate)).toEqual(Array.from(together.subarray(2 * per)));
      // Any subset, in any order (the scheduler samples only what its repeat cache lacks).
      const picked = run(sampler, 2, [3, 1]);
      expect(Array.from(picked.subarray(0, per))).toEqual(Array.from(together.subarray(3 * per, 4 * per)));
      expect(Array.from(picked.subarray(per))).toEqual(Array.from(together.subarray(per, 2 * per)));
      // And different samples really differ.
      expect(Array.from(together.subarray(0, per))).not.toEqual(Array.from(together.subarray(per, 2 * per)));
    });
  }
});
