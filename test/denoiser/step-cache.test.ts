// The denoiser's per-request step cache on the small golden DiT, with real onnxruntime, called
// directly (no transport): requests without a policy keep the original numerics bit for bit; a
// full cached-policy step (head → tail) is the model.onnx step; the policies cache the steps they
// say; steps of several keys that share passes do not see each other's states; the byte budget
// holds, evicts, and an evicted key's next step is computed in full; bad fields are refused by name.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Worker } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compileDenoiserConfig, type DenoiserConfigInput } from '../../services/denoiser/config.ts';
import { Denoiser } from '../../services/denoiser/denoiser.ts';
import { STATE_OVERHEAD_BYTES, StepCacheStore } from '../../services/denoiser/step-cache.ts';
import { InvalidArgumentError } from '../../shared/errors.ts';
import { GuidanceChannels, StepCachePolicy, type StepCacheOptions } from '../../shared/gen/ditpipe/v1/common.ts';
import { DenoiseRequest, type DenoiseResponse } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { denoiserMetrics } from '../../shared/metrics.ts';
import { buildDitModel } from '../../shared/model/dit.ts';
import { readDitModelDir } from '../../shared/model/modeldir.ts';
import type { CacheSessions } from '../../shared/runtime/cache-sessions.ts';
import { f32Tensor, readF32Tensor } from '../../shared/tensor.ts';
import { DIT_NAME, GOLDEN, testModels } from '../helpers/models.ts';

const { ditDir } = testModels();
const meta = readDitModelDir(ditDir).meta;
const C = meta.config.in_channels;
const S = meta.config.input_size;
const ROW = C * S * S;
const TOKENS = (S / meta.config.patch_size) ** 2;
const HIDDEN = TOKENS * meta.config.hidden_size;

const open: Denoiser[] = [];
async function denoiser(cfg: Partial<DenoiserConfigInput> = {}): Promise<Denoiser> {
  const d = await Denoiser.create(compileDenoiserConfig({ modelDir: ditDir, maxWaitMs: 0, intraOpThreads: 1, ...cfg }), denoiserMetrics());
  open.push(d);
  return d;
}
afterAll(async () => {
  await Promise.all(open.map((d) => d.close()));
});

/** Deterministic latents for `n` samples (a fixed LCG, values in about −2..2). */
function latents(n: number, seed: number): Float32Array {
  const x = new Float32Array(n * ROW);
  let s = seed >>> 0;
  for (let i = 0; i < x.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    x[i] = (s / 2 ** 32) * 4 - 2;
  }
  return x;
}

interface Call {
  x: Float32Array;
  t: number;
  y: number[];
  cfg?: number;
  cache?: Partial<StepCacheOptions>;
  key?: string;
  stepIndex?: number;
  numSteps?: number;
  omitVariance?: boolean;
}

function request(c: Call): DenoiseRequest {
  const n = c.y.length;
  return DenoiseRequest.fromPartial({
    model: DIT_NAME,
    x: f32Tensor([n, C, S, S], c.x),
    t: new Array<bigint>(n).fill(BigInt(c.t)),
    y: c.y,
    cfgScale: c.cfg ?? 4,
    guidanceChannels: GuidanceChannels.GUIDANCE_CHANNELS_UNSPECIFIED,
    omitVariance: c.omitVariance ?? true,
    stepIndex: c.stepIndex ?? 0,
    stepCache: c.cache && { preset: '', ...c.cache },
    cacheKey: c.key ?? '',
    numSteps: c.numSteps ?? 0,
  });
}

const outOf = (r: DenoiseResponse): Float32Array => readF32Tensor(r.out, 'out', [null, null, S, S]).data;
const bytesOf = (a: Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

async function gauge(d: Denoiser, g: 'stepCacheBytes' | 'stepCacheEntries' | 'stepCacheEvictions'): Promise<number> {
  return (await d.metrics[g].get()).values.find((v) => v.labels.model === d.name)?.value ?? NaN;
}
async function outcomes(d: Denoiser): Promise<Record<string, number>> {
  return Object.fromEntries((await d.metrics.stepCacheSteps.get()).values.map((v) => [v.labels.outcome, v.value]));
}

const T = (i: number): number => 900 - 100 * i;
const INTERVAL = (interval: number, warmupSteps = 0): Partial<StepCacheOptions> => ({
  policy: StepCachePolicy.STEP_CACHE_POLICY_INTERVAL,
  interval,
  warmupSteps,
});
const ADAPTIVE = (threshold: number, maxCachedSteps = 0): Partial<StepCacheOptions> => ({
  policy: StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE,
  threshold,
  maxCachedSteps,
});

interface Loop {
  responses: DenoiseResponse[];
  outs: Float32Array[];
  /** The input of each step (the previous step's output, as a sampler would feed it back). */
  inputs: Float32Array[];
}

/** A simple sampling loop: each step's mean output is the next step's x, at a fixed t per step. */
async function loop(
  d: Denoiser,
  opts: { y: number[]; seed: number; steps: number; cache?: Partial<StepCacheOptions>; key?: string },
): Promise<Loop> {
  let x = latents(opts.y.length, opts.seed);
  const l: Loop = { responses: [], outs: [], inputs: [] };
  for (let i = 0; i < opts.steps; i++) {
    l.inputs.push(x);
    const r = await d.denoise(
      request({ x, t: T(i), y: opts.y, cache: opts.cache, key: opts.key ?? (opts.cache ? 'k' : ''), stepIndex: i, numSteps: opts.steps }),
    );
    l.responses.push(r);
    x = outOf(r);
    l.outs.push(x);
  }
  return l;
}

const pattern = (l: Loop): string => l.responses.map((r) => (r.cached ? 'C' : 'F')).join('');

describe('the step cache', () => {
  let d: Denoiser;
  beforeAll(async () => {
    d = await denoiser();
  });

  it('is on with the model directory of the tests (it has the step-cache graphs)', () => {
    expect(meta.cacheGraphs).toBeDefined();
    expect(d.stepCache).toEqual({ enabled: true, maxBytes: 256 * 1024 * 1024 });
  });

  it('leaves requests without a policy as they were: model.onnx bit for bit, with caching on and off', async () => {
    const off = await denoiser({ stepCacheMib: 0 });
    expect(off.stepCache.enabled).toBe(false);
    const x = latents(2, 1);
    // The current path, by hand: model.onnx at scale 1 is the answer itself.
    const s = await ort.InferenceSession.create(readDitModelDir(ditDir).onnxPath);
    const ref = (
      await s.run({
        x: new ort.Tensor('float32', x.slice(), [2, C, S, S]),
        t: new ort.Tensor('int64', BigInt64Array.of(500n, 500n), [2]),
        y: new ort.Tensor('int64', BigInt64Array.of(3n, 7n), [2]),
      })
    ).out.data as Float32Array;
    await s.release();
    for (const den of [d, off]) {
      const r = await den.denoise(request({ x, t: 500, y: [3, 7], cfg: 1, omitVariance: false }));
      expect(bytesOf(outOf(r)).equals(bytesOf(ref))).toBe(true);
      expect(r).toMatchObject({ cached: false, cacheHolder: '', gflops: 2 * meta.gflops });
    }
    // Guided, with cache fields set but no policy: still the plain path, identical on both.
    const guided = await Promise.all(
      [d, off].map((den) => den.denoise(request({ x, t: 500, y: [3, 7], cache: {}, key: 'ignored', numSteps: 3 }))),
    );
    expect(bytesOf(outOf(guided[0])).equals(bytesOf(outOf(guided[1])))).toBe(true);
    expect(guided[0].cacheHolder).toBe('');
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
  });

  it('INTERVAL 1: every step full (head → tail), equal to the plain step, nothing cached', async () => {
    const plain = await loop(d, { y: [2], seed: 2, steps: 5 });
    const l = await loop(d, { y: [2], seed: 2, steps: 5, cache: INTERVAL(1), key: 'i1' });
    expect(pattern(l)).toBe('FFFFF');
    for (let i = 0; i < 5; i++) expect(maxAbsDiff(l.outs[i], plain.outs[i])).toBeLessThanOrEqual(1e-6);
    const rows = 2; // one sample, guided
    expect(l.responses[0].gflops).toBeCloseTo(rows * (meta.cacheGraphs!.head.gflops + meta.cacheGraphs!.tail.gflops), 12);
    expect(l.responses.slice(0, 4).every((r) => r.cacheHolder === d.info.instanceId)).toBe(true);
    expect(l.responses[4].cacheHolder).toBe(''); // the last step frees the state
  });

  it('INTERVAL 3 over 9 steps: full, cached, cached, full, …, the last step full; a cached step costs less', async () => {
    const spent = async (): Promise<number> => (await d.metrics.samplingGflops.get()).values[0].value;
    const graphRows = async (): Promise<Record<string, number>> =>
      Object.fromEntries((await d.metrics.graphRows.get()).values.map((v) => [v.labels.graph, v.value]));
    const [spentBefore, rowsBefore] = [await spent(), await graphRows()];
    const l = await loop(d, { y: [4], seed: 3, steps: 9, cache: INTERVAL(3), key: 'i3' });
    expect(pattern(l)).toBe('FCCFCCFCF');
    // What was computed: the head on every step, the tail on the 4 full ones, skip on the 5 cached.
    expect((await spent()) - spentBefore).toBeCloseTo(
      l.responses.reduce((sum, r) => sum + r.gflops, 0),
      12,
    );
    const rowsAfter = await graphRows();
    expect(['full', 'head', 'tail', 'skip'].map((g) => rowsAfter[g] - rowsBefore[g])).toEqual([0, 18, 8, 10]);
    const [full, cached] = [l.responses[0], l.responses[1]];
    expect(cached.gflops).toBeLessThan(full.gflops);
    expect(cached.gflops).toBeCloseTo(2 * (meta.cacheGraphs!.head.gflops + meta.cacheGraphs!.skip.gflops), 12);
    expect(l.responses.slice(0, 8).every((r) => r.cacheHolder === d.info.instanceId)).toBe(true);
    expect(l.responses[8].cacheHolder).toBe('');
    // A cached step is not the full step of the same input (it reuses step 0's block residual).
    const ref = await d.denoise(request({ x: l.inputs[1], t: T(1), y: [4] }));
    expect(maxAbsDiff(l.outs[1], outOf(ref))).toBeGreaterThan(0);
    // Warmup: the first steps are full whatever the interval says.
    const w = await loop(d, { y: [4], seed: 3, steps: 9, cache: INTERVAL(3, 4), key: 'i3w' });
    expect(pattern(w)).toBe('FFFFCCFCF');
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
  });

  it('keeps keys apart when their steps share passes: each equals its run alone, cached steps included', async () => {
    const policy = INTERVAL(2);
    const alone = [
      await loop(d, { y: [1, 6], seed: 4, steps: 6, cache: policy, key: 'a' }),
      await loop(d, { y: [8], seed: 5, steps: 6, cache: policy, key: 'b' }),
    ];
    const shared = await denoiser({ maxWaitMs: 50 });
    const specs = [
      { y: [1, 6], x: latents(2, 4), key: 'a' },
      { y: [8], x: latents(1, 5), key: 'b' },
    ];
    for (let i = 0; i < 6; i++) {
      const rs = await Promise.all(
        specs.map((s) => shared.denoise(request({ x: s.x, t: T(i), y: s.y, cache: policy, key: s.key, stepIndex: i, numSteps: 6 }))),
      );
      rs.forEach((r, k) => {
        expect(r.batchRows).toBe(6); // one pass for both (2×2 + 2×1 rows)
        expect(r.cached).toBe(alone[k].responses[i].cached);
        expect(maxAbsDiff(outOf(r), alone[k].outs[i])).toBe(0);
        specs[k].x = outOf(r);
      });
    }
    expect(pattern(alone[0])).toBe('FCFCFF');
  });

  it('ADAPTIVE: a huge threshold caches after the first step (up to max_cached_steps), a tiny one never', async () => {
    expect(pattern(await loop(d, { y: [5], seed: 6, steps: 9, cache: ADAPTIVE(10), key: 'ad' }))).toBe('FCCCCCCCF');
    expect(pattern(await loop(d, { y: [5], seed: 6, steps: 9, cache: ADAPTIVE(10, 2), key: 'ad2' }))).toBe('FCCFCCFCF');
    expect(pattern(await loop(d, { y: [5], seed: 6, steps: 9, cache: ADAPTIVE(1e-9), key: 'ad0' }))).toBe('FFFFFFFFF');
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
  });

  it('refuses bad step-cache fields, naming each', async () => {
    const x = latents(1, 7);
    const ok = { x, t: 500, y: [1], key: 'v', numSteps: 10, stepIndex: 0 };
    const cases: Array<[string, Partial<Call>]> = [
      ['step_cache.preset', { cache: { preset: 'interval-2' } }],
      ['step_cache.policy', { cache: { policy: 7 as StepCachePolicy } }],
      ['step_cache.interval', { cache: INTERVAL(0) }],
      ['step_cache.interval', { cache: INTERVAL(1001) }],
      ['step_cache.threshold', { cache: ADAPTIVE(0) }],
      ['step_cache.threshold', { cache: ADAPTIVE(10.5) }],
      ['step_cache.threshold', { cache: ADAPTIVE(Number.NaN) }],
      ['step_cache.threshold', { cache: ADAPTIVE(Number.POSITIVE_INFINITY) }],
      ['step_cache.warmup_steps', { cache: { ...INTERVAL(2), warmupSteps: 1001 } }],
      ['step_cache.max_cached_steps', { cache: { ...ADAPTIVE(0.1), maxCachedSteps: 1001 } }],
      ['cache_key', { cache: INTERVAL(2), key: '' }],
      ['cache_key', { cache: INTERVAL(2), key: 'k'.repeat(257) }],
      ['num_steps', { cache: INTERVAL(2), numSteps: 0 }],
      ['num_steps', { cache: INTERVAL(2), numSteps: 1001 }],
      ['step_index', { cache: INTERVAL(2), stepIndex: 10 }],
    ];
    for (const [field, bad] of cases) {
      const err = await d.denoise(request({ ...ok, ...bad })).catch((e: unknown) => e);
      expect(err, field).toBeInstanceOf(InvalidArgumentError);
      expect((err as InvalidArgumentError).field, JSON.stringify(bad.cache)).toBe(field);
    }
    // The limits themselves are fine.
    const r = await d.denoise(
      request({ ...ok, cache: { ...INTERVAL(1000), warmupSteps: 1000 }, key: 'k'.repeat(256), numSteps: 1000, stepIndex: 999 }),
    );
    expect(r.cached).toBe(false);
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
  });

  it('frees a key after its last step, and drops a state whose signature changed', async () => {
    const x = latents(1, 8);
    const step = (i: number, cache: Partial<StepCacheOptions>, cfg = 4): Promise<DenoiseResponse> =>
      d.denoise(request({ x, t: T(i), y: [2], cfg, cache, key: 'sig', stepIndex: i, numSteps: 4 }));
    expect((await step(0, INTERVAL(3))).cacheHolder).toBe(d.info.instanceId);
    expect(await gauge(d, 'stepCacheEntries')).toBe(1);
    expect((await step(1, INTERVAL(3))).cached).toBe(true);
    const before = await outcomes(d);
    // Another policy (or guidance) under the same key: no state that matches, so a miss in full.
    expect((await step(2, INTERVAL(4))).cached).toBe(false);
    expect((await step(3, INTERVAL(4), 1.5)).cached).toBe(false);
    const after = await outcomes(d);
    expect(after.miss - before.miss).toBe(2);
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
    expect(await gauge(d, 'stepCacheBytes')).toBe(0);
  });
});

describe('the step-cache budget', () => {
  it('holds: bytes never above it, evictions counted, an evicted key computed in full on its next step', async () => {
    const keys = ['k0', 'k1', 'k2', 'k3', 'k4'];
    const state = 2 * HIDDEN * 4 + 2 * 2 + STATE_OVERHEAD_BYTES; // two guidance rows of residual
    const budget = 2 * state + 100;
    const d = await denoiser({ stepCacheMib: budget / 2 ** 20, maxWaitMs: 50 });
    expect(d.stepCache).toEqual({ enabled: true, maxBytes: budget });
    const xs = keys.map((_, k) => latents(1, 20 + k));
    const holder = keys.map(() => '');
    let misses = 0;
    const steps = 6;
    for (let i = 0; i < steps; i++) {
      const calls = keys.map((key, k) => ({ x: xs[k], t: T(i), y: [k], cache: INTERVAL(2), key, stepIndex: i, numSteps: steps }));
      const rs = await Promise.all(calls.map((c) => d.denoise(request(c))));
      expect(await gauge(d, 'stepCacheBytes')).toBeLessThanOrEqual(budget);
      expect(await gauge(d, 'stepCacheEntries')).toBeLessThanOrEqual(2);
      for (const [k, r] of rs.entries()) {
        expect(r.batchRows).toBe(10);
        if (i > 0 && holder[k] === '') {
          // Its state was evicted after its last step: this one is computed in full, correctly.
          misses++;
          expect(r.cached).toBe(false);
          const plain = await d.denoise(request({ ...calls[k], cache: undefined, key: '' }));
          expect(maxAbsDiff(outOf(r), outOf(plain))).toBeLessThanOrEqual(1e-6);
        }
        holder[k] = r.cacheHolder;
        xs[k] = outOf(r);
      }
    }
    expect(misses).toBeGreaterThan(0);
    expect((await outcomes(d)).miss).toBe(misses);
    expect((await outcomes(d)).cached).toBeGreaterThan(0);
    expect(await gauge(d, 'stepCacheEvictions')).toBeGreaterThan(0);
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
  });

  it('keeps no state larger than the whole budget', async () => {
    const d = await denoiser({ stepCacheMib: 1000 / 2 ** 20 });
    const r = await d.denoise(request({ x: latents(1, 9), t: 500, y: [1], cache: INTERVAL(2), key: 'big', numSteps: 4 }));
    expect(r).toMatchObject({ cached: false, cacheHolder: '' });
    expect(await gauge(d, 'stepCacheEntries')).toBe(0);
  });
});

describe('step caching is deterministic', () => {
  it('gives the same bytes for the same calls on fresh denoisers', async () => {
    const run = async (): Promise<Buffer[]> => {
      const d = await denoiser();
      const a = await loop(d, { y: [3], seed: 11, steps: 9, cache: INTERVAL(3), key: 'det' });
      const b = await loop(d, { y: [3, 9], seed: 12, steps: 9, cache: ADAPTIVE(0.5, 2), key: 'det2' });
      return [...a.outs, ...b.outs].map(bytesOf);
    };
    const [first, second] = [await run(), await run()];
    expect(second.every((b, i) => b.equals(first[i]))).toBe(true);
  });
});

describe('without the step-cache graphs', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-step-cache-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it('serves cached-policy steps as full model.onnx steps (no graphs, caching off, or simulation)', async () => {
    const bare = join(tmp, 'no-cache-graphs');
    buildDitModel({
      weights: join(GOLDEN, 'dit/dit-tiny-p2/weights.safetensors'),
      out: bare,
      name: DIT_NAME,
      config: { num_heads: 4 },
      cacheGraphs: false,
    });
    const variants = [
      await denoiser({ modelDir: bare }),
      await denoiser({ stepCacheMib: 0 }),
      await denoiser({ simulate: { baseMs: 0, perRowMs: 0 } }),
    ];
    expect(variants.map((d) => d.stepCache.enabled)).toEqual([false, false, false]);
    expect((variants[0].stepCache as { reason: string }).reason).toMatch(/no step-cache graphs/);
    const plain = await variants[1].denoise(request({ x: latents(1, 30), t: 300, y: [2] }));
    for (const d of variants) {
      for (let i = 0; i < 3; i++) {
        const r = await d.denoise(request({ x: latents(1, 30), t: 300, y: [2], cache: INTERVAL(2), key: 'nc', stepIndex: i, numSteps: 3 }));
        expect(r).toMatchObject({ cached: false, cacheHolder: '', gflops: 2 * meta.gflops });
        if (!d.config.simulate) expect(bytesOf(outOf(r)).equals(bytesOf(outOf(plain)))).toBe(true);
      }
      // Still validated.
      await expect(d.denoise(request({ x: latents(1, 30), t: 300, y: [2], cache: INTERVAL(0), key: 'nc', numSteps: 3 }))).rejects.toThrow(
        /step_cache.interval/,
      );
    }
  });
});

describe('a dead step-cache worker', () => {
  it('makes the replica dead', async () => {
    const d = await denoiser();
    let died: Error | null = null;
    d.onDead((err) => {
      died = err;
    });
    expect(d.dead).toBe(false);
    const sessions = Reflect.get(d, 'cacheSessions') as CacheSessions;
    await (Reflect.get(sessions.skip, 'worker') as Worker).terminate();
    await expect.poll(() => d.dead).toBe(true);
    expect(died).toBeInstanceOf(Error);
  });
});

describe('the state store', () => {
  it('drops a state left idle past the TTL and counts it as an eviction', async () => {
    const metrics = denoiserMetrics();
    const store = new StepCacheStore(1 << 20, metrics, 'm', 50);
    const state = { signature: 's', residual: new Float32Array(16), r1: null, lastFull: 0, cachedInARow: 0 };
    expect(store.store('a', state)).toBe(true);
    expect(store.lookup('a', 's')).toBe(state);
    const read = async (g: 'stepCacheEntries' | 'stepCacheBytes' | 'stepCacheEvictions'): Promise<number> =>
      (await metrics[g].get()).values[0].value;
    expect(await read('stepCacheBytes')).toBe(64 + 2 + STATE_OVERHEAD_BYTES);
    await expect.poll(() => read('stepCacheEntries'), { timeout: 2_000 }).toBe(0);
    expect(await read('stepCacheBytes')).toBe(0);
    expect(await read('stepCacheEvictions')).toBe(1);
    expect(store.lookup('a', 's')).toBeUndefined();
    store.clear();
  });
});
