// What a sampler declares: one file per sampler in this folder, one line in registry.ts. The
// scheduler, the CLIs, the HTTP API and the load-test schema read these declarations; nothing else
// needs to know a sampler by name.
import type { SpacedDiffusion } from '../respace.ts';
import type { StepLayout, VarianceType } from '../samplers.ts';

/** A numeric per-request option of a sampler (eta, …): its default and its accepted range. */
export interface SamplerOption {
  readonly default: number;
  readonly min: number;
  readonly max: number;
}

/** Everything one step gets; `out` may be `x` (every sampler updates element-wise). */
export interface StepArgs {
  readonly diffusion: SpacedDiffusion;
  /** Respaced timestep index of the step, high to low; 0 is the last step. */
  readonly index: number;
  readonly x: Float32Array;
  /** Guided model output [count, outChannels, H, W]. */
  readonly modelOut: Float32Array;
  /** Standard normal draw for this step, [count, C, H, W]; null when `drawsNoise` said no or at index 0. */
  readonly noise: Float32Array | null;
  readonly layout: StepLayout;
  readonly variance: VarianceType;
  readonly eta: number;
  readonly clipDenoised: boolean;
  /** What `memory` made for this request (multistep history), or null. */
  readonly memory: unknown;
  readonly out: Float32Array;
}

export interface SamplerDef<N extends string = string> {
  /** The name used by the CLIs, the HTTP API and campaigns (`--sampler ddim`). */
  readonly name: N;
  /** The SamplerKind value of proto/ditpipe/v1/sampler.proto that asks for it. */
  readonly protoKind: string;
  /** One line for --help and docs. */
  readonly summary: string;
  /** Steps when a request leaves num_steps unset (the scheduler's defaultSteps default). */
  readonly defaultSteps: number;
  /** Reads the model's learned variance channels; when false the denoiser sends the mean channels only. */
  readonly learnedVariance: boolean;
  /** Per-request options it accepts; a request setting another one is refused. */
  readonly options: { readonly eta?: SamplerOption };
  /** Whether a step at respaced index > 0 reads a noise draw, for these option values. */
  drawsNoise(o: { readonly eta: number }): boolean;
  /** Arithmetic of its x0 prediction (previews show the x0 its update uses). */
  readonly x0Arithmetic: 'float32' | 'float64';
  /** Per-request state kept between steps (multistep history) for `elements` latent values. */
  memory?(elements: number): unknown;
  step(a: StepArgs): void;
}

/** Declares a sampler, keeping its name as a literal type. */
export function defineSampler<const N extends string>(def: SamplerDef<N>): SamplerDef<N> {
  return def;
}
