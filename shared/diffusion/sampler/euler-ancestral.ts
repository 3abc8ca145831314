// Euler ancestral ("Euler a"; k-diffusion's sample_euler_ancestral with eta 1, diffusers'
// EulerAncestralDiscreteScheduler), the common few-step stochastic sampler of the Stable
// Diffusion and DiT communities, on the respaced timesteps of the original code.
//
// In the variance-exploding view of the same chain, x̃ = x/√ᾱ and σ = √((1−ᾱ)/ᾱ), so that
// x̃ = x0 + σ·ε. A step from σ_s to σ_t (ᾱ_prev of the respaced index; σ_t = 0 at the last step)
// goes down to σ_down deterministically along ε and adds fresh noise of size σ_up:
//   σ_up = min(σ_t, √(σ_t²·(σ_s² − σ_t²)/σ_s²)),  σ_down = √(σ_t² − σ_up²),
//   x̃_t = x0 + σ_down·ε + σ_up·z,  x_t = √ᾱ_t·x̃_t,
// with x0 = x̃_s − σ_s·ε (clamped when clipDenoised, ε then re-derived from it). The last step
// returns x0. Float64 arithmetic, like DPM-Solver++.
import { DiffusionInputError } from '../errors.ts';
import { checkStep } from '../samplers.ts';
import { defineSampler, type StepArgs } from './types.ts';

function eulerAncestralStep(a: StepArgs): void {
  const { diffusion: d, index, x, modelOut, noise, layout, clipDenoised, out } = a;
  checkStep(d, index, layout, x, modelOut, out);
  const { count, channels, plane, outChannels } = layout;
  const abS = d.alphasCumprod[index];
  const abT = d.alphasCumprodPrev[index];
  // The same expressions as predictX0's float64 branch, so a preview shows this step's x0 exactly.
  const invSqrtAbS = 1 / Math.sqrt(abS);
  const sigmaS = Math.sqrt(1 - abS) / Math.sqrt(abS);
  const sigmaT = Math.sqrt((1 - abT) / abT);
  const sigmaUp = Math.min(sigmaT, Math.sqrt((sigmaT * sigmaT * (sigmaS * sigmaS - sigmaT * sigmaT)) / (sigmaS * sigmaS)));
  const sigmaDown = Math.sqrt(Math.max(0, sigmaT * sigmaT - sigmaUp * sigmaUp));
  const scaleT = Math.sqrt(abT);
  const noisy = index !== 0 && sigmaUp > 0;
  if (noisy && (noise === null || noise.length !== x.length))
    throw new DiffusionInputError('noise', `needs ${x.length} elements at step index ${index}`);
  for (let s = 0; s < count; s++) {
    for (let c = 0; c < channels; c++) {
      const xo = (s * channels + c) * plane;
      const eo = (s * outChannels + c) * plane;
      for (let p = 0; p < plane; p++) {
        const i = xo + p;
        const xs = x[i];
        let eps = modelOut[eo + p];
        let x0 = invSqrtAbS * xs - sigmaS * eps;
        if (clipDenoised && (x0 < -1 || x0 > 1)) {
          x0 = x0 < -1 ? -1 : 1;
          eps = (invSqrtAbS * xs - x0) / sigmaS;
        }
        let v = x0 + sigmaDown * eps;
        if (noisy) v += sigmaUp * (noise as Float32Array)[i];
        out[i] = index === 0 ? x0 : scaleT * v;
      }
    }
  }
}

export const eulerAncestral = defineSampler({
  name: 'euler-a',
  protoKind: 'SAMPLER_KIND_EULER_ANCESTRAL',
  summary: 'Euler ancestral ("Euler a", eta 1), stochastic, for 20–50 steps',
  defaultSteps: 30,
  learnedVariance: false,
  options: {},
  drawsNoise: () => true,
  x0Arithmetic: 'float64',
  step: eulerAncestralStep,
});
