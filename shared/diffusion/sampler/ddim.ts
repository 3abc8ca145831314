// DDIM (ddim_sample of the original); eta sets the stochasticity, 0 = deterministic.
import { ddimStep } from '../samplers.ts';
import { defineSampler } from './types.ts';

export const ddim = defineSampler({
  name: 'ddim',
  protoKind: 'SAMPLER_KIND_DDIM',
  summary: 'DDIM; eta sets the stochasticity (0 = deterministic)',
  defaultSteps: 50,
  learnedVariance: false,
  options: { eta: { default: 0, min: 0, max: 1 } },
  drawsNoise: (o) => o.eta > 0,
  x0Arithmetic: 'float32',
  step: (a) => ddimStep(a.diffusion, a.index, a.x, a.modelOut, a.noise, a.layout, { eta: a.eta, clipDenoised: a.clipDenoised }, a.out),
});
