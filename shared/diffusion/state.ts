// Per-request sampling state machine: the scheduler asks `next` for the model input of the pending
// step, sends it wherever it likes, and feeds the (already guided) model output back to `advance`.
// Nothing blocks and nothing is shared between requests.
import { DiffusionInputError } from './errors.ts';
import { modelOutChannels } from './guidance.ts';
import { fillNormal, seedKey, STREAM_INITIAL, STREAM_STEP } from './philox.ts';
import { spacedDiffusion, type SpacedDiffusion } from './respace.ts';
import { samplerByName, samplerList, type SamplerName } from './sampler/registry.ts';
import type { SamplerDef } from './sampler/types.ts';
import { predictX0 as predictX0At, type StepLayout, type VarianceType } from './samplers.ts';
import type { ScheduleName } from './schedule.ts';

export type { SamplerName } from './sampler/registry.ts';

/** Noise supplied by the caller instead of the generator (e.g. the golden trajectories' noise). */
export interface InjectedNoise {
  /** Starting latent [count, C, H, W]. */
  readonly z: Float32Array;
  /** Noise of reverse step `step` (0 = first step), [count, C, H, W]. */
  readonly stepNoise: (step: number) => Float32Array;
}

export interface SampleRequest {
  readonly sampler: SamplerName;
  /**
   * Respacing string of the original (`"250"`, `"ddim50"`, `"10,10,5"`). When omitted, `numSteps`
   * plain evenly spaced steps (`String(numSteps)`).
   */
  readonly respacing?: string;
  /** Number of sampling steps; must agree with `respacing` when both are given. */
  readonly numSteps?: number;
  /** Base schedule, default 'linear' over `diffusionSteps` (default 1000), as DiT. */
  readonly schedule?: ScheduleName;
  readonly diffusionSteps?: number;
  /** Latent shape [C, H, W] of one sample. */
  readonly shape: readonly [number, number, number];
  /** Samples in this request; they step in lockstep. */
  readonly count: number;
  /** The model outputs 2C channels (eps, variance values); selects learned-range variance for DDPM. */
  readonly learnSigma: boolean;
  /** DDPM variance for models without learned sigma; default 'fixed-large' (the original's default). */
  readonly fixedVariance?: 'fixed-large' | 'fixed-small';
  /** uint64 seed: the Philox key. */
  readonly seed: bigint;
  /** Index of this request's first sample in the noise streams, default 0. */
  readonly sampleIndexOffset?: number;
  /**
   * Noise stream index of each sample (length `count`), for a subset of a larger request (the
   * scheduler samples only the images its repeat cache lacks); instead of sampleIndexOffset.
   */
  readonly sampleIndices?: readonly number[];
  /** eta of the samplers that take it (DDIM), default the sampler's; ignored by the others. */
  readonly eta?: number;
  /** Clamp the x0 prediction to [-1, 1]; default false, as the DiT sampling scripts. */
  readonly clipDenoised?: boolean;
  readonly noise?: InjectedNoise;
  /** Keep the latent after every step (`state.trajectory`, [steps, count, C, H, W]). */
  readonly recordTrajectory?: boolean;
}

export interface SamplerState {
  readonly sampler: SamplerName;
  /** The sampler's declaration (sampler/registry.ts). */
  readonly def: SamplerDef<SamplerName>;
  readonly diffusion: SpacedDiffusion;
  readonly layout: StepLayout;
  readonly totalSteps: number;
  /** Reverse steps completed so far. */
  stepsDone: number;
  /** Current latent [count, C, H, W]; `advance` overwrites it in place. */
  readonly x: Float32Array;
  readonly trajectory: Float32Array | null;
  readonly variance: VarianceType;
  readonly eta: number;
  readonly clipDenoised: boolean;
  readonly key: readonly [number, number];
  /** Noise stream index of each sample. */
  readonly sampleIndices: Uint32Array;
  readonly injected: InjectedNoise | null;
  /** Scratch for the step noise (null when the sampler never draws noise). */
  readonly noiseBuf: Float32Array | null;
  /** The sampler's memory between steps (multistep history), or null. */
  readonly memory: unknown;
  /** Per-sample timestep buffer returned by `next` (reused every step). */
  readonly tBuf: Int32Array;
}

export interface PendingStep {
  /** Reverse step index, 0-based. */
  readonly step: number;
  /** Original timestep fed to the model (the same for every sample of the request). */
  readonly timestep: number;
  /** `timestep` per sample, length `count` (a buffer owned by the state, rewritten each step). */
  readonly t: Int32Array;
  /** Model input [count, C, H, W]: the state's own latent, valid until the next `advance`. */
  readonly x: Float32Array;
}

function positiveInt(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
    throw new DiffusionInputError(field, `must be a positive integer, got ${String(v)}`);
  }
  return v;
}

/** Validates the request, draws (or takes) the starting noise, and returns a fresh state. */
export function start(req: SampleRequest): SamplerState {
  const def = samplerByName(req.sampler);
  if (!def) throw new DiffusionInputError('sampler', `must be ${samplerList()}, got '${String(req.sampler)}'`);
  if (!Array.isArray(req.shape) || req.shape.length !== 3) {
    throw new DiffusionInputError('shape', 'must be [C, H, W]');
  }
  const channels = positiveInt(req.shape[0], 'shape[0]');
  const plane = positiveInt(req.shape[1], 'shape[1]') * positiveInt(req.shape[2], 'shape[2]');
  const count = positiveInt(req.count, 'count');
  let respacing = req.respacing;
  if (respacing === undefined) {
    if (req.numSteps === undefined) throw new DiffusionInputError('respacing', 'give respacing or numSteps');
    respacing = String(positiveInt(req.numSteps, 'numSteps'));
  }
  const diffusion = spacedDiffusion({ schedule: req.schedule, diffusionSteps: req.diffusionSteps, respacing });
  const totalSteps = diffusion.numTimesteps;
  if (req.numSteps !== undefined && req.numSteps !== totalSteps) {
    throw new DiffusionInputError('numSteps', `is ${req.numSteps} but respacing '${respacing}' gives ${totalSteps} steps`);
  }
  const eta = req.eta ?? def.options.eta?.default ?? 0;
  if (!(typeof eta === 'number' && Number.isFinite(eta) && eta >= 0)) {
    throw new DiffusionInputError('eta', `must be a finite number >= 0, got ${String(eta)}`);
  }
  const offset = req.sampleIndexOffset ?? 0;
  if (!Number.isInteger(offset) || offset < 0 || offset + count > 2 ** 32) {
    throw new DiffusionInputError('sampleIndexOffset', `must be an integer in [0, 2^32 - count], got ${offset}`);
  }
  const sampleIndices = Uint32Array.from({ length: count }, (_, s) => offset + s);
  if (req.sampleIndices !== undefined) {
    if (req.sampleIndexOffset !== undefined) {
      throw new DiffusionInputError('sampleIndices', 'give sampleIndices or sampleIndexOffset, not both');
    }
    const given = req.sampleIndices;
    if (given.length !== count) throw new DiffusionInputError('sampleIndices', `must list one index per sample (${count})`);
    for (let s = 0; s < count; s++) {
      const v = given[s];
      if (!Number.isInteger(v) || v < 0 || v >= 2 ** 32) {
        throw new DiffusionInputError(`sampleIndices[${s}]`, `must be an integer in [0, 2^32), got ${v}`);
      }
      sampleIndices[s] = v;
    }
  }
  const fixed = req.fixedVariance ?? 'fixed-large';
  if (fixed !== 'fixed-large' && fixed !== 'fixed-small') {
    throw new DiffusionInputError('fixedVariance', `must be 'fixed-large' or 'fixed-small', got '${String(fixed)}'`);
  }
  const key = seedKey(req.seed);
  const n = count * channels * plane;
  const layout: StepLayout = { count, channels, plane, outChannels: modelOutChannels(channels, req.learnSigma) };

  const x = new Float32Array(n);
  if (req.noise) {
    if (!(req.noise.z instanceof Float32Array) || req.noise.z.length !== n) {
      throw new DiffusionInputError('noise.z', `must be a Float32Array of ${n} elements [${count}, ${req.shape.join(', ')}]`);
    }
    x.set(req.noise.z);
  } else {
    const per = channels * plane;
    for (let s = 0; s < count; s++) fillNormal(x, s * per, per, key, sampleIndices[s], 0, STREAM_INITIAL);
  }
  const drawsNoise = def.drawsNoise({ eta });
  return {
    sampler: def.name,
    def,
    diffusion,
    layout,
    totalSteps,
    stepsDone: 0,
    x,
    trajectory: req.recordTrajectory ? new Float32Array(totalSteps * n) : null,
    variance: req.learnSigma ? 'learned-range' : fixed,
    eta,
    clipDenoised: req.clipDenoised ?? false,
    key,
    sampleIndices,
    injected: req.noise ?? null,
    noiseBuf: drawsNoise && !req.noise ? new Float32Array(n) : null,
    memory: def.memory ? def.memory(n) : null,
    tBuf: new Int32Array(count),
  };
}

export function isDone(state: SamplerState): boolean {
  return state.stepsDone >= state.totalSteps;
}

/** The pending step's model input, or null when sampling is finished. Idempotent until `advance`. */
export function next(state: SamplerState): PendingStep | null {
  if (isDone(state)) return null;
  const index = state.totalSteps - 1 - state.stepsDone;
  const timestep = state.diffusion.timestepMap[index];
  state.tBuf.fill(timestep);
  return { step: state.stepsDone, timestep, t: state.tBuf, x: state.x };
}

function stepNoise(state: SamplerState, step: number, index: number): Float32Array | null {
  const needs = index !== 0 && state.def.drawsNoise({ eta: state.eta });
  if (!needs) return null;
  if (state.injected) {
    const z = state.injected.stepNoise(step);
    if (!(z instanceof Float32Array) || z.length !== state.x.length) {
      throw new DiffusionInputError('noise.stepNoise', `step ${step} must give a Float32Array of ${state.x.length} elements`);
    }
    return z;
  }
  const buf = state.noiseBuf as Float32Array;
  const per = state.layout.channels * state.layout.plane;
  for (let s = 0; s < state.layout.count; s++) {
    fillNormal(buf, s * per, per, state.key, state.sampleIndices[s], step, STREAM_STEP);
  }
  return buf;
}

/**
 * Applies the pending step with the model output [count, Cout, H, W] (guidance already combined)
 * and returns the same state, mutated: `state.x` is overwritten in place, so a latent obtained from
 * `next` must be copied if it is still needed afterwards.
 */
export function advance(state: SamplerState, modelOutput: Float32Array): SamplerState {
  if (isDone(state)) throw new DiffusionInputError('state', 'sampling is already finished');
  if (!(modelOutput instanceof Float32Array)) throw new DiffusionInputError('modelOutput', 'must be a Float32Array');
  const step = state.stepsDone;
  const index = state.totalSteps - 1 - step;
  const { diffusion: d, layout, x } = state;
  state.def.step({
    diffusion: d,
    index,
    x,
    modelOut: modelOutput,
    noise: stepNoise(state, step, index),
    layout,
    variance: state.variance,
    eta: state.eta,
    clipDenoised: state.clipDenoised,
    memory: state.memory,
    out: x,
  });
  if (state.trajectory) state.trajectory.set(x, step * x.length);
  state.stepsDone = step + 1;
  return state;
}

/**
 * The model's prediction of the clean latent for the pending step, given that step's model output
 * (what `advance` is about to be fed), written into `out` [count, C, H, W]: the x0 the sampler's
 * update uses, in its arithmetic. Call it after `next` and before `advance`, which overwrites the
 * latent it reads. Nothing is computed unless this is called, and the state is not touched.
 */
export function predictX0(
  state: SamplerState,
  modelOutput: Float32Array,
  out: Float32Array = new Float32Array(state.x.length),
): Float32Array {
  if (isDone(state)) throw new DiffusionInputError('state', 'sampling is already finished');
  if (!(modelOutput instanceof Float32Array)) throw new DiffusionInputError('modelOutput', 'must be a Float32Array');
  const index = state.totalSteps - 1 - state.stepsDone;
  const arithmetic = state.def.x0Arithmetic;
  predictX0At(state.diffusion, index, state.x, modelOutput, state.layout, { arithmetic, clipDenoised: state.clipDenoised }, out);
  return out;
}

/** The final latent [count, C, H, W]; throws while steps remain. */
export function result(state: SamplerState): Float32Array {
  if (!isDone(state)) {
    throw new DiffusionInputError('state', `sampling not finished: ${state.stepsDone} of ${state.totalSteps} steps done`);
  }
  return state.x;
}
