import { describe, expect, it } from 'vitest';
import {
  advance,
  combineGuidance,
  ddimStep,
  ddpmStep,
  DiffusionInputError,
  dpmppMemory,
  dpmppStep,
  guidanceRows,
  isDone,
  next,
  predictX0,
  result,
  spacedDiffusion,
  start,
  type SamplerName,
} from '../../shared/diffusion/index.ts';

// ᾱ of the original linear 1000-step schedule, computed here independently of the library.
function baseAlphaBar(): number[] {
  const out: number[] = [];
  let acc = 1;
  for (let i = 0; i < 1000; i++) {
    const beta = 0.0001 + ((0.02 - 0.0001) * i) / 999;
    acc *= 1 - beta;
    out.push(acc);
  }
  return out;
}
const ABAR = baseAlphaBar();

const close = (a: number, b: number, rel = 2e-6) => expect(Math.abs(a - b)).toBeLessThanOrEqual(rel * Math.max(1, Math.abs(b)));

describe('DDPM step', () => {
  // Respacing "3" keeps timesteps 0, 500, 999: step index 1 moves x_500 → x_0-level (prev = t 0).
  const d = spacedDiffusion({ respacing: '3' });
  const layout = { count: 1, channels: 2, plane: 2, outChannels: 4 };
  const x = Float32Array.from([0.5, -1.2, 2.0, 0.1]);
  const eps = [0.3, -0.7, 1.1, 0.0];
  const v = [-1, 1, 0, 0.5];
  const modelOut = Float32Array.from([...eps, ...v]);
  const noise = Float32Array.from([1.5, -0.5, 0.25, -2]);
  const ab = ABAR[500];
  const abPrev = ABAR[0];
  const beta = 1 - ab / abPrev;

  it('learned-range variance: posterior mean plus exp(½·interpolated log variance)·noise', () => {
    expect(Array.from(d.timestepMap)).toEqual([0, 500, 999]);
    const out = new Float32Array(4);
    ddpmStep(d, 1, x, modelOut, noise, layout, { variance: 'learned-range' }, out);
    const postVar = (beta * (1 - abPrev)) / (1 - ab);
    for (let i = 0; i < 4; i++) {
      const x0 = (x[i] - Math.sqrt(1 - ab) * eps[i]) / Math.sqrt(ab);
      const mean = ((Math.sqrt(abPrev) * beta) / (1 - ab)) * x0 + ((Math.sqrt(1 - beta) * (1 - abPrev)) / (1 - ab)) * x[i];
      const frac = (v[i] + 1) / 2;
      const logVar = frac * Math.log(beta) + (1 - frac) * Math.log(postVar);
      close(out[i], mean + Math.exp(0.5 * logVar) * noise[i]);
    }
  });

  it('fixed-large and fixed-small variances for models without learned sigma', () => {
    const lay = { ...layout, outChannels: 2 };
    const epsOnly = Float32Array.from(eps);
    const large = new Float32Array(4);
    const small = new Float32Array(4);
    ddpmStep(d, 1, x, epsOnly, noise, lay, { variance: 'fixed-large' }, large);
    ddpmStep(d, 1, x, epsOnly, noise, lay, { variance: 'fixed-small' }, small);
    const postVar = (beta * (1 - abPrev)) / (1 - ab);
    for (let i = 0; i < 4; i++) {
      const x0 = (x[i] - Math.sqrt(1 - ab) * eps[i]) / Math.sqrt(ab);
      const mean = ((Math.sqrt(abPrev) * beta) / (1 - ab)) * x0 + ((Math.sqrt(1 - beta) * (1 - abPrev)) / (1 - ab)) * x[i];
      close(large[i], mean + Math.sqrt(beta) * noise[i]);
      close(small[i], mean + Math.sqrt(postVar) * noise[i]);
    }
  });

  it('adds no noise at the last step and clips x0 only when asked', () => {
    const out = new Float32Array(4);
    ddpmStep(d, 0, x, modelOut, null, layout, { variance: 'learned-range' }, out);
    // At index 0, ᾱ_prev = 1: the posterior mean is exactly the x0 prediction.
    for (let i = 0; i < 4; i++) close(out[i], (x[i] - Math.sqrt(1 - abPrev) * eps[i]) / Math.sqrt(abPrev));
    const big = Float32Array.from([5, -5, 0.5, 0]);
    ddpmStep(d, 0, big, modelOut, null, layout, { variance: 'learned-range', clipDenoised: true }, out);
    expect(out[0]).toBeCloseTo(1, 6);
    expect(out[1]).toBeCloseTo(-1, 6);
    expect(out[2]).not.toBe(1);
  });

  it('rejects wrong sizes, naming the tensor', () => {
    const out = new Float32Array(4);
    expect(() => ddpmStep(d, 1, x, modelOut.subarray(0, 6), noise, layout, { variance: 'learned-range' }, out)).toThrow(
      /modelOutput: has 6 elements; expected 8/,
    );
    expect(() => ddpmStep(d, 1, x, modelOut, null, layout, { variance: 'learned-range' }, out)).toThrow(/noise: needs 4 elements/);
    expect(() => ddpmStep(d, 3, x, modelOut, noise, layout, { variance: 'learned-range' }, out)).toThrow(/step: respaced index 3/);
    expect(() =>
      ddpmStep(d, 1, x, Float32Array.from(eps), noise, { ...layout, outChannels: 2 }, { variance: 'learned-range' }, out),
    ).toThrow(/learned-range variance needs 4 channels/);
  });
});

describe('DDIM step', () => {
  const d = spacedDiffusion({ respacing: 'ddim10' });
  const layout = { count: 1, channels: 1, plane: 3, outChannels: 1 };
  const x = Float32Array.from([0.8, -0.3, 1.7]);
  const eps = Float32Array.from([0.2, 0.9, -1.4]);
  const noise = Float32Array.from([0.6, -1.1, 0.05]);

  it('eta 0 and eta 1 follow Song et al. eq. 12', () => {
    // Index 5 is original timestep 500; the previous kept timestep is 400.
    expect(d.timestepMap[5]).toBe(500);
    const ab = ABAR[500];
    const abPrev = ABAR[400];
    for (const eta of [0, 1]) {
      const out = new Float32Array(3);
      ddimStep(d, 5, x, eps, noise, layout, { eta }, out);
      const sigma = eta * Math.sqrt((1 - abPrev) / (1 - ab)) * Math.sqrt(1 - ab / abPrev);
      for (let i = 0; i < 3; i++) {
        const x0 = (x[i] - Math.sqrt(1 - ab) * eps[i]) / Math.sqrt(ab);
        close(out[i], Math.sqrt(abPrev) * x0 + Math.sqrt(1 - abPrev - sigma * sigma) * eps[i] + sigma * noise[i]);
      }
    }
  });

  it('does not read noise when eta is 0 and rejects a negative eta', () => {
    const out = new Float32Array(3);
    ddimStep(d, 5, x, eps, null, layout, { eta: 0 }, out);
    expect(() => ddimStep(d, 5, x, eps, null, layout, { eta: 0.5 }, out)).toThrow(/noise/);
    expect(() => ddimStep(d, 5, x, eps, noise, layout, { eta: -1 }, out)).toThrow(/eta: must be a finite number >= 0/);
  });
});

// Per-element data x0 ~ N(mu, s²): the exact eps predictor and the exact probability-flow ODE flow
// are closed forms, so a sampler's error can be measured exactly.
function gaussianEps(mu: number, s: number) {
  return (x: number, t: number) => {
    const a = Math.sqrt(ABAR[t]);
    const sig = Math.sqrt(1 - ABAR[t]);
    return (sig * (x - a * mu)) / (a * a * s * s + sig * sig);
  };
}
function exactFlow(mu: number, s: number, x: number, from: number, to: number): number {
  const std = (t: number) => Math.sqrt(ABAR[t] * s * s + 1 - ABAR[t]);
  return Math.sqrt(ABAR[to]) * mu + (std(to) * (x - Math.sqrt(ABAR[from]) * mu)) / std(from);
}

// Runs a whole sampling loop through the state machine with an analytic per-element model.
function sample(sampler: SamplerName, respacing: string, z: Float32Array, model: (x: number, t: number) => number, eta = 0) {
  const st = start({
    sampler,
    respacing,
    shape: [1, 1, z.length],
    count: 1,
    learnSigma: false,
    seed: 0n,
    eta,
    noise: { z, stepNoise: () => new Float32Array(z.length) },
    recordTrajectory: true,
  });
  const out = new Float32Array(z.length);
  for (let p = next(st); p; p = next(st)) {
    for (let i = 0; i < z.length; i++) out[i] = model(p.x[i], p.timestep);
    advance(st, out);
  }
  return st;
}

describe('DPM-Solver++(2M)', () => {
  const z = Float32Array.from([-2.5, -1, -0.3, 0, 0.4, 1.3, 2.2]);

  it('is exact for a point-mass data distribution (data prediction is constant)', () => {
    const st = sample('dpmpp', '10', z, gaussianEps(0.7, 0));
    for (const v of result(st)) expect(v).toBeCloseTo(0.7, 5);
    const traj = st.trajectory as Float32Array;
    // After the first step the state sits exactly on the flow from timestep 999 to 888.
    for (let i = 0; i < z.length; i++) close(traj[i], exactFlow(0.7, 0, z[i], 999, 888), 1e-5);
  });

  it('converges at second order to the exact ODE solution; DDIM (first order) does not', () => {
    const mu = 0.3;
    const s = 0.5;
    const model = gaussianEps(mu, s);
    // ddim10/20/40 grids share the timesteps 900, 800, …, 0. Each run starts on the exact flow of the
    // same x_999 at its own first timestep; errors are read at timestep 100, before the final
    // first-order steps.
    const err = (sampler: SamplerName, n: number) => {
      const d = spacedDiffusion({ respacing: `ddim${n}` });
      const first = d.timestepMap[d.numTimesteps - 1];
      const x0 = Float32Array.from(z, (v) => exactFlow(mu, s, v, 999, first));
      const st = start({
        sampler,
        respacing: `ddim${n}`,
        shape: [1, 1, z.length],
        count: 1,
        learnSigma: false,
        seed: 0n,
        noise: { z: x0, stepNoise: () => new Float32Array(z.length) },
      });
      const out = new Float32Array(z.length);
      for (let p = next(st); p; p = next(st)) {
        if (p.timestep === 100) {
          return Math.max(...Array.from(p.x, (v, i) => Math.abs(v - exactFlow(mu, s, z[i], 999, 100))));
        }
        for (let i = 0; i < z.length; i++) out[i] = model(p.x[i], p.timestep);
        advance(st, out);
      }
      throw new Error('timestep 100 not on the grid');
    };
    const dpm = [10, 20, 40].map((n) => err('dpmpp', n));
    const ddim = [10, 20, 40].map((n) => err('ddim', n));
    expect(dpm[0] / dpm[1]).toBeGreaterThan(3.2);
    expect(dpm[1] / dpm[2]).toBeGreaterThan(3.2);
    expect(ddim[0] / ddim[1]).toBeLessThan(2.5);
    expect(ddim[1] / ddim[2]).toBeLessThan(2.5);
    expect(dpm[0]).toBeLessThan(ddim[0] / 4);
  });

  it('gets closer to the exact clean sample than DDIM at 10–25 steps', () => {
    const mu = 0.3;
    const s = 1;
    const exact = Array.from(z, (v) => mu + (s * (v - Math.sqrt(ABAR[999]) * mu)) / Math.sqrt(ABAR[999] * s * s + 1 - ABAR[999]));
    for (const n of [10, 15, 20, 25]) {
      const e = (sampler: SamplerName) =>
        Math.max(...Array.from(result(sample(sampler, String(n), z, gaussianEps(mu, s))), (v, i) => Math.abs(v - exact[i])));
      expect(e('dpmpp'), `${n} steps`).toBeLessThan(e('ddim') / 2);
    }
  });

  it('approaches the many-step DDIM(eta 0) sample as steps grow, on a non-Gaussian model', () => {
    // Two-component mixture x0 ∈ {−1, +1}, spread 0.2: eps from the exact posterior mean.
    const model = (x: number, t: number) => {
      const a = Math.sqrt(ABAR[t]);
      const sig2 = 1 - ABAR[t];
      const s2 = 0.04;
      const v = a * a * s2 + sig2;
      const lp = -((x - a) ** 2) / (2 * v);
      const lm = -((x + a) ** 2) / (2 * v);
      const wp = 1 / (1 + Math.exp(lm - lp));
      const mean = wp * (1 + (a * s2 * (x - a)) / v) + (1 - wp) * (-1 + (a * s2 * (x + a)) / v);
      return (x - a * mean) / Math.sqrt(sig2);
    };
    const ref = result(sample('ddim', '1000', z, model));
    const dist = (n: number) => {
      const r = result(sample('dpmpp', String(n), z, model));
      return Math.max(...Array.from(r, (v, i) => Math.abs(v - ref[i])));
    };
    const d = [10, 25, 50, 100].map(dist);
    for (let i = 1; i < d.length; i++) expect(d[i]).toBeLessThan(d[i - 1]);
    expect(d[3]).toBeLessThan(2e-3);
    const ddim25 = result(sample('ddim', '25', z, model));
    const ddimDist = Math.max(...Array.from(ddim25, (v, i) => Math.abs(v - ref[i])));
    expect(d[1]).toBeLessThan(ddimDist);
  });

  it('a first step equals DDIM with eta 0 (both are the first-order solver)', () => {
    const d = spacedDiffusion({ respacing: '20' });
    const layout = { count: 1, channels: 1, plane: 4, outChannels: 1 };
    const x = Float32Array.from([1, -0.5, 0.3, 2]);
    const eps = Float32Array.from([0.1, 0.4, -0.8, 1.2]);
    const a = new Float32Array(4);
    const b = new Float32Array(4);
    dpmppStep(d, 19, x, eps, layout, dpmppMemory(4), {}, a);
    ddimStep(d, 19, x, eps, null, layout, { eta: 0 }, b);
    for (let i = 0; i < 4; i++) close(a[i], b[i], 1e-6);
  });
});

describe('guidance combine', () => {
  const rows = 2;
  const C = 4;
  const Cout = 8;
  const plane = 3;
  const rowSize = Cout * plane;
  const modelOut = Float32Array.from({ length: 2 * rows * rowSize }, (_, i) => Math.sin(i * 1.3) * 2);
  const at = (row: number, ch: number, p: number) => modelOut[row * rowSize + ch * plane + p];

  for (const [mode, guided] of [
    [3, 3],
    ['all', 4],
  ] as const) {
    it(`channels ${mode}: guides ${guided} channels, the rest from the conditional rows`, () => {
      const out = combineGuidance(modelOut, { rows, outChannels: Cout, inChannels: C, plane, scale: 4, channels: mode });
      expect(out).toHaveLength(rows * rowSize);
      for (let r = 0; r < rows; r++) {
        for (let ch = 0; ch < Cout; ch++) {
          for (let p = 0; p < plane; p++) {
            const c = at(r, ch, p);
            const u = at(rows + r, ch, p);
            const want = ch < guided ? u + 4 * (c - u) : c;
            expect(out[r * rowSize + ch * plane + p]).toBeCloseTo(want, 5);
          }
        }
      }
    });
  }

  it('rounds like float32 torch: uncond + f32(scale · f32(cond − uncond))', () => {
    const f = Math.fround;
    const c = f(0.1);
    const u = f(0.30000001192092896);
    const mo = Float32Array.from([c, u]);
    const out = combineGuidance(mo, { rows: 1, outChannels: 1, inChannels: 1, plane: 1, scale: 1.5, channels: 'all' });
    expect(out[0]).toBe(f(u + f(1.5 * f(c - u))));
  });

  it('scale 1 needs only the conditional rows', () => {
    expect(guidanceRows(3, 1)).toBe(3);
    expect(guidanceRows(3, 4)).toBe(6);
    const cond = modelOut.subarray(0, rows * rowSize);
    expect(Array.from(combineGuidance(cond, { rows, outChannels: Cout, inChannels: C, plane, scale: 1 }))).toEqual(Array.from(cond));
    // With both halves present at scale 1, the result is the conditional half.
    expect(Array.from(combineGuidance(modelOut, { rows, outChannels: Cout, inChannels: C, plane, scale: 1 }))).toEqual(Array.from(cond));
  });

  it('rejects a wrong row count or channel mode', () => {
    expect(() => combineGuidance(modelOut.subarray(0, 3 * rowSize), { rows, outChannels: Cout, inChannels: C, plane, scale: 4 })).toThrow(
      /modelOutput: has 72 elements; expected 96/,
    );
    expect(() => combineGuidance(modelOut, { rows, outChannels: Cout, inChannels: C, plane, scale: 4, channels: 2 as 3 })).toThrow(
      /guidanceChannels/,
    );
    expect(() => combineGuidance(modelOut, { rows, outChannels: Cout, inChannels: C, plane, scale: Number.NaN })).toThrow(/cfgScale/);
  });
});

describe('state machine', () => {
  const base = {
    sampler: 'ddpm' as const,
    respacing: '5',
    shape: [4, 2, 2] as [number, number, number],
    count: 2,
    learnSigma: true,
    seed: 5n,
  };

  it('walks the respaced timesteps high to low and reports done', () => {
    const st = start(base);
    const seen: number[] = [];
    const out = new Float32Array(2 * 8 * 4);
    for (let p = next(st); p; p = next(st)) {
      expect(Array.from(p.t)).toEqual([p.timestep, p.timestep]);
      expect(p.x).toBe(st.x);
      expect(next(st)?.timestep).toBe(p.timestep);
      seen.push(p.timestep);
      advance(st, out);
    }
    expect(seen).toEqual([999, 749, 500, 250, 0]);
    expect(isDone(st)).toBe(true);
    expect(result(st)).toBe(st.x);
    expect(() => advance(st, out)).toThrow(/already finished/);
  });

  it('validates requests, naming the field', () => {
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ sampler: 'euler' }, /sampler: must be 'ddpm', 'ddim', 'dpmpp' or 'euler-a'/],
      [{ count: 0 }, /count: must be a positive integer/],
      [{ shape: [4, 2] }, /shape: must be \[C, H, W\]/],
      [{ respacing: 'ddim7x' }, /respacing: DDIM step count '7x'/],
      [{ respacing: '5', numSteps: 6 }, /numSteps: is 6 but respacing '5' gives 5 steps/],
      [{ respacing: undefined, numSteps: undefined }, /respacing: give respacing or numSteps/],
      [{ eta: -0.1 }, /eta: must be a finite number >= 0/],
      [{ seed: -3n }, /seed: must be an unsigned 64-bit integer/],
      [{ sampleIndexOffset: 1.5 }, /sampleIndexOffset/],
      [{ sampleIndices: [0, 1, 2] }, /sampleIndices: must list one index per sample/],
      [{ sampleIndices: [0, -1] }, /sampleIndices\[1\]: must be an integer/],
      [{ sampleIndices: [0, 1], sampleIndexOffset: 2 }, /give sampleIndices or sampleIndexOffset, not both/],
      [{ noise: { z: new Float32Array(3), stepNoise: () => new Float32Array(0) } }, /noise\.z: must be a Float32Array of 32 elements/],
    ];
    for (const [patch, msg] of cases) {
      const req = { ...base, ...patch } as Parameters<typeof start>[0];
      expect(() => start(req), msg.source).toThrow(DiffusionInputError);
      expect(() => start(req), msg.source).toThrow(msg);
    }
    expect(start({ ...base, respacing: undefined, numSteps: 7 }).totalSteps).toBe(7);
  });

  it('rejects a model output of the wrong size and injected step noise of the wrong size', () => {
    const st = start(base);
    expect(() => advance(st, new Float32Array(2 * 4 * 4))).toThrow(/modelOutput: has 32 elements; expected 64/);
    expect(st.stepsDone).toBe(0);
    const inj = start({ ...base, noise: { z: new Float32Array(32), stepNoise: () => new Float32Array(5) } });
    expect(() => advance(inj, new Float32Array(64))).toThrow(/noise\.stepNoise: step 0 must give a Float32Array of 32 elements/);
  });

  it('uses injected noise instead of the generator and records the trajectory', () => {
    const z = Float32Array.from({ length: 32 }, (_, i) => (i % 7) - 3);
    const stepNoise = (step: number) => Float32Array.from({ length: 32 }, (_, i) => Math.cos(i + step));
    const a = start({ ...base, noise: { z, stepNoise }, recordTrajectory: true });
    expect(Array.from(a.x)).toEqual(Array.from(z));
    const b = start({ ...base, noise: { z, stepNoise: (s) => stepNoise(s + 1) } });
    const mo = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i) * 0.5);
    for (let p = next(a); p; p = next(a)) {
      advance(a, mo);
      advance(b, mo);
    }
    expect(Array.from(a.trajectory as Float32Array).slice(4 * 32)).toEqual(Array.from(result(a)));
    // The last step adds no noise, so the two runs differ only through the noise of earlier steps.
    expect(Array.from(result(a))).not.toEqual(Array.from(result(b)));
  });
});

describe('x0 prediction (previews)', () => {
  const samplers: Array<[SamplerName, boolean]> = [
    ['ddpm', true],
    ['ddim', false],
    ['dpmpp', true],
    ['euler-a', false],
  ];
  it.each(samplers)(
    '%s: equals (x − √(1−ᾱ)·ε)/√ᾱ at every step, is the final sample at the last step, and changes nothing',
    (sampler, learnSigma) => {
      const req = { sampler, numSteps: 6, shape: [2, 3, 3] as const, count: 2, learnSigma, seed: 42n };
      const withPreview = start(req);
      const without = start(req);
      const per = 2 * 9;
      const outPer = (learnSigma ? 2 : 1) * 9 * 2;
      let last: Float32Array | null = null;
      for (let p = next(withPreview); p; p = next(withPreview)) {
        // A model output that depends on the latent, so the two runs would drift apart if x0 leaked into the state.
        const mo = Float32Array.from({ length: 2 * outPer }, (_, i) => Math.tanh(withPreview.x[i % (2 * per)] * 0.7 + Math.sin(i)) * 0.9);
        const x = Float32Array.from(withPreview.x);
        const x0 = predictX0(withPreview, mo);
        const ab = ABAR[p.timestep];
        for (let s = 0; s < 2; s++) {
          for (let k = 0; k < per; k++) {
            const eps = mo[s * outPer + k];
            const i = s * per + k;
            close(x0[i], (x[i] - Math.sqrt(1 - ab) * eps) / Math.sqrt(ab), 1e-5);
          }
        }
        expect(Array.from(withPreview.x)).toEqual(Array.from(x)); // the state is not touched
        last = x0;
        advance(withPreview, mo);
        advance(without, mo);
      }
      expect(Array.from(result(withPreview))).toEqual(Array.from(result(without)));
      // At the last step every sampler returns its x0 prediction itself (DDPM adds no noise there and
      // its posterior mean coefficients are 1 and 0 to float rounding).
      const fin = result(withPreview);
      if (sampler === 'ddpm') fin.forEach((v, i) => close(v, last![i], 1e-6));
      else expect(Array.from(fin)).toEqual(Array.from(last!));
      expect(() => predictX0(withPreview, new Float32Array(2 * outPer))).toThrow(/already finished/);
    },
  );

  it('rejects a model output of the wrong size', () => {
    const st = start({ sampler: 'ddim', numSteps: 3, shape: [2, 2, 2], count: 1, learnSigma: false, seed: 1n });
    expect(() => predictX0(st, new Float32Array(3))).toThrow(/modelOutput: has 3 elements; expected 8/);
  });
});
