import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  betaSchedule,
  DiffusionInputError,
  diffusionTables,
  respacedBetas,
  roundHalfEven,
  spacedDiffusion,
  spaceTimesteps,
} from '../../shared/diffusion/index.ts';

interface GoldenSchedules {
  linear_1000: { betas: number[] };
  respacing: Record<string, { timesteps: number[]; betas: number[] }>;
}
const golden = JSON.parse(readFileSync(resolve(process.cwd(), '../shared/golden/dit/schedules.json'), 'utf8')) as GoldenSchedules;

function maxRel(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]) / Math.abs(b[i]));
  return m;
}

describe('schedules', () => {
  it('linear 1000-step betas equal the original', () => {
    expect(maxRel(betaSchedule('linear', 1000), golden.linear_1000.betas)).toBeLessThanOrEqual(1e-12);
  });

  it('linear schedule scales both ends by 1000/numSteps', () => {
    const b = betaSchedule('linear', 250);
    expect(b[0]).toBeCloseTo(4 * 0.0001, 15);
    expect(b[249]).toBe(4 * 0.02);
    expect(b[1] - b[0]).toBeCloseTo((0.08 - 0.0004) / 249, 15);
  });

  it('cosine schedule follows ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2) until the 0.999 cap', () => {
    const T = 100;
    const b = betaSchedule('cosine', T);
    const f = (t: number) => Math.cos(((t / T + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
    let acp = 1;
    for (let i = 0; i < T - 1; i++) {
      acp *= 1 - b[i];
      expect(acp).toBeCloseTo(f(i + 1) / f(0), 10);
    }
    expect(b[T - 1]).toBe(0.999);
  });

  it('derived tables match the closed forms of GaussianDiffusion', () => {
    const betas = [0.1, 0.2, 0.3];
    const t = diffusionTables(betas);
    const acp = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7];
    const prev = [1, acp[0], acp[1]];
    for (let i = 0; i < 3; i++) {
      expect(t.alphasCumprod[i]).toBeCloseTo(acp[i], 15);
      expect(t.alphasCumprodPrev[i]).toBeCloseTo(prev[i], 15);
      expect(t.sqrtRecipAlphasCumprod[i]).toBeCloseTo(1 / Math.sqrt(acp[i]), 14);
      expect(t.sqrtRecipm1AlphasCumprod[i]).toBeCloseTo(Math.sqrt((1 - acp[i]) / acp[i]), 14);
      const pv = (betas[i] * (1 - prev[i])) / (1 - acp[i]);
      expect(t.posteriorVariance[i]).toBeCloseTo(pv, 15);
      expect(t.posteriorMeanCoef1[i]).toBeCloseTo((betas[i] * Math.sqrt(prev[i])) / (1 - acp[i]), 14);
      expect(t.posteriorMeanCoef2[i]).toBeCloseTo(((1 - prev[i]) * Math.sqrt(1 - betas[i])) / (1 - acp[i]), 14);
    }
    expect(t.posteriorVariance[0]).toBe(0);
    expect(t.posteriorLogVarianceClipped[0]).toBe(Math.log(t.posteriorVariance[1]));
    expect(t.fixedLargeVariance[0]).toBe(t.posteriorVariance[1]);
    expect(t.fixedLargeVariance[2]).toBe(0.3);
    expect(t.alphasCumprodNext[2]).toBe(0);
  });
});

describe('respacing', () => {
  const base = diffusionTables(betaSchedule('linear', 1000));
  for (const [spec, want] of Object.entries(golden.respacing)) {
    it(`"${spec}" keeps the original timesteps and betas`, () => {
      const steps = spaceTimesteps(1000, spec);
      expect(steps).toEqual(want.timesteps);
      expect(maxRel(respacedBetas(base.alphasCumprod, steps), want.betas)).toBeLessThanOrEqual(1e-12);
      const d = spacedDiffusion({ respacing: spec });
      expect(Array.from(d.timestepMap)).toEqual(want.timesteps);
      expect(maxRel(d.betas, want.betas)).toBeLessThanOrEqual(1e-12);
    });
  }

  it('rounds the section cursor half to even, as Python does', () => {
    expect([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 2.5001].map(roundHalfEven)).toEqual([0, 2, 2, 0, -2, 2, 3]);
    // 9 timesteps into 5 steps: stride 2 (no ties); 8 into 5: stride 1.75 → 0, 1.75, 3.5, 5.25, 7 → 0,2,4,5,7.
    expect(spaceTimesteps(9, '5')).toEqual([0, 2, 4, 6, 8]);
    expect(spaceTimesteps(8, '5')).toEqual([0, 2, 4, 5, 7]);
    // Stride 1.5: 0, 1.5, 3, 4.5, 6 → 0, 2, 3, 4, 6 (Math.round would give 5 for 4.5).
    expect(spaceTimesteps(7, '5')).toEqual([0, 2, 3, 4, 6]);
  });

  it('ddimN takes the smallest stride that gives exactly N steps', () => {
    expect(spaceTimesteps(1000, 'ddim3')).toEqual([0, 334, 668]);
    expect(spaceTimesteps(1000, 'ddim1000')).toHaveLength(1000);
  });

  it('sections split the schedule with the remainder going to the first sections', () => {
    // 10 timesteps in 3 sections of sizes 4, 3, 3.
    expect(spaceTimesteps(10, '2,1,3')).toEqual([0, 3, 4, 7, 8, 9]);
  });

  it('rejects unusable strings with a reason', () => {
    const bad: Array<[string, RegExp]> = [
      ['', /empty/],
      ['0', /0 steps/],
      ['1001', /1001 steps but the schedule has 1000/],
      ['abc', /'abc' is not a non-negative integer/],
      ['10,x', /'x' is not a non-negative integer/],
      ['-5', /not a non-negative integer/],
      ['2.5', /not a non-negative integer/],
      ['ddim0', /0 steps/],
      ['ddim', /DDIM step count '' is not/],
      ['ddim999', /no integer stride gives exactly 999 steps/],
      ['ddim1', /no integer stride gives exactly 1 steps/],
      ['600,100', /section 0 spans 500 timesteps and cannot hold 600/],
      ['0,0', /0 steps/],
    ];
    for (const [spec, msg] of bad) {
      let err: unknown;
      try {
        spaceTimesteps(1000, spec);
      } catch (e) {
        err = e;
      }
      expect(err, spec).toBeInstanceOf(DiffusionInputError);
      expect((err as DiffusionInputError).field).toBe('respacing');
      expect((err as Error).message, spec).toMatch(msg);
    }
    expect(() => betaSchedule('linear', 0)).toThrow(/diffusionSteps: must be a positive integer/);
    expect(() => spacedDiffusion({ respacing: '10', schedule: 'quad' as 'linear' })).toThrow(/unknown schedule 'quad'/);
  });

  it('caches a spec and returns immutable tables', () => {
    const a = spacedDiffusion({ respacing: '25' });
    expect(spacedDiffusion({ respacing: '25' })).toBe(a);
    expect(Object.isFrozen(a)).toBe(true);
  });
});
