// The rules for a request's sampling settings, in the wire's terms (proto field names, gRPC
// INVALID_ARGUMENT): one place that the scheduler (on a Generate request) and the denoiser (on a
// denoise step, which carries cfg_scale and guidance_channels again) both call.
import type { SamplerName } from './diffusion/sampler/registry.ts';
import { samplersWithOption } from './diffusion/sampler/registry.ts';
import type { SamplerDef } from './diffusion/sampler/types.ts';
import { InvalidArgumentError } from './errors.ts';
import { GuidanceChannels } from './gen/ditpipe/v1/common.ts';

/** Checks cfg_scale and guidance_channels; returns the guided channels (3, the original's, or 'all'). */
export function checkGuidance(cfgScale: number, guidanceChannels: GuidanceChannels): 3 | 'all' {
  if (!Number.isFinite(cfgScale) || cfgScale < 1) {
    throw new InvalidArgumentError(`cfg_scale must be finite and >= 1 (1 = no guidance), got ${cfgScale}`, { field: 'cfg_scale' });
  }
  const g = guidanceChannels;
  if (
    g !== GuidanceChannels.GUIDANCE_CHANNELS_UNSPECIFIED &&
    g !== GuidanceChannels.GUIDANCE_CHANNELS_THREE &&
    g !== GuidanceChannels.GUIDANCE_CHANNELS_ALL
  ) {
    throw new InvalidArgumentError(`guidance_channels: unknown value ${g}`, { field: 'guidance_channels' });
  }
  return g === GuidanceChannels.GUIDANCE_CHANNELS_ALL ? 'all' : 3;
}

/** The eta a request samples with: its own within the sampler's range, or the sampler's default; refused for a sampler without eta. */
export function checkEta(eta: number | undefined, sampler: SamplerDef<SamplerName>): number {
  const spec = sampler.options.eta;
  const value = eta ?? spec?.default ?? 0;
  const range = spec ?? { min: 0, max: 1 };
  if (!Number.isFinite(value) || value < range.min || value > range.max) {
    throw new InvalidArgumentError(`eta must be within ${range.min}..${range.max}, got ${value}`, { field: 'eta' });
  }
  if (eta !== undefined && value !== 0 && !spec) {
    const takers = samplersWithOption('eta')
      .map((s) => s.protoKind)
      .join(' and ');
    throw new InvalidArgumentError(`eta applies to ${takers} only; got eta ${value} with ${sampler.protoKind}`, { field: 'eta' });
  }
  return value;
}
