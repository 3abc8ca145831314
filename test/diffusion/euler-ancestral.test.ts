// Euler ancestral, checked against an independent computation: k-diffusion's
// sample_euler_ancestral written out here in its own variance-exploding coordinates (x̃ = x/√ᾱ,
// σ = √((1−ᾱ)/ᾱ), d = (x̃ − denoised)/σ), in float64, from ᾱ of the linear schedule computed
// here too; then its sampling distribution on Gaussian data, where the exact model is known.
import { describe, expect, it } from 'vitest';
import { advance, next, result, spacedDiffusion, start } from '../../shared/diffusion/index.ts';

const ABAR: number[] = [];
for (let i = 0, acc = 1; i < 1000; i++) {
  acc *= 1 - (0.0001 + ((0.02 - 0.0001) * i) / 999);
  ABAR.push(acc);
}

// Data x0 ~ N(mu, s²) per element: the exact eps predictor at timestep t.
const gaussianEps = (mu: number, s: number) => (x: number, t: number) => {
  const a = Math.sqrt(ABAR[t]);
  const sig = Math.sqrt(1 - ABAR[t]);
  return (sig * (x - a * mu)) / (a * a * s * s + sig * sig);
};

/** k-diffusion's get_ancestral_step. */
function ancestralStep(from: number, to: number, eta = 1): { down: number; up: number } {
  const up = Math.min(to, eta * Math.sqrt((to ** 2 * (from ** 2 - to ** 2)) / from ** 2));
  return { down: Math.sqrt(to ** 2 - up ** 2), up };
}

/** sample_euler_ancestral over the given timesteps (high to low), from the VP latent z. */
function kDiffusionEulerA(
  timesteps: number[],
  z: Float64Array,
  eps: (x: number, t: number) => number,
  noise: (step: number) => Float32Array,
): Float64Array {
  const sigmas = [...timesteps.map((t) => Math.sqrt((1 - ABAR[t]) / ABAR[t])), 0];
  const x = Float64Array.from(z, (v) => v / Math.sqrt(ABAR[timesteps[0]]));
  for (let i = 0; i < timesteps.length; i++) {
    const t = timesteps[i];
    const { down, up } = ancestralStep(sigmas[i], sigmas[i + 1]);
    const zi = noise(i);
    for (let k = 0; k < x.length; k++) {
      // The model sees the VP latent x̃·√ᾱ; denoised = x̃ − σ·ε.
      const denoised = x[k] - sigmas[i] * eps(x[k] * Math.sqrt(ABAR[t]), t);
      const d = (x[k] - denoised) / sigmas[i];
      x[k] = x[k] + d * (down - sigmas[i]);
      if (sigmas[i + 1] > 0) x[k] += zi[k] * up;
    }
  }
  return x;
}

function runState(
  respacing: string,
  z: Float32Array,
  eps: (x: number, t: number) => number,
  opts: { noise?: (step: number) => Float32Array; seed?: bigint } = {},
) {
  const st = start({
    sampler: 'euler-a',
    respacing,
    shape: [1, 1, z.length],
    count: 1,
    learnSigma: false,
    seed: opts.seed ?? 0n,
    ...(opts.noise ? { noise: { z, stepNoise: opts.noise } } : {}),
  });
  const out = new Float32Array(z.length);
  const timesteps: number[] = [];
  for (let p = next(st); p; p = next(st)) {
    timesteps.push(p.timestep);
    for (let i = 0; i < z.length; i++) out[i] = eps(p.x[i], p.timestep);
    advance(st, out);
  }
  return { x: result(st), timesteps, state: st };
}

describe('Euler ancestral', () => {
  const z = Float32Array.from([-2.5, -1, -0.3, 0, 0.4, 1.3, 2.2]);
  const noise = (step: number) => Float32Array.from(z, (_, i) => Math.sin(3.1 * i + 1.7 * step + 0.4));

  it.each(['10', '25', 'ddim20'])('matches k-diffusion sample_euler_ancestral step for step (respacing %s)', (respacing) => {
    const eps = gaussianEps(0.3, 0.6);
    const mine = runState(respacing, z, eps, { noise });
    expect(mine.timesteps).toEqual(Array.from(spacedDiffusion({ respacing }).timestepMap).reverse());
    const ref = kDiffusionEulerA(mine.timesteps, Float64Array.from(z), eps, noise);
    for (let i = 0; i < z.length; i++) expect(Math.abs(mine.x[i] - ref[i])).toBeLessThanOrEqual(2e-5 * Math.max(1, Math.abs(ref[i])));
  });

  it('draws fresh noise every step but the last, and is deterministic for a seed', () => {
    const seen: number[] = [];
    const r = runState('8', z, gaussianEps(0, 1), {
      noise: (s) => {
        seen.push(s);
        return noise(s);
      },
    });
    expect(seen).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(r.x.every(Number.isFinite)).toBe(true);
    const a = runState('8', new Float32Array(64), gaussianEps(0, 1), { seed: 9n }).x;
    const b = runState('8', new Float32Array(64), gaussianEps(0, 1), { seed: 9n }).x;
    const c = runState('8', new Float32Array(64), gaussianEps(0, 1), { seed: 10n }).x;
    expect(Array.from(a)).toEqual(Array.from(b));
    expect(Array.from(a)).not.toEqual(Array.from(c));
  });

  it('converges to the data distribution: N(0.3, 0.5²) data comes out with that mean, and the spread to 0.5 at first order', () => {
    // 20 000 draws of one seeded run (the generator's noise, not injected) per step count. Standard
    // errors at n = 20 000: 0.0035 for the mean, 0.0025 for the spread. Like DDIM, a first-order
    // sampler, it comes out too narrow at few steps (0.41 at 25, 0.45 at 50, 0.47 at 100).
    const n = 20_000;
    const mu = 0.3;
    const s = 0.5;
    const spreadError = [25, 50, 100].map((steps) => {
      const { x } = runState(String(steps), new Float32Array(n), gaussianEps(mu, s), { seed: 123n });
      const mean = x.reduce((a, v) => a + v, 0) / n;
      const sd = Math.sqrt(x.reduce((a, v) => a + (v - mean) ** 2, 0) / (n - 1));
      expect(Math.abs(mean - mu), `mean at ${steps} steps`).toBeLessThan(0.012);
      expect(sd, `spread at ${steps} steps`).toBeLessThan(s);
      return s - sd;
    });
    expect(spreadError[0] / spreadError[1]).toBeGreaterThan(1.5);
    expect(spreadError[1] / spreadError[2]).toBeGreaterThan(1.4);
    expect(spreadError[2]).toBeLessThan(0.04);
  });
});
