// Reverse-diffusion steps over float32 latents [count, C, H, W].
//
// DDPM and DDIM reproduce the original `GaussianDiffusion.p_sample` / `ddim_sample` operation by
// operation in float32, as torch runs them: the float64 tables are converted to float32 when
// extracted (`_extract_into_tensor(...).float()`), and every tensor operation rounds to float32
// (`Math.fround`, in the original's evaluation order). On the golden runs, where latents reach
// |x| ≈ 2000 and the x0 prediction is larger still, float64 arithmetic landed up to 2.4e-4 from the
// original's step; in float32 order it is within 6.1e-5 (half an ulp there) and exact at the last
// step. DPM-Solver++ is not in the original and computes in float64.
import { readFileSync } from 'node:fs';
import { DiffusionInputError } from './errors.ts';
import type { SpacedDiffusion } from './respace.ts';

/** Tensor layout of one step: `count` samples of `channels`×`plane` latents; the model gives `outChannels`. */
export interface StepLayout {
  readonly count: number;
  readonly channels: number;
  readonly plane: number;
  /** `channels` (eps only) or 2·`channels` (eps, then the learned variance values in [-1, 1]). */
  readonly outChannels: number;
}

export type VarianceType = 'learned-range' | 'fixed-large' | 'fixed-small';

/** Validates the index and the tensor sizes of one step; every step function calls it first. */
export function checkStep(
  d: SpacedDiffusion,
  index: number,
  layout: StepLayout,
  x: Float32Array,
  modelOut: Float32Array,
  out: Float32Array,
): void {
  if (!Number.isInteger(index) || index < 0 || index >= d.numTimesteps) {
    throw new DiffusionInputError('step', `respaced index ${index} is outside 0..${d.numTimesteps - 1}`);
  }
  const { count, channels, plane, outChannels } = layout;
  if (outChannels !== channels && outChannels !== 2 * channels) {
    throw new DiffusionInputError('modelOutput', `has ${outChannels} channels; expected ${channels} or ${2 * channels}`);
  }
  const n = count * channels * plane;
  if (x.length !== n) throw new DiffusionInputError('x', `has ${x.length} elements; expected ${n}`);
  if (out.length !== n) throw new DiffusionInputError('out', `has ${out.length} elements; expected ${n}`);
  const m = count * outChannels * plane;
  if (modelOut.length !== m) {
    throw new DiffusionInputError('modelOutput', `has ${modelOut.length} elements; expected ${m} = [${count}, ${outChannels}, ${plane}]`);
  }
}

export interface DdpmOptions {
  readonly variance: VarianceType;
  readonly clipDenoised?: boolean;
}

/**
 * One ancestral step x_t → x_{t-1} at respaced index `index` (p_sample). `noise` is the standard
 * normal draw for this step ([count, C, H, W]); it is not read at index 0 (the last step adds none)
 * and may be null there. `out` may be `x` (the update is element-wise).
 */
export function ddpmStep(
  d: SpacedDiffusion,
  index: number,
  x: Float32Array,
  modelOut: Float32Array,
  noise: Float32Array | null,
  layout: StepLayout,
  opts: DdpmOptions,
  out: Float32Array,
): void {
  checkStep(d, index, layout, x, modelOut, out);
  const { count, channels, plane, outChannels } = layout;
  const addNoise = index !== 0;
  if (addNoise && (noise === null || noise.length !== x.length)) {
    throw new DiffusionInputError('noise', `needs ${x.length} elements at step index ${index}`);
  }
  const learned = opts.variance === 'learned-range';
  if (learned && outChannels !== 2 * channels) {
    throw new DiffusionInputError('modelOutput', `learned-range variance needs ${2 * channels} channels, got ${outChannels}`);
  }
  const clip = opts.clipDenoised === true;
  const sr = Math.fround(d.sqrtRecipAlphasCumprod[index]);
  const srm1 = Math.fround(d.sqrtRecipm1AlphasCumprod[index]);
  const c1 = Math.fround(d.posteriorMeanCoef1[index]);
  const c2 = Math.fround(d.posteriorMeanCoef2[index]);
  const minLog = Math.fround(d.posteriorLogVarianceClipped[index]);
  const maxLog = Math.fround(d.logBetas[index]);
  const fixedLog =
    opts.variance === 'fixed-large' ? Math.fround(d.fixedLargeLogVariance[index]) : Math.fround(d.posteriorLogVarianceClipped[index]);
  const fixedStd = Math.fround(Math.exp(Math.fround(0.5 * fixedLog)));
  const nz = noise ?? out;
  for (let s = 0; s < count; s++) {
    for (let c = 0; c < channels; c++) {
      const xo = (s * channels + c) * plane;
      const eo = (s * outChannels + c) * plane;
      const vo = eo + channels * plane;
      for (let p = 0; p < plane; p++) {
        const xt = x[xo + p];
        let x0 = Math.fround(Math.fround(sr * xt) - Math.fround(srm1 * modelOut[eo + p]));
        if (clip) x0 = x0 < -1 ? -1 : x0 > 1 ? 1 : x0;
        let v = Math.fround(Math.fround(c1 * x0) + Math.fround(c2 * xt));
        if (addNoise) {
          let std = fixedStd;
          if (learned) {
            // frac = (v + 1)/2; log σ² = frac·max_log + (1 − frac)·min_log; σ = exp(½ log σ²).
            const frac = Math.fround(modelOut[vo + p] + 1) * 0.5;
            const logVar = Math.fround(Math.fround(frac * maxLog) + Math.fround(Math.fround(1 - frac) * minLog));
            std = Math.fround(Math.exp(Math.fround(0.5 * logVar)));
          }
          v = Math.fround(v + Math.fround(std * nz[xo + p]));
        }
        out[xo + p] = v;
      }
    }
  }
}

export interface DdimOptions {
  readonly eta: number;
  readonly clipDenoised?: boolean;
}

/** One DDIM step (ddim_sample). `noise` is read only when eta > 0 and index > 0. `out` may be `x`. */
export function ddimStep(
  d: SpacedDiffusion,
  index: number,
  x: Float32Array,
  modelOut: Float32Array,
  noise: Float32Array | null,
  layout: StepLayout,
  opts: DdimOptions,
  out: Float32Array,
): void {
  checkStep(d, index, layout, x, modelOut, out);
  if (!(Number.isFinite(opts.eta) && opts.eta >= 0)) {
    throw new DiffusionInputError('eta', `must be a finite number >= 0, got ${opts.eta}`);
  }
  const { count, channels, plane, outChannels } = layout;
  const sr = Math.fround(d.sqrtRecipAlphasCumprod[index]);
  const srm1 = Math.fround(d.sqrtRecipm1AlphasCumprod[index]);
  const ab = Math.fround(d.alphasCumprod[index]);
  const abPrev = Math.fround(d.alphasCumprodPrev[index]);
  // sigma = eta·sqrt((1 − ᾱ_prev)/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ_prev), each tensor op in float32.
  const sigma = Math.fround(
    Math.fround(opts.eta * Math.fround(Math.sqrt(Math.fround(Math.fround(1 - abPrev) / Math.fround(1 - ab))))) *
      Math.fround(Math.sqrt(Math.fround(1 - Math.fround(ab / abPrev)))),
  );
  const addNoise = index !== 0 && sigma !== 0;
  if (addNoise && (noise === null || noise.length !== x.length)) {
    throw new DiffusionInputError('noise', `needs ${x.length} elements at step index ${index}`);
  }
  const sqrtAbPrev = Math.fround(Math.sqrt(abPrev));
  // max(0, ·) guards the rounding when eta makes the direction term vanish.
  const dirCoef = Math.fround(Math.sqrt(Math.max(0, Math.fround(Math.fround(1 - abPrev) - Math.fround(sigma * sigma)))));
  const clip = opts.clipDenoised === true;
  // The element loop runs in WebAssembly SIMD (ddim.wat), bit-identical to doing per element:
  //   srx = fround(sr·xt); x0 = fround(srx − fround(srm1·eps)); clip x0 to [−1, 1] if asked (the
  //   original re-derives eps from the possibly clipped x0): eps' = fround(fround(srx − x0) / srm1);
  //   v = fround(fround(x0·sqrtAbPrev) + fround(dirCoef·eps')); v = fround(v + fround(sigma·noise)).
  const n = count * channels * plane;
  const r = ddimRegion(n);
  r.x.set(x);
  if (outChannels === channels) r.eps.set(modelOut);
  else
    for (let s = 0; s < count; s++)
      r.eps.set(modelOut.subarray(s * outChannels * plane, (s * outChannels + channels) * plane), s * channels * plane);
  if (addNoise) r.noise.set(noise as Float32Array);
  ddimWasm.ddim(n, 0, r.bytes, 2 * r.bytes, 0, sr, srm1, sqrtAbPrev, dirCoef, sigma, clip ? 1 : 0, addNoise ? 1 : 0);
  out.set(r.x);
}

const ddimWasm = new WebAssembly.Instance(new WebAssembly.Module(readFileSync(new URL('./ddim.wasm', import.meta.url))), {}).exports as {
  memory: WebAssembly.Memory;
  ddim(
    n: number,
    x: number,
    eps: number,
    noise: number,
    out: number,
    sr: number,
    srm1: number,
    sqrtAbPrev: number,
    dirCoef: number,
    sigma: number,
    clip: number,
    noisy: number,
  ): void;
};

/** Views of the DDIM kernel's memory for n elements: x (and the result), eps, noise; made again when n or the memory changes. */
let region = {
  n: -1,
  bytes: 0,
  buffer: ddimWasm.memory.buffer,
  x: new Float32Array(0),
  eps: new Float32Array(0),
  noise: new Float32Array(0),
};
function ddimRegion(n: number): typeof region {
  if (n === region.n && region.buffer === ddimWasm.memory.buffer) return region;
  const bytes = ((n + 3) & ~3) * 4;
  if (3 * bytes > ddimWasm.memory.buffer.byteLength)
    ddimWasm.memory.grow(Math.ceil((3 * bytes - ddimWasm.memory.buffer.byteLength) / 65536));
  const buffer = ddimWasm.memory.buffer;
  region = {
    n,
    bytes,
    buffer,
    x: new Float32Array(buffer, 0, n),
    eps: new Float32Array(buffer, bytes, n),
    noise: new Float32Array(buffer, 2 * bytes, n),
  };
  return region;
}

/** Multistep memory of DPM-Solver++(2M): the previous data prediction and step size in λ. */
export interface DpmppMemory {
  /** x0 prediction of the previous step, [count, C, H, W]. */
  readonly prevX0: Float32Array;
  /** λ-step of the previous step; NaN before the first step. */
  prevH: number;
}

export function dpmppMemory(elements: number): DpmppMemory {
  return { prevX0: new Float32Array(elements), prevH: Number.NaN };
}

/**
 * One DPM-Solver++(2M) step (Lu et al. 2022, data prediction, multistep second order) from the
 * respaced timestep `index` to the previous one (ᾱ_prev; at index 0 that is ᾱ = 1, the clean
 * sample). With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_t − λ_s:
 *   x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D,
 * D = (1 + 1/(2r))·x0_s − 1/(2r)·x0_prev with r = h_prev/h, and D = x0_s (first order) on the
 * first step (no history) and on the last two: into the lowest kept timestep and from there to
 * the clean sample (σ = 0, h infinite). That is the solver's "lower order final" rule: with the
 * evenly spaced timesteps of the original respacing, the step into timestep 0 is several times
 * longer in λ than the one before (r ≈ 0.2 at 10–25 steps), where the 2M extrapolation loses
 * accuracy instead of gaining it. Updates `mem`; `out` may be `x`.
 */
export function dpmppStep(
  d: SpacedDiffusion,
  index: number,
  x: Float32Array,
  modelOut: Float32Array,
  layout: StepLayout,
  mem: DpmppMemory,
  opts: { readonly clipDenoised?: boolean },
  out: Float32Array,
): void {
  checkStep(d, index, layout, x, modelOut, out);
  if (mem.prevX0.length !== x.length) {
    throw new DiffusionInputError('memory', `prevX0 has ${mem.prevX0.length} elements; expected ${x.length}`);
  }
  const { count, channels, plane, outChannels } = layout;
  const abS = d.alphasCumprod[index];
  const abT = d.alphasCumprodPrev[index];
  const alphaS = Math.sqrt(abS);
  const sigmaS = Math.sqrt(1 - abS);
  const alphaT = Math.sqrt(abT);
  const sigmaT = Math.sqrt(1 - abT);
  const sr = 1 / alphaS;
  const srm1 = sigmaS / alphaS;
  // e^{−h} = (σ_t/α_t)/(σ_s/α_s), finite (0) at the clean end where h = ∞.
  const expMinusH = (sigmaT * alphaS) / (alphaT * sigmaS);
  const h = -Math.log(expMinusH);
  const secondOrder = Number.isFinite(mem.prevH) && index >= 2;
  const ratio = sigmaT / sigmaS;
  const coef = -alphaT * (expMinusH - 1);
  let w0 = 1;
  let w1 = 0;
  if (secondOrder) {
    const halfInvR = h / (2 * mem.prevH);
    w0 = 1 + halfInvR;
    w1 = -halfInvR;
  }
  const clip = opts.clipDenoised === true;
  const prev = mem.prevX0;
  for (let s = 0; s < count; s++) {
    for (let c = 0; c < channels; c++) {
      const xo = (s * channels + c) * plane;
      const eo = (s * outChannels + c) * plane;
      for (let p = 0; p < plane; p++) {
        const i = xo + p;
        const xs = x[i];
        let x0 = sr * xs - srm1 * modelOut[eo + p];
        if (clip) x0 = x0 < -1 ? -1 : x0 > 1 ? 1 : x0;
        const dd = w0 * x0 + w1 * prev[i];
        prev[i] = x0;
        out[i] = ratio * xs + coef * dd;
      }
    }
  }
  mem.prevH = h;
}

/**
 * The x0 (clean latent) prediction of one step at respaced index `index`, as the sampler's own
 * update computes it before using it: float32 in the original's operation order for DDPM and DDIM
 * (`ddpm`), float64 for DPM-Solver++ (`dpmpp`), clamped when `clipDenoised`. The step functions
 * above are left as they are (their numerics are pinned by the golden trajectories); this is a
 * separate pass over the latent, paid only by a caller that wants the prediction (previews).
 */
export function predictX0(
  d: SpacedDiffusion,
  index: number,
  x: Float32Array,
  modelOut: Float32Array,
  layout: StepLayout,
  opts: { readonly arithmetic: 'float32' | 'float64'; readonly clipDenoised?: boolean },
  out: Float32Array,
): void {
  checkStep(d, index, layout, x, modelOut, out);
  const { count, channels, plane, outChannels } = layout;
  const clip = opts.clipDenoised === true;
  const f32 = opts.arithmetic === 'float32';
  const ab = d.alphasCumprod[index];
  const sr = f32 ? Math.fround(d.sqrtRecipAlphasCumprod[index]) : 1 / Math.sqrt(ab);
  const srm1 = f32 ? Math.fround(d.sqrtRecipm1AlphasCumprod[index]) : Math.sqrt(1 - ab) / Math.sqrt(ab);
  for (let s = 0; s < count; s++) {
    for (let c = 0; c < channels; c++) {
      const xo = (s * channels + c) * plane;
      const eo = (s * outChannels + c) * plane;
      for (let p = 0; p < plane; p++) {
        let x0 = f32
          ? Math.fround(Math.fround(sr * x[xo + p]) - Math.fround(srm1 * modelOut[eo + p]))
          : sr * x[xo + p] - srm1 * modelOut[eo + p];
        if (clip) x0 = x0 < -1 ? -1 : x0 > 1 ? 1 : x0;
        out[xo + p] = x0;
      }
    }
  }
}
