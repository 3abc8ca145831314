// The pipeline test suite, run once per transport (pipeline-inproc.test.ts, pipeline-nats.test.ts):
// real services, real onnxruntime on the golden tiny DiT and VAE, real gRPC on port 0.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Code, type InvalidArgumentError, type ResourceExhaustedError } from '../../shared/errors.ts';
import { decodePng } from '../../shared/image/png.ts';
import { GuidanceChannels, StepCacheOptions } from '../../shared/gen/ditpipe/v1/common.ts';
import {
  OutputFormat,
  SamplerKind,
  type CachePolicy,
  type GenerateEvent,
  type GenerateRequest,
} from '../../shared/gen/ditpipe/v1/sampler.ts';
import { CLASS_NAMES, DIT_NAME } from '../helpers/models.ts';
import { repeatCacheSuite } from './repeat-cache.ts';
import { startPipeline, type Pipeline, type TransportKind } from '../helpers/pipeline.ts';
import { failureOf } from '../helpers/failure.ts';

const base = (over: Partial<GenerateRequest> = {}): Partial<GenerateRequest> => ({
  model: DIT_NAME,
  classLabels: [{ index: 3 }, { name: 'Seven' }],
  numSteps: 6,
  cfgScale: 4,
  seed: 1234n,
  ...over,
});

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a).equals(b);

async function counter(registry: { getSingleMetricAsString(name: string): Promise<string> }, name: string): Promise<number> {
  const text = await registry.getSingleMetricAsString(name);
  return text
    .split('\n')
    .filter((l) => l && !l.startsWith('#'))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}

export function pipelineSuite(label: string, transport: () => TransportKind): void {
  describe(`pipeline over ${label}`, () => {
    let p: Pipeline;
    beforeAll(async () => {
      p = await startPipeline({ transport: transport(), scheduler: { maxSamplesInFlight: 24 }, denoiser: { maxBatchRows: 32 } });
    });
    afterAll(async () => {
      await p?.stop();
    });

    it('generates labelled PNGs end to end through gRPC', async () => {
      const res = await p.api.generate(base(), { timeoutMs: 60_000 });
      expect(res.model).toBe(DIT_NAME);
      expect(res.seed).toBe(1234n);
      expect(res.numSteps).toBe(6);
      expect(res.images.map((i) => [i.classLabel, i.className, i.sampleIndex])).toEqual([
        [3, 'three', 0],
        [7, 'seven', 1],
      ]);
      for (const img of res.images) {
        const px = decodePng(img.png);
        expect([px.width, px.height, px.channels]).toEqual([32, 32, 3]);
        expect(new Set(px.data).size).toBeGreaterThan(10); // an image, not a constant
      }
      expect(same(res.images[0].png, res.images[1].png)).toBe(false);
      expect(res.timings!.totalMs).toBeGreaterThanOrEqual(res.timings!.denoiseMs);
      expect(res.timings!.decodeMs).toBeGreaterThan(0);
    });

    it('returns raw latents when asked', async () => {
      const res = await p.api.generate(base({ outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT, classLabels: [{ index: 1 }] }));
      expect(res.images[0].png.length).toBe(0);
      expect(res.images[0].latent?.shape).toEqual([4, 8, 8]);
      expect(res.timings!.decodeMs).toBe(0);
    });

    it('gives byte-identical images for a seed, alone or among 8 concurrent requests', async () => {
      const alone = await p.api.generate(base());
      const crowd = await Promise.all(
        Array.from({ length: 8 }, (_, i) =>
          p.api.generate(base({ seed: BigInt(1234 + (i % 3 === 0 ? 0 : i)), sampler: SamplerKind.SAMPLER_KIND_DDPM })),
        ),
      );
      for (const [i, r] of crowd.entries()) {
        if (i % 3 === 0) r.images.forEach((img, k) => expect(same(img.png, alone.images[k].png)).toBe(true));
        else expect(same(r.images[0].png, alone.images[0].png)).toBe(false);
      }
      // The crowd really shared forward passes.
      const rows = await p.denoiserMetrics[0].registry.getSingleMetricAsString('ditpipe_denoiser_batch_rows');
      expect(rows).toMatch(/ditpipe_denoiser_batch_rows_bucket\{le="8",model="dit-tiny"\} \d+/);
      const sum = await counter(p.denoiserMetrics[0].registry, 'ditpipe_denoiser_forward_rows_total');
      const passes = Number(/ditpipe_denoiser_batch_rows_count\{model="dit-tiny"\} (\d+)/.exec(rows)?.[1]);
      expect(sum / passes).toBeGreaterThan(4); // mean rows per pass above one request's 4
    });

    it('streams accepted, progress per step, one event per image, then completed', async () => {
      const events: GenerateEvent[] = [];
      for await (const ev of p.api.generateStream(base({ sampler: SamplerKind.SAMPLER_KIND_DDIM, numSteps: 5 }))) events.push(ev);
      const kinds = events.map((e) => Object.keys(e).find((k) => e[k as keyof GenerateEvent] !== undefined));
      expect(kinds).toEqual(['accepted', 'progress', 'progress', 'progress', 'progress', 'progress', 'image', 'image', 'completed']);
      expect(events.slice(1, 6).map((e) => e.progress?.step)).toEqual([1, 2, 3, 4, 5]);
      expect(events[0].accepted?.numImages).toBe(2);
      expect(
        events
          .filter((e) => e.image)
          .map((e) => e.image!.image!.sampleIndex)
          .sort(),
      ).toEqual([0, 1]);
    });

    it('stops dispatching steps when the client cancels mid-stream, and frees the slot', async () => {
      const ac = new AbortController();
      const dispatched = (): Promise<number> => counter(p.schedulerMetrics.registry, 'ditpipe_steps_dispatched_total');
      const before = await dispatched();
      let progress = 0;
      const stream = p.api.generateStream(base({ numSteps: 400, cfgScale: 1 }), { signal: ac.signal });
      await expect(
        (async () => {
          for await (const ev of stream) {
            if (ev.progress && ++progress === 3) ac.abort();
          }
        })(),
      ).rejects.toMatchObject({ code: Code.CANCELLED });
      // The loop notices the cancellation at its next step boundary.
      await expect
        .poll(
          async () =>
            (await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_samples_in_flight')).includes(
              'ditpipe_samples_in_flight 0',
            ),
          { timeout: 10_000 },
        )
        .toBe(true);
      const after = await dispatched();
      await new Promise((r) => setTimeout(r, 300));
      expect(await dispatched()).toBe(after); // nothing more is sent
      expect(after - before).toBeLessThan(20);
      const outcome = await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_request_seconds');
      expect(outcome).toMatch(/outcome="CANCELLED"/);
    });

    it('stops dispatching steps when the client deadline passes', async () => {
      const dispatched = (): Promise<number> => counter(p.schedulerMetrics.registry, 'ditpipe_steps_dispatched_total');
      const before = await dispatched();
      const err = await failureOf(p.api.generate(base({ numSteps: 1000, cfgScale: 1 }), { timeoutMs: 300 }));
      expect(err.code).toBe(Code.DEADLINE_EXCEEDED);
      await expect
        .poll(
          async () =>
            (await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_samples_in_flight')).includes(
              'ditpipe_samples_in_flight 0',
            ),
          { timeout: 10_000 },
        )
        .toBe(true);
      const after = await dispatched();
      await new Promise((r) => setTimeout(r, 300));
      expect(await dispatched()).toBe(after);
      expect(after - before).toBeLessThan(1000);
      expect(await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_request_seconds')).toMatch(/outcome="DEADLINE_EXCEEDED"/);
    });

    const bad: Array<[string, Partial<GenerateRequest>, string]> = [
      ['no model', { model: '' }, 'model'],
      ['no labels', { classLabels: [] }, 'class_labels'],
      ['label out of range', { classLabels: [{ index: 10 }] }, 'class_labels[0]'],
      ['negative label', { classLabels: [{ index: 1 }, { index: -1 }] }, 'class_labels[1]'],
      ['unknown class name', { classLabels: [{ name: 'Unicorn' }] }, 'class_labels[0]'],
      ['empty label', { classLabels: [{}] }, 'class_labels[0]'],
      ['zero steps', { numSteps: 0 }, 'num_steps'],
      ['too many steps', { numSteps: 1001 }, 'num_steps'],
      ['unknown sampler', { sampler: 9 as SamplerKind }, 'sampler'],
      ['cfg below 1', { cfgScale: 0.5 }, 'cfg_scale'],
      ['cfg NaN', { cfgScale: Number.NaN }, 'cfg_scale'],
      ['cfg infinite', { cfgScale: Number.POSITIVE_INFINITY }, 'cfg_scale'],
      ['unknown guidance channels', { guidanceChannels: 7 as GuidanceChannels }, 'guidance_channels'],
      ['eta out of range', { sampler: SamplerKind.SAMPLER_KIND_DDIM, eta: 2 }, 'eta'],
      ['eta for DDPM', { eta: 0.5 }, 'eta'],
      ['unknown output format', { outputFormat: 5 as OutputFormat }, 'output_format'],
      ['unknown cache policy', { cachePolicy: 7 as CachePolicy }, 'cache_policy'],
      ['too many images', { classLabels: Array.from({ length: 65 }, () => ({ index: 1 })) }, 'class_labels'],
    ];
    it.each(bad)('rejects %s with INVALID_ARGUMENT naming the field', async (_name, over, field) => {
      const err = await failureOf(p.api.generate(base(over)));
      expect(err.code).toBe(Code.INVALID_ARGUMENT);
      expect(err.message).toContain(field);
      expect((err as InvalidArgumentError).field).toBe(field);
    });

    it('answers NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED with a retry hint past admission, and keeps serving', async () => {
      const nf = await failureOf(p.api.generate(base({ model: 'nope' })));
      expect(nf.code).toBe(Code.NOT_FOUND);
      expect(nf.message).toContain('nope');
      // More images than can ever be in flight: retrying cannot help, so it is not RESOURCE_EXHAUSTED.
      const big = await failureOf(p.api.generate(base({ classLabels: Array.from({ length: 25 }, () => ({ index: 2 })) })));
      expect(big.code).toBe(Code.INVALID_ARGUMENT);
      expect((big as InvalidArgumentError).field).toBe('class_labels');
      expect(big.message).toMatch(/at most 24 at once/);
      // Fill the admission budget with a slow request, then overflow it.
      const slow = p.api.generate(base({ classLabels: Array.from({ length: 20 }, () => ({ index: 2 })), numSteps: 40, cfgScale: 1 }));
      await expect
        .poll(() => p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_samples_in_flight'), { timeout: 10_000 })
        .toContain('ditpipe_samples_in_flight 20');
      const over = await failureOf(p.api.generate(base({ classLabels: Array.from({ length: 5 }, () => ({ index: 2 })) })));
      expect(over.code).toBe(Code.RESOURCE_EXHAUSTED);
      expect(over.message).toMatch(/capacity/);
      // google.rpc.RetryInfo in grpc-status-details-bin, read back by the client.
      const hint = (over as ResourceExhaustedError).retryAfterMs;
      expect(hint).toBeGreaterThanOrEqual(100);
      expect(over.message).toContain(`retry in ${hint} ms`);
      expect((await slow).images).toHaveLength(20);
      expect((await p.api.generate(base())).images).toHaveLength(2);
      const rejected = await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_requests_rejected_total');
      expect(rejected).toMatch(/reason="resource_exhausted"\} [1-9]/);
      expect(rejected).toMatch(/reason="invalid_argument"\} [1-9]/);
    });

    it("splits a step larger than a replica's row budget into calls that fit, with the same images", async () => {
      const labels = Array.from({ length: 20 }, (_, i) => ({ index: i % 10 }));
      const res = await p.api.generate(base({ classLabels: labels, numSteps: 3 }));
      expect(res.images).toHaveLength(20);
      const rows = await p.denoiserMetrics[0].registry.getSingleMetricAsString('ditpipe_denoiser_batch_rows');
      // 20 samples × 2 guidance rows = 40 > this denoiser's budget of 32: never one pass above 32.
      const le32 = Number(/batch_rows_bucket\{le="32",model="dit-tiny"\} (\d+)/.exec(rows)?.[1]);
      const all = Number(/batch_rows_count\{model="dit-tiny"\} (\d+)/.exec(rows)?.[1]);
      expect(all).toBeGreaterThan(0);
      expect(le32).toBe(all);
      // Image 3 (label 3) is the same as when asked alone with the same seed and sample index 3.
      const alone = await p.api.generate(base({ classLabels: labels.slice(0, 4), numSteps: 3 }));
      expect(same(res.images[3].png, alone.images[3].png)).toBe(true);
    });

    it('counts sampling compute as steps × rows × Gflops', async () => {
      const registry = p.denoiserMetrics[0].registry;
      const gflops = await counter(registry, 'ditpipe_model_gflops');
      expect(gflops).toBeGreaterThan(0);
      const before = await counter(registry, 'ditpipe_sampling_gflops_total');
      await p.api.generate(base({ numSteps: 7, cfgScale: 4, classLabels: [{ index: 1 }, { index: 2 }, { index: 3 }] }));
      await p.api.generate(base({ numSteps: 5, cfgScale: 1, classLabels: [{ index: 4 }] }));
      const spent = (await counter(registry, 'ditpipe_sampling_gflops_total')) - before;
      expect(spent).toBeCloseTo((7 * 3 * 2 + 5 * 1 * 1) * gflops, 6);
    });

    it('lists the served model with classes, Gflops and replicas', async () => {
      const models = await p.api.listModels();
      expect(models).toHaveLength(1);
      const m = models[0];
      expect(m.name).toBe(DIT_NAME);
      expect(m.classNames).toEqual(CLASS_NAMES);
      expect(m.numClasses).toBe(10);
      expect(m.replicas).toBe(1);
      expect(m.decoderReplicas).toBe(1);
      expect(m.imageSize).toBe(32);
      expect(m.imageChannels).toBe(3);
      expect(m.gflops).toBeGreaterThan(0);
      expect(Number(m.params)).toBe(182176);
    });

    it('samples a repeat again with the repeat cache off (repeatCacheMiB 0)', async () => {
      const registry = p.schedulerMetrics.registry;
      expect(await counter(registry, 'ditpipe_repeat_cache_max_bytes')).toBe(0);
      const first = await p.api.generate(base({ seed: 8080n }));
      const dispatched = await counter(registry, 'ditpipe_steps_dispatched_total');
      const again = await p.api.generate(base({ seed: 8080n }));
      expect(again.images.map((i) => i.cached)).toEqual([false, false]);
      again.images.forEach((img, k) => expect(same(img.png, first.images[k].png)).toBe(true));
      expect((await counter(registry, 'ditpipe_steps_dispatched_total')) - dispatched).toBe(6);
      for (const name of ['ditpipe_repeat_cache_hits_total', 'ditpipe_repeat_cache_misses_total', 'ditpipe_repeat_cache_bytes']) {
        expect(await counter(registry, name), name).toBe(0);
      }
    });

    it('keeps guidance channel settings apart: "all" changes the image', async () => {
      const three = await p.api.generate(base({ classLabels: [{ index: 5 }] }));
      const all = await p.api.generate(base({ classLabels: [{ index: 5 }], guidanceChannels: GuidanceChannels.GUIDANCE_CHANNELS_ALL }));
      expect(same(three.images[0].png, all.images[0].png)).toBe(false);
    });
  });

  repeatCacheSuite(label, transport);

  describe(`two denoiser replicas over ${label}`, () => {
    it('give the same bytes as one replica, and both take work', async () => {
      const one = await startPipeline({ transport: transport() });
      const ref = await one.api.generate(base());
      await one.stop();
      const two = await startPipeline({ transport: transport(), denoisers: 2, denoiser: { maxWaitMs: 0 } });
      try {
        const runs = await Promise.all(Array.from({ length: 6 }, () => two.api.generate(base())));
        for (const r of runs) r.images.forEach((img, k) => expect(same(img.png, ref.images[k].png)).toBe(true));
        for (const m of two.denoiserMetrics) expect(await counter(m.registry, 'ditpipe_denoiser_forward_rows_total')).toBeGreaterThan(0);
        expect((await two.api.listModels())[0].replicas).toBe(2);
      } finally {
        await two.stop();
      }
    });

    it('keep a step-cached request on the replica holding its cache: every later step goes there directly and reuses it', async () => {
      const two = await startPipeline({ transport: transport(), denoisers: 2, denoiser: { maxWaitMs: 0 } });
      try {
        const req = base({
          numSteps: 12,
          sampler: SamplerKind.SAMPLER_KIND_DDIM,
          stepCache: StepCacheOptions.fromPartial({ preset: 'interval-2' }),
        });
        const [a, b] = await Promise.all([two.api.generate(req), two.api.generate(req)]);
        a.images.forEach((img, k) => expect(same(img.png, b.images[k].png)).toBe(true));
        const plain = await two.api.generate(base({ numSteps: 12, sampler: SamplerKind.SAMPLER_KIND_DDIM }));
        expect(a.samplingGflops).toBeLessThan(plain.samplingGflops);
        const calls = await two.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_scheduler_step_cache_calls_total');
        const n = (outcome: string, route: string): number =>
          Number(new RegExp(`outcome="${outcome}",route="${route}"\\} (\\d+)`).exec(calls)?.[1] ?? 0);
        // 12 steps, warmup 2, last full: steps 2, 4, …, 10 cached (5 per request); only step 0 goes through the queue.
        expect([n('cached', 'direct'), n('cached', 'queue'), n('full', 'queue'), n('full', 'direct')]).toEqual([10, 0, 2, 12]);
        expect(await counter(two.schedulerMetrics.registry, 'ditpipe_work_direct_fallbacks_total')).toBe(0);
      } finally {
        await two.stop();
      }
    });
  });
}
