// /metrics of all three services, scraped over HTTP during a run, is valid Prometheus exposition
// (`promtool check metrics`, Debian package prometheus) and carries the documented series.
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PreviewMethod } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { serveMetrics } from '../../shared/metrics.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

let p: Pipeline;
let server: Awaited<ReturnType<typeof serveMetrics>>;

beforeAll(async () => {
  p = await startPipeline({ transport: { kind: 'inproc' } });
  server = await serveMetrics([p.schedulerMetrics.registry, p.denoiserMetrics[0].registry, p.decoderMetrics[0].registry], 0, '127.0.0.1');
});
afterAll(async () => {
  await server?.close();
  await p?.stop();
});

describe('/metrics', () => {
  it('passes promtool and shows model versus sampling compute during a run', async () => {
    const run = p.api.generate({ model: DIT_NAME, classLabels: [{ index: 1 }, { index: 2 }], numSteps: 30, cfgScale: 4, seed: 5n });
    // Scrape while the request is in flight.
    await expect
      .poll(async () => (await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text()).includes('ditpipe_requests_in_flight 1'), {
        timeout: 10_000,
        interval: 20,
      })
      .toBe(true);
    await run;
    const res = await fetch(`http://127.0.0.1:${server.port}/metrics`);
    expect(res.headers.get('content-type')).toMatch(/text\/plain/);
    const text = await res.text();
    for (const name of [
      'ditpipe_model_gflops',
      'ditpipe_sampling_gflops_total',
      'ditpipe_image_tflops_bucket',
      'ditpipe_denoiser_step_seconds_bucket',
      'ditpipe_denoiser_forward_seconds_bucket',
      'ditpipe_denoiser_batch_rows_bucket',
      'ditpipe_denoiser_queue_wait_seconds_bucket',
      'ditpipe_decoder_decode_seconds_bucket',
      'ditpipe_decoder_batch_size_bucket',
      'ditpipe_request_seconds_bucket',
      'ditpipe_requests_in_flight',
      'ditpipe_samples_in_flight',
      'ditpipe_requests_rejected_total',
      'ditpipe_steps_dispatched_total',
      'ditpipe_work_discarded_answers_total',
      'ditpipe_work_resent_messages_total',
      'ditpipe_work_direct_calls_total',
      'ditpipe_work_direct_fallbacks_total',
      'ditpipe_denoiser_redelivered_steps_total',
      'ditpipe_denoiser_dropped_steps_total',
      'ditpipe_decoder_redelivered_decodes_total',
      'ditpipe_decoder_dropped_decodes_total',
      'ditpipe_denoiser_queued_rows',
      'ditpipe_scheduler_sampling_gflops_total',
      'ditpipe_scheduler_step_batch_rows_bucket',
      'ditpipe_scheduler_step_queue_wait_seconds_bucket',
      'ditpipe_scheduler_decodes_total{model="dit-tiny",purpose="final"}',
      'ditpipe_scheduler_decode_seconds_bucket',
    ]) {
      expect(text, name).toContain(name);
    }
    // The queue gauges are read from the work queues when scraped (both drained by now).
    expect(text).toMatch(/^ditpipe_queue_pending_messages\{queue="denoise",model="dit-tiny"\} 0$/m);
    expect(text).toMatch(/^ditpipe_queue_pending_messages\{queue="decode",model="vae-tiny"\} 0$/m);
    expect(text).toMatch(/^ditpipe_queue_taken_messages\{queue="denoise",model="dit-tiny"\} 0$/m);
    const check = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
    expect(check.error, 'promtool (Debian package prometheus) must be installed').toBeUndefined();
    expect(`${check.stdout}${check.stderr}`.trim()).toBe('');
    expect(check.status).toBe(0);
    expect((await fetch(`http://127.0.0.1:${server.port}/nope`)).status).toBe(404);
  });

  it('registers every metric the docs name, and each has samples after a run', async () => {
    // Names in code spans of README.md and docs/*.md (`ditpipe_x`, `ditpipe_x{label}`), less the
    // JetStream stream names (ditpipe_v1_…) and histogram series suffixes.
    const root = resolve(import.meta.dirname, '../..');
    const files = [
      'README.md',
      ...readdirSync(join(root, 'docs'))
        .filter((f) => f.endsWith('.md'))
        .map((f) => `docs/${f}`),
    ];
    const documented = new Map<string, string>();
    for (const f of files) {
      for (const m of readFileSync(join(root, f), 'utf8').matchAll(/`(ditpipe_[a-z0-9_]*[a-z0-9])(?:\{[^`]*\})?`/g)) {
        const name = m[1].replace(/_(bucket|count|sum)$/, '');
        if (!name.startsWith('ditpipe_v1_') && !documented.has(name)) documented.set(name, f);
      }
    }
    expect(documented.size).toBeGreaterThan(20);
    const registries = [p.schedulerMetrics.registry, p.denoiserMetrics[0].registry, p.decoderMetrics[0].registry];
    // The run above went through the pipeline; a stream with previews and a refused request add
    // the series only they touch.
    let events = 0;
    for await (const _ of p.api.generateStream({
      model: DIT_NAME,
      classLabels: [{ index: 3 }],
      numSteps: 4,
      seed: 6n,
      preview: { everySteps: 2, method: PreviewMethod.PREVIEW_METHOD_DECODER },
    }))
      events++;
    expect(events).toBeGreaterThan(2);
    await expect(p.api.generate({ model: DIT_NAME, classLabels: [{ index: 3 }], numSteps: 5000, seed: 6n })).rejects.toThrow(/steps/i);
    const unregistered: string[] = [];
    const empty: string[] = [];
    for (const [name, file] of documented) {
      const metric = registries.map((r) => r.getSingleMetric(name)).find((m) => m !== undefined);
      if (!metric) unregistered.push(`${name} (${file})`);
      else if ((await metric.get()).values.length === 0) empty.push(`${name} (${file})`);
    }
    expect(unregistered).toEqual([]);
    expect(empty).toEqual([]);
  });
});
