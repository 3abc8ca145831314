// DPM-Solver++(2M), multistep second order, for 10–25 step sampling.
import { dpmppMemory, dpmppStep, type DpmppMemory } from '../samplers.ts';
import { defineSampler } from './types.ts';

export const dpmpp = defineSampler({
  name: 'dpmpp',
  protoKind: 'SAMPLER_KIND_DPM_SOLVER_PP',
  summary: 'DPM-Solver++ (2M, multistep), for 10–25 steps',
  defaultSteps: 20,
  learnedVariance: false,
  options: {},
  drawsNoise: () => false,
  x0Arithmetic: 'float64',
  memory: dpmppMemory,
  step: (a) => dpmppStep(a.diffusion, a.index, a.x, a.modelOut, a.layout, a.memory as DpmppMemory, { clipDenoised: a.clipDenoised }, a.out),
});
