// Prometheus metrics of all three services, defined in one place so names and help texts stay
// consistent. Each service instance gets its own registry (tests run several in one process);
// `npm start` merges them on one /metrics endpoint. No default process metrics: prom-client's
// names ending in `_total` for gauges fail `promtool check metrics`.
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { DISCARD_REASONS, DROP_REASONS, FALLBACK_REASONS } from './transport/types.ts';

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
const ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

export function denoiserMetrics(registry = new Registry()) {
  const r = [registry];
  return {
    registry,
    modelGflops: new Gauge({
      name: 'ditpipe_model_gflops',
      help: 'Multiply-accumulates per forward pass at batch 1, in units of 1e9 (the DiT paper\'s "Gflops").',
      labelNames: ['model'],
      registers: r,
    }),
    samplingGflops: new Counter({
      name: 'ditpipe_sampling_gflops_total',
      help: "Sampling compute spent: forward rows (guidance rows included) times the model's Gflops per row.",
      labelNames: ['model'],
      registers: r,
    }),
    forwardRows: new Counter({
      name: 'ditpipe_denoiser_forward_rows_total',
      help: 'Rows run through the model (guidance rows included).',
      labelNames: ['model'],
      registers: r,
    }),
    steps: new Counter({
      name: 'ditpipe_denoiser_steps_total',
      help: 'Denoise steps answered, by outcome.',
      labelNames: ['model', 'outcome'],
      registers: r,
    }),
    stepSeconds: new Histogram({
      name: 'ditpipe_denoiser_step_seconds',
      help: "Time from a step's arrival to its answer.",
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    forwardSeconds: new Histogram({
      name: 'ditpipe_denoiser_forward_seconds',
      help: 'Duration of one batched forward pass.',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    batchRows: new Histogram({
      name: 'ditpipe_denoiser_batch_rows',
      help: 'Rows per forward pass (guidance rows included).',
      labelNames: ['model'],
      buckets: ROW_BUCKETS,
      registers: r,
    }),
    queueSeconds: new Histogram({
      name: 'ditpipe_denoiser_queue_wait_seconds',
      help: 'Time a step waited for its forward pass to start.',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    queuedRows: new Gauge({
      name: 'ditpipe_denoiser_queued_rows',
      help: 'Rows this replica took from the work queue (or got by direct gRPC calls) that wait for its next forward pass.',
      labelNames: ['model'],
      registers: r,
    }),
    redelivered: new Counter({
      name: 'ditpipe_denoiser_redelivered_steps_total',
      help: 'Steps taken from the work queue on a second or later delivery (a replica before died, froze or held them past the attempt time).',
      labelNames: ['model'],
      registers: r,
    }),
    dropped: new Counter({
      name: 'ditpipe_denoiser_dropped_steps_total',
      help: 'Steps taken from the work queue and not computed, by reason: cancelled (the caller gave up), deadline (passed before the step was reached), stopping (given back at shutdown).',
      labelNames: ['model', 'reason'],
      registers: r,
    }),
    stepCacheBytes: new Gauge({
      name: 'ditpipe_denoiser_step_cache_bytes',
      help: 'Bytes of step-cache state held (block-stack residuals, first-block residuals of adaptive requests, bookkeeping).',
      labelNames: ['model'],
      registers: r,
    }),
    stepCacheEntries: new Gauge({
      name: 'ditpipe_denoiser_step_cache_entries',
      help: 'Step-cache states held (one per cache key).',
      labelNames: ['model'],
      registers: r,
    }),
    stepCacheEvictions: new Counter({
      name: 'ditpipe_denoiser_step_cache_evictions_total',
      help: 'Step-cache states dropped before their last step: least recently used out of the byte budget, or idle past the TTL.',
      labelNames: ['model'],
      registers: r,
    }),
    stepCacheSteps: new Counter({
      name: 'ditpipe_denoiser_step_cache_steps_total',
      help: 'Steps of requests with a step-cache policy, by outcome: cached (block stack skipped), full (computed in full by the policy), miss (computed in full because no matching state was held).',
      labelNames: ['model', 'outcome'],
      registers: r,
    }),
    graphRows: new Counter({
      name: 'ditpipe_denoiser_graph_rows_total',
      help: 'Rows run per graph (guidance rows included): full (model.onnx), head, tail, skip (the step-cache graphs).',
      labelNames: ['model', 'graph'],
      registers: r,
    }),
  };
}
export type DenoiserMetrics = ReturnType<typeof denoiserMetrics>;

export function decoderMetrics(registry = new Registry()) {
  const r = [registry];
  return {
    registry,
    decodeSeconds: new Histogram({
      name: 'ditpipe_decoder_decode_seconds',
      help: 'Duration of one batched decode (forward pass and image encoding).',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    batchSize: new Histogram({
      name: 'ditpipe_decoder_batch_size',
      help: 'Images per decode batch.',
      labelNames: ['model'],
      buckets: ROW_BUCKETS,
      registers: r,
    }),
    images: new Counter({ name: 'ditpipe_decoder_images_total', help: 'Images decoded.', labelNames: ['model'], registers: r }),
    queueSeconds: new Histogram({
      name: 'ditpipe_decoder_queue_wait_seconds',
      help: 'Time latents waited for their decode batch to start.',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    redelivered: new Counter({
      name: 'ditpipe_decoder_redelivered_decodes_total',
      help: 'Decodes taken from the work queue on a second or later delivery.',
      labelNames: ['model'],
      registers: r,
    }),
    dropped: new Counter({
      name: 'ditpipe_decoder_dropped_decodes_total',
      help: 'Decodes taken from the work queue and not computed, by reason (cancelled, deadline, stopping).',
      labelNames: ['model', 'reason'],
      registers: r,
    }),
  };
}
export type DecoderMetrics = ReturnType<typeof decoderMetrics>;

// Fault counters start with their known label sets at 0, so the series exist before the first
// fault: rate() and alerts on them work from the start, and a scrape shows what can be counted.

/** A denoiser's or decoder's redelivered/dropped series for its model, at 0. */
export function zeroReplicaWorkSeries(m: { redelivered: Counter<'model'>; dropped: Counter<'model' | 'reason'> }, model: string): void {
  m.redelivered.inc({ model }, 0);
  for (const reason of DROP_REASONS) m.dropped.inc({ model, reason }, 0);
}

/** A denoiser's step-cache series for its model, at 0 (state size, evictions, steps by outcome, rows by graph). */
export function zeroStepCacheSeries(m: DenoiserMetrics, model: string): void {
  for (const outcome of ['cached', 'full', 'miss']) m.stepCacheSteps.inc({ model, outcome }, 0);
  for (const graph of ['full', 'head', 'tail', 'skip']) m.graphRows.inc({ model, graph }, 0);
  m.stepCacheEvictions.inc({ model }, 0);
  m.stepCacheBytes.set({ model }, 0);
  m.stepCacheEntries.set({ model }, 0);
}

/** The scheduler's step-cache call series for a served model, at 0. */
export function zeroSchedulerStepCacheSeries(m: SchedulerMetrics, model: string): void {
  for (const outcome of ['cached', 'full']) for (const route of ['direct', 'queue']) m.stepCacheCalls.inc({ model, outcome, route }, 0);
}

/** The scheduler's discarded/resent/direct series for both worker services, at 0. */
export function zeroSchedulerWorkSeries(m: {
  discardedAnswers: Counter<'service' | 'reason'>;
  resent: Counter<'service'>;
  directCalls: Counter<'service'>;
  directFallbacks: Counter<'service' | 'reason'>;
}): void {
  for (const service of ['denoiser', 'decoder']) {
    m.resent.inc({ service }, 0);
    m.directCalls.inc({ service }, 0);
    for (const reason of DISCARD_REASONS) m.discardedAnswers.inc({ service, reason }, 0);
    for (const reason of FALLBACK_REASONS) m.directFallbacks.inc({ service, reason }, 0);
  }
}

export function schedulerMetrics(registry = new Registry()) {
  const r = [registry];
  // The queue gauges are read from the work queues when scraped: one read serves both gauges.
  let readQueues: (() => Promise<void>) | undefined;
  let reading: Promise<void> | undefined;
  const refresh = (): Promise<void> => {
    reading ??= (readQueues?.() ?? Promise.resolve()).finally(() => {
      reading = undefined;
    });
    return reading;
  };
  return {
    registry,
    /** Sets what refreshes the queue gauges at scrape time. */
    onCollectQueues(read: () => Promise<void>): void {
      readQueues = read;
    },
    requestSeconds: new Histogram({
      name: 'ditpipe_request_seconds',
      help: 'Generate request latency, by outcome (gRPC status name).',
      labelNames: ['model', 'outcome'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    requestsInFlight: new Gauge({ name: 'ditpipe_requests_in_flight', help: 'Generate requests being served.', registers: r }),
    samplesInFlight: new Gauge({
      name: 'ditpipe_samples_in_flight',
      help: 'Images being sampled or decoded (admission control counts these).',
      registers: r,
    }),
    rejected: new Counter({
      name: 'ditpipe_requests_rejected_total',
      help: 'Requests refused before sampling, by reason (invalid_argument, resource_exhausted, not_found, unavailable).',
      labelNames: ['reason'],
      registers: r,
    }),
    stepsDispatched: new Counter({
      name: 'ditpipe_steps_dispatched_total',
      help: "Denoise calls sent to the denoiser pool (retries excluded); a step of a large request is split into calls that fit a replica's row budget.",
      labelNames: ['model'],
      registers: r,
    }),
    discardedAnswers: new Counter({
      name: 'ditpipe_work_discarded_answers_total',
      help: 'Answers of denoisers or decoders dropped because the call was already answered (duplicate: a redelivered copy computed twice) or no longer awaited (late: cancelled or timed out).',
      labelNames: ['service', 'reason'],
      registers: r,
    }),
    resent: new Counter({
      name: 'ditpipe_work_resent_messages_total',
      help: 'Work messages sent again after a NATS reconnect because calls in them were still unanswered.',
      labelNames: ['service'],
      registers: r,
    }),
    directCalls: new Counter({
      name: 'ditpipe_work_direct_calls_total',
      help: 'Work calls sent directly to the replica holding state they reuse (e.g. a step cache) instead of through the queue.',
      labelNames: ['service'],
      registers: r,
    }),
    directFallbacks: new Counter({
      name: 'ditpipe_work_direct_fallbacks_total',
      help: 'Direct work calls sent through the queue after all: their replica said nothing of them for an ack wait (silent), gave them back (given-back), or they could not be sent or may have been lost with the connection (unsent).',
      labelNames: ['service', 'reason'],
      registers: r,
    }),
    queuePending: new Gauge({
      name: 'ditpipe_queue_pending_messages',
      help: 'Messages in a work queue that no replica has taken yet (read from the queue at scrape time): steps (queue "denoise") or decodes (queue "decode") waiting for a GPU.',
      labelNames: ['queue', 'model'],
      registers: r,
      collect: refresh,
    }),
    queueAckPending: new Gauge({
      name: 'ditpipe_queue_taken_messages',
      help: 'Messages of a work queue taken by a replica and not yet acknowledged (read at scrape time).',
      labelNames: ['queue', 'model'],
      registers: r,
      collect: refresh,
    }),
    imageTflops: new Histogram({
      name: 'ditpipe_image_tflops',
      help: 'Sampling compute per generated image, as the denoisers computed it (a cached step counts its head and skip graphs only), in Tflops (multiply-accumulates; guidance rows included).',
      labelNames: ['model'],
      buckets: [0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250],
      registers: r,
    }),
    images: new Counter({ name: 'ditpipe_images_total', help: 'Images returned to clients.', labelNames: ['model'], registers: r }),
    // What the scheduler itself sees of the pools (it has no access to the replicas' registries):
    samplingGflops: new Counter({
      name: 'ditpipe_scheduler_sampling_gflops_total',
      help: 'Sampling compute of the denoise steps answered, as the denoisers reported it with each answer (rows times the Gflops of the graphs that ran; guidance rows included); the denoisers count the same work in ditpipe_sampling_gflops_total.',
      labelNames: ['model'],
      registers: r,
    }),
    stepCacheCalls: new Counter({
      name: 'ditpipe_scheduler_step_cache_calls_total',
      help: 'Denoise calls of requests with step caching answered, by whether the denoiser reused the cache (cached) or ran every block (full), and whether the call went to the replica holding the cache (direct) or through the queue.',
      labelNames: ['model', 'outcome', 'route'],
      registers: r,
    }),
    stepBatchRows: new Histogram({
      name: 'ditpipe_scheduler_step_batch_rows',
      help: 'Rows of the forward pass that served each denoise call (guidance rows included), as the denoiser reported in its answer.',
      labelNames: ['model'],
      buckets: ROW_BUCKETS,
      registers: r,
    }),
    stepQueueSeconds: new Histogram({
      name: 'ditpipe_scheduler_step_queue_wait_seconds',
      help: 'Time each denoise call waited at the denoiser for its forward pass, as the denoiser reported in its answer.',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    decodes: new Counter({
      name: 'ditpipe_scheduler_decodes_total',
      help: 'Decode calls sent to the decoder pool (retries excluded), by purpose: final images or previews.',
      labelNames: ['model', 'purpose'],
      registers: r,
    }),
    decodeSeconds: new Histogram({
      name: 'ditpipe_scheduler_decode_seconds',
      help: 'Round trip of one decode call to the decoder pool, retries included, by purpose (final, preview).',
      labelNames: ['model', 'purpose'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    }),
    // The repeat cache (services/scheduler/repeat-cache.ts), counted in images.
    repeatCacheHits: new Counter({
      name: 'ditpipe_repeat_cache_hits_total',
      help: 'Images served from the repeat cache instead of being sampled.',
      registers: r,
    }),
    repeatCacheMisses: new Counter({
      name: 'ditpipe_repeat_cache_misses_total',
      help: 'Images looked up in the repeat cache and not found, so sampled (requests without a seed or with CACHE_POLICY_BYPASS are not looked up).',
      registers: r,
    }),
    repeatCacheEvictions: new Counter({
      name: 'ditpipe_repeat_cache_evictions_total',
      help: 'Images dropped from the repeat cache, least recently used first, to keep it within its byte budget.',
      registers: r,
    }),
    repeatCacheBytes: new Gauge({
      name: 'ditpipe_repeat_cache_bytes',
      help: 'Bytes the repeat cache holds (image bytes plus a fixed overhead per image); at most ditpipe_repeat_cache_max_bytes.',
      registers: r,
    }),
    repeatCacheImages: new Gauge({ name: 'ditpipe_repeat_cache_images', help: 'Images the repeat cache holds.', registers: r }),
    repeatCacheMaxBytes: new Gauge({
      name: 'ditpipe_repeat_cache_max_bytes',
      help: 'Byte budget of the repeat cache (--repeat-cache-mib); 0 when it is off.',
      registers: r,
    }),
    previews: new Counter({
      name: 'ditpipe_previews_total',
      help: 'Preview images by method and outcome: sent, skipped (the previous preview was still being made), late (ready after the final images started), failed.',
      labelNames: ['model', 'method', 'outcome'],
      registers: r,
    }),
  };
}
export type SchedulerMetrics = ReturnType<typeof schedulerMetrics>;

/**
 * Serves the merged registries as Prometheus text on `GET /metrics`; port 0 picks a free port.
 * Binds loopback unless told otherwise; `host`/`address` are what was bound (what to print).
 */
export async function serveMetrics(
  registries: Registry[],
  port: number,
  host = '127.0.0.1',
): Promise<{ server: Server; port: number; host: string; address: string; close: () => Promise<void> }> {
  const merged = Registry.merge(registries);
  const server = createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try GET /metrics\n');
      return;
    }
    merged.metrics().then(
      (text) => res.writeHead(200, { 'content-type': merged.contentType }).end(text),
      (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${String(err)}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const bound = server.address() as AddressInfo;
  return {
    server,
    port: bound.port,
    host: bound.address,
    address: bound.family === 'IPv6' ? `[${bound.address}]:${bound.port}` : `${bound.address}:${bound.port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
