// Ancestral DDPM (p_sample of the original), with the model's learned variance: the DiT default.
import { ddpmStep } from '../samplers.ts';
import { defineSampler } from './types.ts';

export const ddpm = defineSampler({
  name: 'ddpm',
  protoKind: 'SAMPLER_KIND_DDPM',
  summary: 'ancestral DDPM with the learned variance (the DiT default)',
  defaultSteps: 250,
  learnedVariance: true,
  options: {},
  drawsNoise: () => true,
  x0Arithmetic: 'float32',
  step: (a) =>
    ddpmStep(a.diffusion, a.index, a.x, a.modelOut, a.noise, a.layout, { variance: a.variance, clipDenoised: a.clipDenoised }, a.out),
});
