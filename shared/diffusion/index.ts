export { DiffusionInputError } from './errors.ts';
export { betaSchedule, diffusionTables, type DiffusionTables, type ScheduleName } from './schedule.ts';
export { respacedBetas, roundHalfEven, spaceTimesteps, spacedDiffusion, type DiffusionSpec, type SpacedDiffusion } from './respace.ts';
export {
  ddimStep,
  ddpmStep,
  dpmppMemory,
  dpmppStep,
  predictX0 as predictX0AtIndex,
  type DdimOptions,
  type DdpmOptions,
  type DpmppMemory,
  type StepLayout,
  type VarianceType,
} from './samplers.ts';
export {
  SAMPLERS,
  SAMPLER_NAMES,
  DEFAULT_SAMPLER,
  samplerByName,
  samplerByProtoKind,
  samplerList,
  samplersWithOption,
} from './sampler/registry.ts';
export { defineSampler, type SamplerDef, type SamplerOption, type StepArgs } from './sampler/types.ts';
export {
  combineGuidance,
  guidanceRows,
  guidedChannels,
  modelOutChannels,
  packGuidedRows,
  type GuidanceOptions,
  type GuidedRowsSource,
} from './guidance.ts';
export { fillNormal, philox4x32, seedKey, STREAM_INITIAL, STREAM_STEP } from './philox.ts';
export {
  advance,
  isDone,
  next,
  predictX0,
  result,
  start,
  type InjectedNoise,
  type PendingStep,
  type SampleRequest,
  type SamplerName,
  type SamplerState,
} from './state.ts';
