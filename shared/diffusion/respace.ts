// Timestep respacing as the original `diffusion/respace.py` (`space_timesteps`, `SpacedDiffusion`).
import { DiffusionInputError } from './errors.ts';
import { betaSchedule, diffusionTables, type DiffusionTables, type ScheduleName } from './schedule.ts';

/** Python 3 `round()` on a float: nearest integer, ties to even (JS Math.round ties upward). */
export function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

function parseCount(text: string, what: string): number {
  const s = text.trim();
  if (!/^\d+$/.test(s)) {
    throw new DiffusionInputError('respacing', `${what} '${text}' is not a non-negative integer`);
  }
  return Number(s);
}

/**
 * The original timesteps kept by a respacing string, ascending.
 * - `"250"`: 250 steps spread evenly over the schedule;
 * - `"10,10,5"`: the schedule cut into equal sections, each with that many evenly spread steps
 *   (positions on an accumulated float cursor, rounded half-to-even as Python does);
 * - `"ddim50"`: the smallest integer stride that gives exactly 50 steps starting at 0.
 */
export function spaceTimesteps(numTimesteps: number, respacing: string): number[] {
  if (!Number.isInteger(numTimesteps) || numTimesteps < 1) {
    throw new DiffusionInputError('diffusionSteps', `must be a positive integer, got ${numTimesteps}`);
  }
  if (typeof respacing !== 'string' || respacing.trim() === '') {
    throw new DiffusionInputError('respacing', 'is empty (expected e.g. "250", "ddim50" or "10,10,5")');
  }
  const spec = respacing.trim();
  if (spec.startsWith('ddim')) {
    const desired = parseCount(spec.slice(4), 'DDIM step count');
    if (desired < 1) throw new DiffusionInputError('respacing', `'${spec}' asks for 0 steps`);
    for (let stride = 1; stride < numTimesteps; stride++) {
      if (Math.ceil(numTimesteps / stride) === desired) {
        const steps: number[] = [];
        for (let t = 0; t < numTimesteps; t += stride) steps.push(t);
        return steps;
      }
    }
    throw new DiffusionInputError('respacing', `'${spec}': no integer stride gives exactly ${desired} steps out of ${numTimesteps}`);
  }
  const counts = spec.split(',').map((part) => parseCount(part, 'section count'));
  const total = counts.reduce((a, b) => a + b, 0);
  if (total < 1) throw new DiffusionInputError('respacing', `'${spec}' asks for 0 steps`);
  if (total > numTimesteps) {
    throw new DiffusionInputError('respacing', `'${spec}' asks for ${total} steps but the schedule has ${numTimesteps}`);
  }
  const sizePer = Math.floor(numTimesteps / counts.length);
  const extra = numTimesteps % counts.length;
  const steps: number[] = [];
  let startIdx = 0;
  for (let i = 0; i < counts.length; i++) {
    const size = sizePer + (i < extra ? 1 : 0);
    const count = counts[i];
    if (size < count) {
      throw new DiffusionInputError('respacing', `'${spec}': section ${i} spans ${size} timesteps and cannot hold ${count} steps`);
    }
    const fracStride = count <= 1 ? 1 : (size - 1) / (count - 1);
    let cur = 0;
    for (let k = 0; k < count; k++) {
      steps.push(startIdx + roundHalfEven(cur));
      cur += fracStride;
    }
    startIdx += size;
  }
  // Sections are disjoint and strides >= 1, so this is already a set; sort as the original's set order is irrelevant.
  return Array.from(new Set(steps)).sort((a, b) => a - b);
}

/** `SpacedDiffusion`: betas 1 − ᾱ_t/ᾱ_prev over the kept timesteps. */
export function respacedBetas(alphasCumprod: Float64Array, timesteps: readonly number[]): Float64Array {
  const out = new Float64Array(timesteps.length);
  let last = 1;
  for (let i = 0; i < timesteps.length; i++) {
    const acp = alphasCumprod[timesteps[i]];
    out[i] = 1 - acp / last;
    last = acp;
  }
  return out;
}

export interface DiffusionSpec {
  schedule?: ScheduleName;
  /** Length of the base schedule (the original `diffusion_steps`), default 1000. */
  diffusionSteps?: number;
  respacing: string;
}

/** A respaced diffusion: its float64 tables indexed by respaced step, and the original timesteps. */
export interface SpacedDiffusion extends DiffusionTables {
  readonly schedule: ScheduleName;
  readonly diffusionSteps: number;
  readonly respacing: string;
  /** Original timestep of each respaced index, ascending (the original's `timestep_map`). */
  readonly timestepMap: Int32Array;
}

const cache = new Map<string, SpacedDiffusion>();
const CACHE_LIMIT = 64;

/** Builds (or returns the cached, immutable) respaced diffusion for a spec. */
export function spacedDiffusion(spec: DiffusionSpec): SpacedDiffusion {
  const schedule = spec.schedule ?? 'linear';
  const diffusionSteps = spec.diffusionSteps ?? 1000;
  const key = `${schedule}|${diffusionSteps}|${spec.respacing}`;
  const hit = cache.get(key);
  if (hit) return hit;
  const base = diffusionTables(betaSchedule(schedule, diffusionSteps));
  const timesteps = spaceTimesteps(diffusionSteps, spec.respacing);
  const tables = diffusionTables(respacedBetas(base.alphasCumprod, timesteps));
  const result: SpacedDiffusion = Object.freeze({
    ...tables,
    schedule,
    diffusionSteps,
    respacing: spec.respacing,
    timestepMap: Int32Array.from(timesteps),
  });
  if (cache.size >= CACHE_LIMIT) cache.delete(cache.keys().next().value as string);
  cache.set(key, result);
  return result;
}
