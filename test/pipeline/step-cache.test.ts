// Step caching in a deployed cluster (real nats-server with JetStream, every service its own
// process, the golden tiny DiT with its step-cache graphs): a cached request stays on the replica
// that holds its cache, is deterministic, costs less, and completes when that replica dies.
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { StepCacheOptions } from '../../shared/gen/ditpipe/v1/common.ts';
import { SamplerKind, type GenerateRequest } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { decodePng } from '../../shared/image/png.ts';
import { type Cluster, startCluster } from '../helpers/cluster.ts';
import { assertNoNatsServersRunning } from '../helpers/nats.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { liveServiceProcesses } from '../helpers/processes.ts';

const req = (over: Partial<GenerateRequest> = {}): Partial<GenerateRequest> => ({
  model: DIT_NAME,
  classLabels: [{ index: 3 }, { index: 7 }],
  sampler: SamplerKind.SAMPLER_KIND_DDIM,
  numSteps: 40,
  cfgScale: 4,
  seed: 11n,
  ...over,
});
const preset = (name: string): StepCacheOptions => StepCacheOptions.fromPartial({ preset: name });

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});
afterAll(() => {
  assertNoNatsServersRunning();
  expect(liveServiceProcesses()).toBe(0);
});

/** Mean absolute difference of two PNGs' pixels, 0..255. */
function pixelDiff(a: Uint8Array, b: Uint8Array): number {
  const pa = decodePng(a).data;
  const pb = decodePng(b).data;
  expect(pa.length).toBe(pb.length);
  let sum = 0;
  for (let i = 0; i < pa.length; i++) sum += Math.abs(pa[i] - pb[i]);
  return sum / pa.length;
}

describe('step caching in a cluster of processes', () => {
  it('a cached request stays on one replica, reuses its cache, costs less, and repeats its bytes', async () => {
    const c = (cluster = await startCluster());
    const plain = await c.api.generate(req(), { timeoutMs: 30_000 });
    const cached = await c.api.generate(req({ stepCache: preset('interval-2') }), { timeoutMs: 30_000 });
    const again = await c.api.generate(req({ stepCache: preset('interval-2') }), { timeoutMs: 30_000 });

    // Deterministic for a given replica history (nothing failed), and not the uncached bytes.
    cached.images.forEach((img, i) => expect(Buffer.from(again.images[i].png).equals(img.png)).toBe(true));
    const diffs = cached.images.map((img, i) => pixelDiff(img.png, plain.images[i].png));
    expect(Math.max(...diffs)).toBeGreaterThan(0);
    // Close to the uncached image (a cached step is an approximation, not noise): well under 1/4 of the range.
    expect(Math.max(...diffs)).toBeLessThan(64);
    expect(cached.samplingGflops).toBeGreaterThan(0);
    expect(cached.samplingGflops).toBeLessThan(0.8 * plain.samplingGflops);

    // Both cached requests: 40 steps each, warmup 2 and the last step full, every other step cached.
    const calls = (outcome: string, route: string): Promise<number> =>
      c.scrape(
        c.scheduler,
        'ditpipe_scheduler_step_cache_calls_total',
        new RegExp(`outcome="${outcome}".*route="${route}"|route="${route}".*outcome="${outcome}"`),
      );
    const cachedDirect = await calls('cached', 'direct');
    const cachedQueue = await calls('cached', 'queue');
    expect(cachedDirect + cachedQueue).toBe(2 * 19);
    // After its first step each request's steps went to the replica holding its cache.
    expect(cachedDirect).toBe(2 * 19);
    expect(await calls('full', 'queue')).toBe(2);
    // Each request's steps were all served by one replica: its cache was hit there every time.
    const perReplica = await Promise.all(
      c.denoisers.map((d) => c.scrape(d, 'ditpipe_denoiser_step_cache_steps_total', /outcome="cached"/)),
    );
    expect(perReplica.reduce((a, b) => a + b, 0)).toBe(2 * 19);
    const misses = await Promise.all(c.denoisers.map((d) => c.scrape(d, 'ditpipe_denoiser_step_cache_steps_total', /outcome="miss"/)));
    // A miss is a later step that found no state: none here (a first step has no state to find).
    expect(misses.reduce((a, b) => a + b, 0)).toBe(0);
  });

  it('a request whose cache replica is killed mid-run completes; the survivor computes the next step in full and caches again', async () => {
    const c = (cluster = await startCluster());
    // Long enough to kill its replica mid-run: 1000 steps of 8 guided samples.
    const labels = Array.from({ length: 8 }, (_, i) => ({ index: i }));
    const running = c.api.generate(req({ classLabels: labels, numSteps: 1000, stepCache: preset('interval-2') }), { timeoutMs: 120_000 });
    let holder = -1;
    const deadline = Date.now() + 60_000;
    while (holder < 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      const hits = await Promise.all(c.denoisers.map((d) => c.scrape(d, 'ditpipe_denoiser_step_cache_steps_total', /outcome="cached"/)));
      holder = hits.findIndex((h) => h >= 20);
    }
    expect(holder).toBeGreaterThanOrEqual(0);
    c.denoisers[holder].proc.kill('SIGKILL');
    const res = await running;
    expect(res.images).toHaveLength(8);
    const survivor = c.denoisers[1 - holder];
    // The survivor had no state for the request: one full step (a miss), then it cached again.
    expect(await c.scrape(survivor, 'ditpipe_denoiser_step_cache_steps_total', /outcome="miss"/)).toBeGreaterThanOrEqual(1);
    expect(await c.scrape(survivor, 'ditpipe_denoiser_step_cache_steps_total', /outcome="cached"/)).toBeGreaterThan(0);
    // The step in flight to the dead replica fell back to the queue.
    expect(await c.scrape(c.scheduler, 'ditpipe_work_direct_fallbacks_total')).toBeGreaterThanOrEqual(1);
  });
});
