// The repeat cache's key and budget: requests that differ in anything their images' bytes depend
// on never share a key, equal ones always do; the cache stays within its bytes and counts what it
// does in the scheduler's metrics.
import { describe, expect, it } from 'vitest';
import {
  ENTRY_OVERHEAD_BYTES,
  RepeatCache,
  repeatKey,
  type CachedImage,
  type RepeatSettings,
} from '../../services/scheduler/repeat-cache.ts';
import { GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import type { DecoderInfo } from '../../shared/gen/ditpipe/v1/decoder.ts';
import type { DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { DType } from '../../shared/gen/ditpipe/v1/tensor.ts';
import { schedulerMetrics, type SchedulerMetrics } from '../../shared/metrics.ts';

const denoiser = (): DenoiserInfo => ({
  model: 'dit-tiny',
  config: {
    inputSize: 8,
    patchSize: 2,
    inChannels: 4,
    hiddenSize: 64,
    depth: 2,
    numHeads: 2,
    numClasses: 10,
    learnSigma: true,
    mlpRatio: 4,
  },
  classNames: ['zero', 'one'],
  params: 1000n,
  gflops: 0.01,
  vae: 'vae-tiny',
  maxBatchRows: 64,
  executionProvider: 'cpu',
  instanceId: 'a',
  sourceSha256: 'a'.repeat(64),
  weightDtype: 'float32',
  graphRevision: 2,
});

const decoderInfo = (): DecoderInfo => ({
  model: 'vae-tiny',
  latentChannels: 4,
  outChannels: 3,
  upsample: 4,
  scalingFactor: 0.18215,
  params: 500n,
  gflops: 0.02,
  maxBatch: 8,
  executionProvider: 'cpu',
  instanceId: 'b',
  outputCrop: undefined,
  sourceSha256: 'b'.repeat(64),
  weightDtype: 'float32',
  graphRevision: 2,
});

const settings = (): RepeatSettings => ({
  denoiser: denoiser(),
  decoder: { vae: 'vae-tiny', info: decoderInfo() },
  sampler: 'ddim',
  numSteps: 50,
  cfgScale: 4,
  guidance: GuidanceChannels.GUIDANCE_CHANNELS_THREE,
  eta: 0,
  seed: 1n,
  stepCache: 'none',
});

/** One change per value an image's bytes depend on. */
const variants: Array<[string, (s: RepeatSettings) => void]> = [
  ['model name', (s) => (s.denoiser.model = 'dit-other')],
  ['model weights', (s) => (s.denoiser.sourceSha256 = 'c'.repeat(64))],
  ['model built with float16 weights', (s) => (s.denoiser.weightDtype = 'float16')],
  ['model built by another graph revision', (s) => (s.denoiser.graphRevision = 1)],
  ['model config', (s) => (s.denoiser.config!.depth = 3)],
  ['model learn_sigma', (s) => (s.denoiser.config!.learnSigma = false)],
  ['raw latents instead of PNG', (s) => (s.decoder = null)],
  ['VAE name', (s) => (s.decoder!.vae = 'vae-other')],
  ['VAE weights', (s) => (s.decoder!.info.sourceSha256 = 'd'.repeat(64))],
  ['VAE built with float16 weights', (s) => (s.decoder!.info.weightDtype = 'float16')],
  ['VAE built by another graph revision', (s) => (s.decoder!.info.graphRevision = 1)],
  ['VAE scaling factor', (s) => (s.decoder!.info.scalingFactor = 0.13025)],
  ['VAE upsampling', (s) => (s.decoder!.info.upsample = 8)],
  ['VAE output channels', (s) => (s.decoder!.info.outChannels = 1)],
  ['VAE output crop', (s) => (s.decoder!.info.outputCrop = { top: 2, right: 2, bottom: 2, left: 2 })],
  ['VAE output crop, another edge', (s) => (s.decoder!.info.outputCrop = { top: 2, right: 2, bottom: 2, left: 0 })],
  ['sampler', (s) => (s.sampler = 'ddpm')],
  ['steps', (s) => (s.numSteps = 51)],
  ['cfg scale', (s) => (s.cfgScale = 4.000001)],
  ['guidance channels', (s) => (s.guidance = GuidanceChannels.GUIDANCE_CHANNELS_ALL)],
  ['eta', (s) => (s.eta = 0.5)],
  ['step caching', (s) => (s.stepCache = 'interval:2:w2')],
  ['step caching, another interval', (s) => (s.stepCache = 'interval:3:w2')],
  ['seed', (s) => (s.seed = 2n)],
  ['seed past 2^53', (s) => (s.seed = 2n ** 64n - 1n)],
];

describe('repeatKey', () => {
  it('is the same for equal settings, class and sample index, built afresh', () => {
    expect(repeatKey(settings(), 3, 0)).toBe(repeatKey(settings(), 3, 0));
    expect(repeatKey(settings(), 3, 0)).toMatch(/^[A-Za-z0-9_-]{43}$/);
  });

  it("ignores what does not change the bytes: the replica's identity, batch limits, execution provider, class names", () => {
    const other = settings();
    Object.assign(other.denoiser, { instanceId: 'z', maxBatchRows: 8, executionProvider: 'cuda', classNames: [], gflops: 1, params: 1n });
    Object.assign(other.decoder!.info, { instanceId: 'y', maxBatch: 1, executionProvider: 'cuda' });
    expect(repeatKey(other, 3, 0)).toBe(repeatKey(settings(), 3, 0));
  });

  it('differs when any value the bytes depend on differs, and no two variants collide', () => {
    const keys = new Map<string, string>([[repeatKey(settings(), 3, 0), 'base']]);
    const all: Array<[string, string]> = [
      ...variants.map(([name, change]): [string, string] => {
        const s = settings();
        change(s);
        return [name, repeatKey(s, 3, 0)];
      }),
      ['class', repeatKey(settings(), 4, 0)],
      ['sample index', repeatKey(settings(), 3, 1)],
      // Class and index are separate parts, not run together ("3", "10" vs "31", "0").
      ['class 31 index 0', repeatKey(settings(), 31, 0)],
      ['class 3 index 10', repeatKey(settings(), 3, 10)],
    ];
    for (const [name, key] of all) {
      expect(keys.get(key), `${name} collides`).toBeUndefined();
      keys.set(key, name);
    }
    expect(keys.size).toBe(all.length + 1);
  });
});

const png = (bytes: number, fill = 1): CachedImage => ({ png: new Uint8Array(bytes).fill(fill), width: 32, height: 32 });

const NAMES = {
  repeatCacheHits: 'ditpipe_repeat_cache_hits_total',
  repeatCacheMisses: 'ditpipe_repeat_cache_misses_total',
  repeatCacheEvictions: 'ditpipe_repeat_cache_evictions_total',
  repeatCacheBytes: 'ditpipe_repeat_cache_bytes',
  repeatCacheImages: 'ditpipe_repeat_cache_images',
  repeatCacheMaxBytes: 'ditpipe_repeat_cache_max_bytes',
};

async function value(m: SchedulerMetrics, name: keyof typeof NAMES): Promise<number> {
  const metric = m.registry.getSingleMetric(NAMES[name]);
  if (!metric) throw new Error(`no metric ${NAMES[name]}`);
  return (await metric.get()).values.reduce((s, v) => s + v.value, 0);
}

describe('RepeatCache', () => {
  it('finds what it stored, counts what it is told, and keeps its own copy of the bytes', async () => {
    const m = schedulerMetrics();
    const cache = new RepeatCache(1 << 20, m);
    const img = png(100, 7);
    cache.store('a', img);
    img.png.fill(0); // the caller's buffer is reused: the cache must not see it
    const [a, b] = cache.lookup(['a', 'b']);
    expect(a?.png).toEqual(new Uint8Array(100).fill(7));
    expect(b).toBeUndefined();
    expect(await value(m, 'repeatCacheHits')).toBe(0);
    cache.count(1, 1);
    expect(await value(m, 'repeatCacheHits')).toBe(1);
    expect(await value(m, 'repeatCacheMisses')).toBe(1);
    expect(await value(m, 'repeatCacheBytes')).toBe(100 + ENTRY_OVERHEAD_BYTES);
    expect(await value(m, 'repeatCacheImages')).toBe(1);
    expect(await value(m, 'repeatCacheMaxBytes')).toBe(1 << 20);
  });

  it('counts a raw latent by its bytes and copies it', async () => {
    const m = schedulerMetrics();
    const cache = new RepeatCache(1 << 20, m);
    const data = new Uint8Array(256).fill(3);
    cache.store('r', { png: new Uint8Array(0), latent: { shape: [4, 8, 8], dtype: DType.DTYPE_FLOAT32, data }, width: 8, height: 8 });
    data.fill(9);
    expect(cache.lookup(['r'])[0]?.latent?.data).toEqual(new Uint8Array(256).fill(3));
    expect(await value(m, 'repeatCacheBytes')).toBe(256 + ENTRY_OVERHEAD_BYTES);
  });

  it('stays within its budget, evicting the least recently used first, and keeps no image larger than the budget', async () => {
    const m = schedulerMetrics();
    const per = 1000 + ENTRY_OVERHEAD_BYTES;
    const cache = new RepeatCache(3 * per, m);
    for (const k of ['a', 'b', 'c']) cache.store(k, png(1000));
    expect(await value(m, 'repeatCacheEvictions')).toBe(0);
    cache.lookup(['a']); // a is now the most recently used
    cache.store('d', png(1000));
    expect(await value(m, 'repeatCacheEvictions')).toBe(1);
    expect(cache.lookup(['a', 'b', 'c', 'd']).map((x) => x !== undefined)).toEqual([true, false, true, true]);
    expect(await value(m, 'repeatCacheBytes')).toBe(3 * per);
    cache.store('huge', png(3 * per));
    expect(cache.lookup(['huge'])[0]).toBeUndefined();
    expect(await value(m, 'repeatCacheBytes')).toBeLessThanOrEqual(3 * per);
    expect(await value(m, 'repeatCacheImages')).toBe(3);
  });

  it('is off at budget 0: stores nothing, finds nothing', async () => {
    const m = schedulerMetrics();
    const cache = new RepeatCache(0, m);
    expect(cache.enabled).toBe(false);
    cache.store('a', png(10));
    expect(cache.lookup(['a'])).toEqual([undefined]);
    expect(await value(m, 'repeatCacheBytes')).toBe(0);
    expect(await value(m, 'repeatCacheMaxBytes')).toBe(0);
  });
});
