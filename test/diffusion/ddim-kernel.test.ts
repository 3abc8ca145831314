// The DDIM step's element loop runs in WebAssembly SIMD (shared/diffusion/ddim.wat). It must give
// the same bits as the scalar float32 loop it replaced (the original's operation order, each
// operation rounded with Math.fround), for every layout and option, on ordinary and awkward values.
import { describe, expect, it } from 'vitest';
import { spacedDiffusion } from '../../shared/diffusion/respace.ts';
import { ddimStep, type StepLayout } from '../../shared/diffusion/samplers.ts';

/** The scalar loop, as ddimStep computed it before the kernel (and as the original code orders it). */
function scalarDdim(
  index: number,
  x: Float32Array,
  modelOut: Float32Array,
  noise: Float32Array | null,
  layout: StepLayout,
  eta: number,
  clip: boolean,
): Float32Array {
  const d = spacedDiffusion({ respacing: 'ddim50' });
  const { count, channels, plane, outChannels } = layout;
  const sr = Math.fround(d.sqrtRecipAlphasCumprod[index]);
  const srm1 = Math.fround(d.sqrtRecipm1AlphasCumprod[index]);
  const ab = Math.fround(d.alphasCumprod[index]);
  const abPrev = Math.fround(d.alphasCumprodPrev[index]);
  const sigma = Math.fround(
    Math.fround(eta * Math.fround(Math.sqrt(Math.fround(Math.fround(1 - abPrev) / Math.fround(1 - ab))))) *
      Math.fround(Math.sqrt(Math.fround(1 - Math.fround(ab / abPrev)))),
  );
  const addNoise = index !== 0 && sigma !== 0;
  const sqrtAbPrev = Math.fround(Math.sqrt(abPrev));
  const dirCoef = Math.fround(Math.sqrt(Math.max(0, Math.fround(Math.fround(1 - abPrev) - Math.fround(sigma * sigma)))));
  const out = new Float32Array(x.length);
  for (let s = 0; s < count; s++) {
    for (let c = 0; c < channels; c++) {
      const xo = (s * channels + c) * plane;
      const eo = (s * outChannels + c) * plane;
      for (let p = 0; p < plane; p++) {
        const xt = x[xo + p];
        const srx = Math.fround(sr * xt);
        let x0 = Math.fround(srx - Math.fround(srm1 * modelOut[eo + p]));
        if (clip) x0 = x0 < -1 ? -1 : x0 > 1 ? 1 : x0;
        const eps = Math.fround(Math.fround(srx - x0) / srm1);
        let v = Math.fround(Math.fround(x0 * sqrtAbPrev) + Math.fround(dirCoef * eps));
        if (addNoise) v = Math.fround(v + Math.fround(sigma * (noise as Float32Array)[xo + p]));
        out[xo + p] = v;
      }
    }
  }
  return out;
}

/** Seeded values from a wide range, with the awkward ones mixed in: ±0, subnormals, huge, NaN, ±Inf. */
function values(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const rnd = (): number => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
  const special = [0, -0, 1e-45, -1e-40, 3.4e38, -2000, 2000, 1, -1, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY];
  return Float32Array.from({ length: n }, () => {
    const r = rnd();
    if (r < 0.05) return special[Math.floor(rnd() * special.length)];
    return (rnd() - 0.5) * 10 ** (rnd() * 8 - 3);
  });
}

/**
 * Bit patterns, with every NaN written as one: IEEE-754 leaves a NaN result's payload to the
 * machine (WebAssembly may give the canonical NaN where V8's scalar code keeps an input's).
 */
const bits = (a: Float32Array): number[] =>
  Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length), (b, i) => (Number.isNaN(a[i]) ? 0x7fc00000 : b));

/** The first element whose bits differ, described (a diff of whole large arrays would take minutes to print); null when none. */
function firstDifference(got: Float32Array, want: Float32Array): string | null {
  const g = bits(got);
  const w = bits(want);
  for (let i = 0; i < w.length; i++)
    if (g[i] !== w[i]) return `element ${i}: got ${got[i]} (0x${g[i].toString(16)}), want ${want[i]} (0x${w[i].toString(16)})`;
  return g.length === w.length ? null : `length ${g.length}, want ${w.length}`;
}

describe('DDIM step kernel (WebAssembly SIMD)', () => {
  const d = spacedDiffusion({ respacing: 'ddim50' });
  const cases: Array<{ count: number; channels: number; plane: number; learn: boolean; eta: number; clip: boolean; index: number }> = [];
  for (const [count, channels, plane] of [
    [1, 4, 64],
    [3, 4, 15],
    [2, 3, 1],
    [1, 4, 4096 / 4],
  ]) {
    for (const learn of [false, true]) {
      for (const eta of [0, 0.5, 1]) {
        for (const clip of [false, true])
          cases.push({ count, channels, plane, learn, eta, clip, index: cases.length % 3 === 0 ? 0 : 1 + (cases.length % 48) });
      }
    }
  }

  it.each(cases)(
    'matches the scalar float32 loop bit for bit: count $count, C $channels, plane $plane, learned sigma $learn, eta $eta, clip $clip, step index $index',
    (c) => {
      const layout: StepLayout = {
        count: c.count,
        channels: c.channels,
        plane: c.plane,
        outChannels: c.learn ? 2 * c.channels : c.channels,
      };
      const n = c.count * c.channels * c.plane;
      const x = values(n, 1 + n + c.index);
      const modelOut = values(c.count * layout.outChannels * c.plane, 7 + n);
      const noise = values(n, 13 + n);
      const want = scalarDdim(c.index, x, modelOut, noise, layout, c.eta, c.clip);
      const got = new Float32Array(n);
      ddimStep(d, c.index, x, modelOut, noise, layout, { eta: c.eta, clipDenoised: c.clip }, got);
      expect(firstDifference(got, want)).toBeNull();
      // In place, as the sampling state runs it.
      const inPlace = x.slice();
      ddimStep(d, c.index, inPlace, modelOut, noise, layout, { eta: c.eta, clipDenoised: c.clip }, inPlace);
      expect(firstDifference(inPlace, want)).toBeNull();
    },
  );

  it('keeps working when a larger request grows the kernel memory, and after it', () => {
    const layout: StepLayout = { count: 64, channels: 4, plane: 1024, outChannels: 8 };
    const n = 64 * 4 * 1024;
    const x = values(n, 99);
    const modelOut = values(2 * n, 100);
    const got = new Float32Array(n);
    ddimStep(d, 5, x, modelOut, null, layout, { eta: 0 }, got);
    expect(firstDifference(got, scalarDdim(5, x, modelOut, null, layout, 0, false))).toBeNull();
    const small: StepLayout = { count: 1, channels: 4, plane: 9, outChannels: 4 };
    const xs = values(36, 5);
    const es = values(36, 6);
    const out = new Float32Array(36);
    ddimStep(d, 3, xs, es, null, small, { eta: 0 }, out);
    expect(firstDifference(out, scalarDdim(3, xs, es, null, small, 0, false))).toBeNull();
  });
});
