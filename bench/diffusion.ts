// Sampling-core cost per reverse step per sample for a 4×32×32 latent (DiT at 256×256), and what
// a step allocates. Prints JSON. Run: `npx tsx bench/diffusion.ts [--count N] [--rounds R]`.
// Timings are the minimum and median over many short timed windows: the machine is shared, and the
// minimum is the figure least disturbed by other load.
import { cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import { advance, combineGuidance, fillNormal, next, seedKey, start, type SamplerName } from '../shared/diffusion/index.ts';

const C = 4;
const H = 32;
const W = 32;
const PER = C * H * W;

function argNumber(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
}
const count = argNumber('--count', 8);
const rounds = argNumber('--rounds', 30);

function stats(xs: number[]): { min: number; median: number } {
  const s = [...xs].sort((a, b) => a - b);
  return { min: Number(s[0].toFixed(2)), median: Number(s[s.length >> 1].toFixed(2)) };
}

function modelOutput(rows: number, outChannels: number): Float32Array {
  const out = new Float32Array(rows * outChannels * H * W);
  // Bounded, varied values: eps-like scale, variance values inside [-1, 1].
  for (let i = 0; i < out.length; i++) out[i] = Math.sin(i * 0.7) * 0.9;
  return out;
}

interface Case {
  sampler: SamplerName;
  respacing: string;
  learnSigma: boolean;
  eta?: number;
}

function request(c: Case, seed: bigint) {
  return {
    sampler: c.sampler,
    respacing: c.respacing,
    shape: [C, H, W] as [number, number, number],
    count,
    learnSigma: c.learnSigma,
    seed,
    eta: c.eta,
  };
}

function timeCase(c: Case) {
  const out = modelOutput(count, c.learnSigma ? 2 * C : C);
  const perStep: number[] = [];
  const perStart: number[] = [];
  for (let r = 0; r < rounds + 3; r++) {
    const t0 = performance.now();
    const s = start(request(c, BigInt(r)));
    const t1 = performance.now();
    // Each step timed on its own (a short window is less often disturbed by other load); the
    // last step is left out because it draws no noise.
    for (let p = next(s); p; p = next(s)) {
      const a = performance.now();
      advance(s, out);
      const b = performance.now();
      if (r >= 3 && next(s) !== null) perStep.push(((b - a) * 1000) / count);
    }
    if (r >= 3) perStart.push(((t1 - t0) * 1000) / count);
  }
  return { us_per_step_per_sample: stats(perStep), us_start_per_sample: stats(perStart) };
}

// Counts typed arrays constructed during a whole request by swapping in counting constructors:
// start() allocates the request's buffers once; a step should allocate none.
function allocations(c: Case) {
  const out = modelOutput(count, c.learnSigma ? 2 * C : C);
  const originals = { Float32Array, Float64Array, Int32Array, Uint32Array };
  let created = 0;
  const g = globalThis as unknown as Record<string, unknown>;
  for (const [name, ctor] of Object.entries(originals)) {
    g[name] = new Proxy(ctor, {
      construct(target, args: unknown[]) {
        created++;
        return Reflect.construct(target, args) as object;
      },
    });
  }
  try {
    const s = start(request(c, 1n));
    const atStart = created;
    let steps = 0;
    globalThis.gc?.();
    const heap0 = process.memoryUsage();
    for (let p = next(s); p; p = next(s)) {
      advance(s, out);
      steps++;
    }
    const heap1 = process.memoryUsage();
    return {
      typed_arrays_at_start: atStart,
      typed_arrays_per_step: (created - atStart) / steps,
      // Includes the small { step, t, x } object `next` returns; meaningful only with --expose-gc.
      heap_bytes_per_step: Math.round((heap1.heapUsed - heap0.heapUsed) / steps),
      array_buffer_bytes_per_step: Math.round((heap1.arrayBuffers - heap0.arrayBuffers) / steps),
    };
  } finally {
    Object.assign(g, originals);
  }
}

function timeNoise() {
  const buf = new Float32Array(PER);
  const key = seedKey(7n);
  const samples: number[] = [];
  for (let r = 0; r < rounds * 10 + 50; r++) {
    const t0 = performance.now();
    for (let i = 0; i < 10; i++) fillNormal(buf, 0, PER, key, r * 10 + i, 1, 1);
    if (r >= 50) samples.push(((performance.now() - t0) * 1000) / 10);
  }
  return { us_per_latent: stats(samples) };
}

function timeGuidance() {
  const mo = modelOutput(2 * count, 2 * C);
  const dst = new Float32Array(count * 2 * PER);
  const samples: number[] = [];
  for (let r = 0; r < rounds * 10 + 50; r++) {
    const t0 = performance.now();
    combineGuidance(mo, { rows: count, outChannels: 2 * C, inChannels: C, plane: H * W, scale: 4 }, dst);
    if (r >= 50) samples.push(((performance.now() - t0) * 1000) / count);
  }
  return { us_per_sample: stats(samples) };
}

const cases: Case[] = [
  { sampler: 'ddpm', respacing: '250', learnSigma: true },
  { sampler: 'ddpm', respacing: '250', learnSigma: false },
  { sampler: 'ddim', respacing: 'ddim50', learnSigma: true, eta: 0 },
  { sampler: 'ddim', respacing: 'ddim50', learnSigma: true, eta: 1 },
  { sampler: 'dpmpp', respacing: '20', learnSigma: true },
];

const samplers = cases.map((c) => ({
  sampler: c.sampler,
  respacing: c.respacing,
  learn_sigma: c.learnSigma,
  ...(c.eta !== undefined ? { eta: c.eta } : {}),
  ...timeCase(c),
  ...allocations(c),
}));

console.log(
  JSON.stringify(
    {
      latent: [C, H, W],
      samples_per_request: count,
      rounds,
      target_us_per_step_per_sample: 50,
      node: process.version,
      cpu: cpus()[0]?.model ?? 'unknown',
      cores: cpus().length,
      noise_4x32x32: timeNoise(),
      guidance_combine_cfg4_8ch: timeGuidance(),
      samplers,
    },
    null,
    2,
  ),
);
