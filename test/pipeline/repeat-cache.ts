// The repeat cache through the real pipeline (run per transport by suite.ts): a repeat is answered
// from the cache with the same bytes and no denoise step or decode, a partial repeat samples only
// the images it lacks (and gets the bytes a whole run gives), the byte budget holds, a cancelled
// request stores nothing, and a request can opt out.
import type { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Code } from '../../shared/errors.ts';
import { GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import {
  CachePolicy,
  OutputFormat,
  PreviewMethod,
  SamplerKind,
  type GenerateEvent,
  type GenerateRequest,
  type GenerateResponse,
} from '../../shared/gen/ditpipe/v1/sampler.ts';
import { failureOf } from '../helpers/failure.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline, type TransportKind } from '../helpers/pipeline.ts';

/** Budget of the cache under test: room for a handful of the tiny model's 32×32 PNGs (about 3 KiB each). */
const BUDGET_MIB = 24 / 1024;
const BUDGET_BYTES = Math.round(BUDGET_MIB * 2 ** 20);

const req = (over: Partial<GenerateRequest> = {}): Partial<GenerateRequest> => ({
  model: DIT_NAME,
  classLabels: [{ index: 3 }, { index: 7 }],
  sampler: SamplerKind.SAMPLER_KIND_DDIM,
  numSteps: 5,
  cfgScale: 4,
  seed: 4242n,
  ...over,
});

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a).equals(b);

/** Sum of a metric's series (counters and gauges) whose labels include `labels`. */
async function value(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const metric = registry.getSingleMetric(name);
  if (!metric) throw new Error(`no metric ${name}`);
  return (await metric.get()).values
    .filter((v) => Object.entries(labels).every(([k, l]) => v.labels[k] === l))
    .reduce((s, v) => s + v.value, 0);
}

export function repeatCacheSuite(label: string, transport: () => TransportKind): void {
  describe(`repeat cache over ${label}`, () => {
    let p: Pipeline;
    /** What a request cost the pools and the cache, counted from the metrics. */
    const work = async (): Promise<Record<string, number>> => ({
      dispatched: await value(p.schedulerMetrics.registry, 'ditpipe_steps_dispatched_total'),
      steps: await value(p.denoiserMetrics[0].registry, 'ditpipe_denoiser_steps_total'),
      rows: await value(p.denoiserMetrics[0].registry, 'ditpipe_denoiser_forward_rows_total'),
      decoded: await value(p.decoderMetrics[0].registry, 'ditpipe_decoder_images_total'),
      finals: await value(p.schedulerMetrics.registry, 'ditpipe_scheduler_decodes_total', { purpose: 'final' }),
      hits: await value(p.schedulerMetrics.registry, 'ditpipe_repeat_cache_hits_total'),
      misses: await value(p.schedulerMetrics.registry, 'ditpipe_repeat_cache_misses_total'),
    });
    const cost = async (run: () => Promise<GenerateResponse>): Promise<{ res: GenerateResponse; d: Record<string, number> }> => {
      const before = await work();
      const res = await run();
      const after = await work();
      return { res, d: Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - before[k]])) };
    };

    beforeAll(async () => {
      p = await startPipeline({ transport: transport(), scheduler: { repeatCacheMiB: BUDGET_MIB, maxSamplesInFlight: 4 }, http: {} });
    });
    afterAll(async () => {
      await p?.stop();
    });

    it('answers a repeat from the cache: the same bytes, marked cached, no denoise step or decode', async () => {
      const first = await cost(() => p.api.generate(req()));
      expect(first.res.images.map((i) => i.cached)).toEqual([false, false]);
      expect(first.d).toMatchObject({ hits: 0, misses: 2, decoded: 2 });
      expect(first.d.steps).toBeGreaterThanOrEqual(5);
      const again = await cost(() => p.api.generate(req()));
      expect(again.res.images.map((i) => i.cached)).toEqual([true, true]);
      again.res.images.forEach((img, k) => expect(same(img.png, first.res.images[k].png), `image ${k}`).toBe(true));
      expect(again.res.images.map((i) => [i.classLabel, i.className, i.sampleIndex, i.seed, i.width, i.height])).toEqual(
        first.res.images.map((i) => [i.classLabel, i.className, i.sampleIndex, i.seed, i.width, i.height]),
      );
      expect(again.d).toEqual({ dispatched: 0, steps: 0, rows: 0, decoded: 0, finals: 0, hits: 2, misses: 0 });
      expect(again.res.timings!.denoiseMs).toBe(0);
      expect(again.res.timings!.decodeMs).toBe(0);
      // The class by name is the same image as by index.
      const byName = await p.api.generate(req({ classLabels: [{ name: 'three' }, { index: 7 }] }));
      expect(byName.images.map((i) => i.cached)).toEqual([true, true]);
    });

    it('streams a whole repeat as accepted (all cached), every progress event, the cached images, completed; no previews', async () => {
      await p.api.generate(req({ seed: 77n }));
      const before = await work();
      const events: GenerateEvent[] = [];
      const preview = { everySteps: 1, method: PreviewMethod.PREVIEW_METHOD_DECODER };
      for await (const e of p.api.generateStream(req({ seed: 77n, preview }))) events.push(e);
      const kinds = events.map((e) => Object.keys(e).find((k) => e[k as keyof GenerateEvent] !== undefined));
      expect(kinds).toEqual(['accepted', 'progress', 'progress', 'progress', 'progress', 'progress', 'image', 'image', 'completed']);
      expect(events[0].accepted).toMatchObject({ numImages: 2, cachedImages: 2, numSteps: 5 });
      expect(events.filter((e) => e.progress).map((e) => e.progress!.step)).toEqual([1, 2, 3, 4, 5]);
      expect(events.filter((e) => e.image).every((e) => e.image!.image!.cached)).toBe(true);
      expect((await work()).steps - before.steps).toBe(0);
    });

    it('samples only the images a partial repeat lacks, and they are the bytes a whole run gives', async () => {
      const seed = 9001n;
      const a = await p.api.generate(req({ seed, classLabels: [{ index: 3 }, { index: 7 }] }));
      // Image 0 repeats a's image 0; image 1 is a new class at index 1; image 2 is new.
      const b = req({ seed, classLabels: [{ index: 3 }, { index: 5 }, { index: 1 }] });
      const events: GenerateEvent[] = [];
      const before = await work();
      for await (const e of p.api.generateStream({ ...b, preview: { everySteps: 2, method: PreviewMethod.PREVIEW_METHOD_PROJECTION } }))
        events.push(e);
      const after = await work();
      expect(events[0].accepted).toMatchObject({ numImages: 3, cachedImages: 1 });
      const images = events.filter((e) => e.image).map((e) => e.image!.image!);
      const byIndex = new Map(images.map((i) => [i.sampleIndex, i]));
      expect([0, 1, 2].map((i) => byIndex.get(i)?.cached)).toEqual([true, false, false]);
      expect(same(byIndex.get(0)!.png, a.images[0].png)).toBe(true);
      // Only the two missing samples went through the model: 5 steps × 2 samples × 2 guidance rows.
      expect(after.rows - before.rows).toBe(5 * 2 * 2);
      expect(after.finals - before.finals).toBe(2);
      // Previews are of the sampled images only, under their own sample indices.
      const previewed = new Set(events.filter((e) => e.preview).map((e) => e.preview!.sampleIndex));
      expect(previewed.size).toBeGreaterThan(0);
      expect([...previewed].every((i) => i === 1 || i === 2)).toBe(true);
      // The sampled images carry the noise of their own sample index: as in a run without the cache.
      const whole = await p.api.generate({ ...b, cachePolicy: CachePolicy.CACHE_POLICY_BYPASS });
      expect(whole.images.map((i) => i.cached)).toEqual([false, false, false]);
      whole.images.forEach((img, k) => expect(same(img.png, byIndex.get(k)!.png), `image ${k}`).toBe(true));
    });

    it('misses for another seed, steps, sampler, guidance or output format', async () => {
      await p.api.generate(req({ seed: 5n }));
      for (const over of [
        { seed: 6n },
        { numSteps: 4 },
        { sampler: SamplerKind.SAMPLER_KIND_DPM_SOLVER_PP },
        { cfgScale: 3 },
        { guidanceChannels: GuidanceChannels.GUIDANCE_CHANNELS_ALL },
        { eta: 0.5 },
        { outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT },
      ] satisfies Array<Partial<GenerateRequest>>) {
        const { res, d } = await cost(() => p.api.generate(req({ seed: 5n, ...over })));
        expect(
          res.images.map((i) => i.cached),
          JSON.stringify(over, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v)),
        ).toEqual([false, false]);
        expect(d.steps).toBeGreaterThan(0);
      }
    });

    it('answers a whole repeat while the scheduler is full, and counts no lookup of a refused request', async () => {
      const repeat = req({ seed: 600n });
      await p.api.generate(repeat);
      const ac = new AbortController();
      const filler = req({ seed: 601n, classLabels: Array.from({ length: 4 }, () => ({ index: 1 })), numSteps: 1000, cfgScale: 1 });
      const slow = failureOf(p.api.generate({ ...filler, cachePolicy: CachePolicy.CACHE_POLICY_BYPASS }, { signal: ac.signal }));
      try {
        await expect.poll(() => value(p.schedulerMetrics.registry, 'ditpipe_samples_in_flight'), { timeout: 10_000 }).toBe(4);
        const before = await work();
        const hit = await p.api.generate(repeat);
        expect(hit.images.map((i) => i.cached)).toEqual([true, true]);
        // Two of three images cached, one to sample: no room for it.
        const refused = await failureOf(p.api.generate(req({ seed: 600n, classLabels: [{ index: 3 }, { index: 7 }, { index: 1 }] })));
        expect(refused.code).toBe(Code.RESOURCE_EXHAUSTED);
        const after = await work();
        expect([after.hits - before.hits, after.misses - before.misses]).toEqual([2, 0]);
      } finally {
        ac.abort();
      }
      expect((await slow).code).toBe(Code.CANCELLED);
      // The scheduler frees the slots at its next step.
      await expect.poll(() => value(p.schedulerMetrics.registry, 'ditpipe_samples_in_flight'), { timeout: 10_000 }).toBe(0);
    });

    it('keeps raw latents too, byte for byte', async () => {
      const raw = req({ seed: 31n, outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT });
      const first = await p.api.generate(raw);
      const { res, d } = await cost(() => p.api.generate(raw));
      expect(res.images.map((i) => i.cached)).toEqual([true, true]);
      res.images.forEach((img, k) => expect(same(img.latent!.data, first.images[k].latent!.data)).toBe(true));
      expect(d.steps).toBe(0);
    });

    it('stores nothing of a cancelled request, and nothing of one that opts out', async () => {
      const ac = new AbortController();
      const slow = req({ seed: 123n, numSteps: 60 });
      await expect(
        (async () => {
          for await (const e of p.api.generateStream(slow, { signal: ac.signal })) if (e.progress?.step === 3) ac.abort();
        })(),
      ).rejects.toMatchObject({ code: Code.CANCELLED });
      const after = await p.api.generate(slow);
      expect(after.images.map((i) => i.cached)).toEqual([false, false]);

      const opted = req({ seed: 124n, cachePolicy: CachePolicy.CACHE_POLICY_BYPASS });
      const { d } = await cost(() => p.api.generate(opted));
      expect(d).toMatchObject({ hits: 0, misses: 0 });
      expect((await p.api.generate({ ...opted, cachePolicy: CachePolicy.CACHE_POLICY_USE })).images.map((i) => i.cached)).toEqual([
        false,
        false,
      ]);
      // And a repeat that opts out is sampled again, though the cache holds it.
      const bypass = await cost(() => p.api.generate(opted));
      expect(bypass.res.images.map((i) => i.cached)).toEqual([false, false]);
      expect(bypass.d.steps).toBeGreaterThan(0);
    });

    it('marks cached images over HTTP and takes ditpipe.cache "bypass"', async () => {
      const post = async (ditpipe: Record<string, unknown>): Promise<Array<{ cached: boolean }>> => {
        const res = await fetch(`${p.http!.url}/v1/images/generations`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: DIT_NAME, prompt: 'four', n: 2, ditpipe: { steps: 3, seed: 55, ...ditpipe } }),
        });
        expect(res.status).toBe(200);
        return ((await res.json()) as { ditpipe: { images: Array<{ cached: boolean }> } }).ditpipe.images;
      };
      expect((await post({})).map((i) => i.cached)).toEqual([false, false]);
      expect((await post({})).map((i) => i.cached)).toEqual([true, true]);
      expect((await post({ cache: 'bypass' })).map((i) => i.cached)).toEqual([false, false]);
    });

    it('keeps within its byte budget, evicting the least recently used images', async () => {
      const registry = p.schedulerMetrics.registry;
      expect(await value(registry, 'ditpipe_repeat_cache_max_bytes')).toBe(BUDGET_BYTES);
      const evicted = await value(registry, 'ditpipe_repeat_cache_evictions_total');
      const oldest = req({ seed: 1000n });
      await p.api.generate(oldest);
      for (let s = 1001n; s < 1008n; s++) {
        await p.api.generate(req({ seed: s }));
        const bytes = await value(registry, 'ditpipe_repeat_cache_bytes');
        expect(bytes).toBeGreaterThan(0);
        expect(bytes).toBeLessThanOrEqual(BUDGET_BYTES);
      }
      // 16 images of about 3 KiB do not fit in 24 KiB: the first ones went.
      expect((await value(registry, 'ditpipe_repeat_cache_evictions_total')) - evicted).toBeGreaterThan(0);
      const held = await value(registry, 'ditpipe_repeat_cache_images');
      expect(held).toBeGreaterThan(1);
      expect(held).toBeLessThan(16);
      expect((await p.api.generate(oldest)).images.map((i) => i.cached)).toEqual([false, false]);
      // The newest are still there.
      expect((await p.api.generate(req({ seed: 1007n }))).images.map((i) => i.cached)).toEqual([true, true]);
    });
  });
}
