// Beta schedules and the derived float64 tables of the original DiT `diffusion/gaussian_diffusion.py`.
import { DiffusionInputError } from './errors.ts';

export type ScheduleName = 'linear' | 'cosine';

/** numpy.linspace(start, stop, num) with numpy's arithmetic: i*step + start, last element = stop. */
function linspace(start: number, stop: number, num: number): Float64Array {
  const out = new Float64Array(num);
  if (num === 1) {
    out[0] = start;
    return out;
  }
  const step = (stop - start) / (num - 1);
  for (let i = 0; i < num; i++) out[i] = i * step + start;
  out[num - 1] = stop;
  return out;
}

/**
 * Betas of `get_named_beta_schedule`: 'linear' is Ho et al.'s schedule with both ends scaled by
 * 1000/numSteps (DiT's default); 'cosine' is `squaredcos_cap_v2` (Nichol & Dhariwal), capped at 0.999.
 */
export function betaSchedule(name: ScheduleName, numSteps: number): Float64Array {
  if (!Number.isInteger(numSteps) || numSteps < 1) {
    throw new DiffusionInputError('diffusionSteps', `must be a positive integer, got ${numSteps}`);
  }
  if (name === 'linear') {
    const scale = 1000 / numSteps;
    return linspace(scale * 0.0001, scale * 0.02, numSteps);
  }
  if (name === 'cosine') {
    const alphaBar = (t: number): number => Math.cos((((t + 0.008) / 1.008) * Math.PI) / 2) ** 2;
    const betas = new Float64Array(numSteps);
    for (let i = 0; i < numSteps; i++) {
      const t1 = i / numSteps;
      const t2 = (i + 1) / numSteps;
      betas[i] = Math.min(1 - alphaBar(t2) / alphaBar(t1), 0.999);
    }
    return betas;
  }
  throw new DiffusionInputError('schedule', `unknown schedule '${String(name)}' (expected 'linear' or 'cosine')`);
}

/** The coefficient tables `GaussianDiffusion.__init__` derives from its betas, all float64. */
export interface DiffusionTables {
  readonly numTimesteps: number;
  readonly betas: Float64Array;
  readonly logBetas: Float64Array;
  readonly alphasCumprod: Float64Array;
  readonly alphasCumprodPrev: Float64Array;
  readonly alphasCumprodNext: Float64Array;
  readonly sqrtAlphasCumprod: Float64Array;
  readonly sqrtOneMinusAlphasCumprod: Float64Array;
  readonly sqrtRecipAlphasCumprod: Float64Array;
  readonly sqrtRecipm1AlphasCumprod: Float64Array;
  readonly posteriorVariance: Float64Array;
  /** log posterior variance with entry 0 replaced by entry 1 (entry 0 is exactly 0). */
  readonly posteriorLogVarianceClipped: Float64Array;
  readonly posteriorMeanCoef1: Float64Array;
  readonly posteriorMeanCoef2: Float64Array;
  /** The FIXED_LARGE variance: betas with entry 0 replaced by posteriorVariance[1]. */
  readonly fixedLargeVariance: Float64Array;
  readonly fixedLargeLogVariance: Float64Array;
}

export function diffusionTables(betasIn: ArrayLike<number>): DiffusionTables {
  const n = betasIn.length;
  if (n < 1) throw new DiffusionInputError('betas', 'need at least one timestep');
  const betas = Float64Array.from(betasIn);
  for (let i = 0; i < n; i++) {
    if (!(betas[i] > 0 && betas[i] <= 1)) {
      throw new DiffusionInputError('betas', `beta[${i}] = ${betas[i]} is outside (0, 1]`);
    }
  }
  const alphasCumprod = new Float64Array(n);
  let acc = 1;
  for (let i = 0; i < n; i++) {
    acc *= 1 - betas[i];
    alphasCumprod[i] = acc;
  }
  const alphasCumprodPrev = new Float64Array(n);
  const alphasCumprodNext = new Float64Array(n);
  alphasCumprodPrev[0] = 1;
  for (let i = 1; i < n; i++) alphasCumprodPrev[i] = alphasCumprod[i - 1];
  for (let i = 0; i < n - 1; i++) alphasCumprodNext[i] = alphasCumprod[i + 1];
  alphasCumprodNext[n - 1] = 0;

  const map = (f: (i: number) => number): Float64Array => {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) out[i] = f(i);
    return out;
  };
  const posteriorVariance = map((i) => (betas[i] * (1 - alphasCumprodPrev[i])) / (1 - alphasCumprod[i]));
  // With a single timestep the original leaves this table empty; entry 0 is only ever read at the
  // last step, where no noise is added, so log(posteriorVariance[0]) = -Infinity is harmless.
  const posteriorLogVarianceClipped = map((i) => Math.log(posteriorVariance[i === 0 && n > 1 ? 1 : i]));
  const fixedLargeVariance = map((i) => (i === 0 ? (n > 1 ? posteriorVariance[1] : betas[0]) : betas[i]));
  return {
    numTimesteps: n,
    betas,
    logBetas: map((i) => Math.log(betas[i])),
    alphasCumprod,
    alphasCumprodPrev,
    alphasCumprodNext,
    sqrtAlphasCumprod: map((i) => Math.sqrt(alphasCumprod[i])),
    sqrtOneMinusAlphasCumprod: map((i) => Math.sqrt(1 - alphasCumprod[i])),
    sqrtRecipAlphasCumprod: map((i) => Math.sqrt(1 / alphasCumprod[i])),
    sqrtRecipm1AlphasCumprod: map((i) => Math.sqrt(1 / alphasCumprod[i] - 1)),
    posteriorVariance,
    posteriorLogVarianceClipped,
    posteriorMeanCoef1: map((i) => (betas[i] * Math.sqrt(alphasCumprodPrev[i])) / (1 - alphasCumprod[i])),
    posteriorMeanCoef2: map((i) => ((1 - alphasCumprodPrev[i]) * Math.sqrt(1 - betas[i])) / (1 - alphasCumprod[i])),
    fixedLargeVariance,
    fixedLargeLogVariance: map((i) => Math.log(fixedLargeVariance[i])),
  };
}
