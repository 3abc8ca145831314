// The scheduler: owns the sampling loop of every request. It validates and admits a request, draws
// its starting noise, sends one denoise step at a time to the denoiser pool (steps of many requests
// meet in the denoisers' batches), applies the reverse-diffusion update, then has the decoder pool
// turn the final latents into images. All request state lives here; replicas hold none.
import { randomBytes, randomUUID } from 'node:crypto';
import { DiffusionInputError } from '../../shared/diffusion/errors.ts';
import { guidanceRows, modelOutChannels } from '../../shared/diffusion/guidance.ts';
import { samplerByName } from '../../shared/diffusion/sampler/registry.ts';
import { advance, next, result, start, type SamplerName, type SamplerState } from '../../shared/diffusion/state.ts';
import { samplerOfKind } from '../../shared/sampler-kinds.ts';
import { checkEta, checkGuidance } from '../../shared/sampling-settings.ts';
import {
  CancelledError,
  Code,
  DeadlineExceededError,
  type DitpipeError,
  errorField,
  InvalidArgumentError,
  NotFoundError,
  quoteInput,
  ResourceExhaustedError,
  UnavailableError,
  codeName,
  toDitpipeError,
  truncate,
} from '../../shared/errors.ts';
import { GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import { ImageFormat, type DecoderInfo } from '../../shared/gen/ditpipe/v1/decoder.ts';
import {
  CachePolicy,
  OutputFormat,
  PreviewMethod,
  type GenerateEvent,
  type GenerateRequest,
  type GenerateResponse,
  type Image,
  type Preview,
  type Timings,
} from '../../shared/gen/ditpipe/v1/sampler.ts';
import { servedImageSize } from '../../shared/image/crop.ts';
import { RateLimitedLog, silentLogger, type Logger } from '../../shared/log.ts';
import { schedulerMetrics, zeroSchedulerStepCacheSeries, zeroSchedulerWorkSeries, type SchedulerMetrics } from '../../shared/metrics.ts';
import { copyF32TensorInto, f32Tensor } from '../../shared/tensor.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import { queueSettings } from '../../shared/transport/work.ts';
import { DecoderDefinition } from '../../shared/gen/ditpipe/v1/decoder.ts';
import { DenoiserDefinition } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { Catalog, type ServedModel } from './catalog.ts';
import type { SchedulerConfig } from './config.ts';
import { Previews, type PreviewPlan } from './preview.ts';
import { calibrationLatents, fitProjection, projectToPng, type Projection } from './projection.ts';
import { RepeatCache, repeatKey, type CachedImage, type RepeatSettings } from './repeat-cache.ts';
import { describeStepCache, resolveStepCache, type StepCacheSettings } from '../../shared/step-cache.ts';
import { settledWithin } from '../../shared/wait.ts';

/** A request after validation: everything the loop needs, nothing left to check. */
interface Plan {
  id: string;
  model: ServedModel;
  labels: number[];
  sampler: SamplerName;
  numSteps: number;
  cfgScale: number;
  guidance: GuidanceChannels;
  eta: number;
  seed: bigint;
  /** The request named its seed (only then can it repeat an earlier one). */
  seedGiven: boolean;
  raw: boolean;
  preview: PreviewPlan | null;
  /** Read and write the repeat cache (it is on, and the request did not opt out). */
  useCache: boolean;
  /** Step caching, resolved (GenerateRequest.step_cache); null for none. */
  stepCache: StepCacheSettings | null;
}

export interface GenerateOptions {
  /** Aborted when the client cancels or its deadline passes. */
  signal?: AbortSignal;
  /** Epoch milliseconds after which the client no longer waits. */
  deadline?: number;
  /** Receives accepted, progress and image events as they happen (GenerateStream). */
  onEvent?: (event: GenerateEvent) => void;
}

/** How long requests stopped by a drain's end get to send their UNAVAILABLE before the server closes. */
export const DRAIN_ABORT_MS = 2_000;

/** Clock skew allowed between grpc-js's deadline timer and ours. */
const DEADLINE_SLACK_MS = 50;

/** Longest class name a request may give (longer ones name no class); sizes the gRPC receive limit. */
export const MAX_CLASS_NAME_LENGTH = 256;

/** Bounds of the retry hint sent with RESOURCE_EXHAUSTED. */
const RETRY_HINT_MIN_MS = 100;
const RETRY_HINT_MAX_MS = 30_000;

/** Failures a client caused (logged at info); the rest say something about the service (warn/error). */
const CLIENT_CODES = new Set<number>([
  Code.INVALID_ARGUMENT,
  Code.NOT_FOUND,
  Code.CANCELLED,
  Code.DEADLINE_EXCEEDED,
  Code.FAILED_PRECONDITION,
  Code.OUT_OF_RANGE,
]);

function timings(t: Partial<Timings>): Timings {
  return { queueMs: 0, denoiseMs: 0, decodeMs: 0, totalMs: 0, ...t };
}

export class Scheduler {
  readonly catalog: Catalog;
  readonly metrics: SchedulerMetrics;
  readonly log: Logger;
  /**
   * Rate-limited log of like events (failed requests by code and field; retries and silent replicas
   * belong here too), so a storm of them stays readable: one line at once, a count later.
   */
  readonly events: RateLimitedLog;
  private samplesInFlight = 0;
  private readonly active = new Set<Promise<unknown>>();
  /** Latent-to-pixel maps for projection previews, per VAE and latent size, fitted on first use. */
  private readonly projections = new Map<string, Promise<Projection>>();
  private stopping = false;
  /** Aborted when a drain's grace runs out: requests still in flight then fail UNAVAILABLE. */
  private readonly shutdown = new AbortController();
  /** Deliveries a call gets from the work queue (its attempts). */
  private readonly maxDeliver: number;
  /** Moving average of completed requests' durations, for the RESOURCE_EXHAUSTED retry hint. */
  private typicalRequestMs = 1_000;
  /** Finished images by what determines their bytes, to answer exact repeats without sampling. */
  readonly repeatCache: RepeatCache;

  constructor(
    readonly config: SchedulerConfig,
    private readonly transport: Transport,
    metrics: SchedulerMetrics = schedulerMetrics(),
    opts: { log?: Logger; queueSettings?: Partial<QueueSettings> } = {},
  ) {
    this.metrics = metrics;
    this.log = opts.log ?? silentLogger();
    this.events = new RateLimitedLog(this.log);
    this.maxDeliver = queueSettings(opts.queueSettings).maxDeliver;
    this.repeatCache = new RepeatCache(Math.round(config.repeatCacheMiB * 2 ** 20), metrics);
    this.catalog = new Catalog(
      transport,
      config,
      { denoiser: DenoiserDefinition, decoder: DecoderDefinition },
      {
        queueSettings: opts.queueSettings,
        log: this.log,
        onWorkEvent: (service, ev) => {
          if (ev.kind === 'discarded') metrics.discardedAnswers.inc({ service, reason: ev.reason });
          else if (ev.kind === 'resent') metrics.resent.inc({ service }, ev.messages);
          else if (ev.kind === 'direct') metrics.directCalls.inc({ service }, ev.calls);
          else metrics.directFallbacks.inc({ service, reason: ev.reason });
        },
      },
    );
    zeroSchedulerWorkSeries(metrics);
    // Step-cache calls are counted from the first scrape, before any request asked for caching.
    for (const model of config.models) zeroSchedulerStepCacheSeries(metrics, model);
    metrics.onCollectQueues(() => this.readQueues());
  }

  /** Refreshes the queue gauges from the work queues of the models and VAEs in use. */
  private async readQueues(): Promise<void> {
    const { denoisers, decoders } = this.catalog.clients();
    const read = async (
      queue: 'denoise' | 'decode',
      model: string,
      info: () => Promise<{ pending: number; ackPending: number }>,
    ): Promise<void> => {
      try {
        const i = await info();
        this.metrics.queuePending.set({ queue, model }, i.pending);
        this.metrics.queueAckPending.set({ queue, model }, i.ackPending);
      } catch {
        // Not created yet or no connection: leave the last value.
      }
    };
    await Promise.all([
      ...[...denoisers].map(([model, c]) => read('denoise', model, () => c.queueOf('denoise').info())),
      ...[...decoders].map(([vae, c]) => read('decode', vae, () => c.queueOf('decode').info())),
    ]);
  }

  /** Images being sampled or decoded right now. */
  get inFlight(): number {
    return this.samplesInFlight;
  }

  async generate(req: GenerateRequest, opts: GenerateOptions = {}): Promise<GenerateResponse> {
    const arrived = performance.now();
    // No event after the outcome: a preview still being decoded when a request fails stays unsent.
    let settled = false;
    const { onEvent } = opts;
    const guarded = onEvent && { ...opts, onEvent: (e: GenerateEvent) => void (settled || onEvent(e)) };
    const run = this.run(req, guarded || opts, arrived);
    this.active.add(run);
    try {
      return await run;
    } finally {
      settled = true;
      this.active.delete(run);
    }
  }

  /** The events of one request as an async iterable (in-process callers; gRPC uses onEvent). */
  async *generateEvents(req: GenerateRequest, opts: Omit<GenerateOptions, 'onEvent'> = {}): AsyncGenerator<GenerateEvent> {
    const queue: GenerateEvent[] = [];
    let wake: (() => void) | null = null;
    let settled: { failed: boolean; err?: unknown } | null = null;
    void this.generate(req, {
      ...opts,
      onEvent: (e) => {
        queue.push(e);
        wake?.();
      },
    })
      .then(
        () => {
          settled = { failed: false };
        },
        (err: unknown) => {
          settled = { failed: true, err };
        },
      )
      .finally(() => wake?.());
    for (;;) {
      while (queue.length) yield queue.shift() as GenerateEvent;
      const s = settled as { failed: boolean; err?: unknown } | null;
      if (s) {
        if (s.failed) throw s.err;
        return;
      }
      await new Promise<void>((r) => {
        wake = r;
      });
      wake = null;
    }
  }

  private async run(req: GenerateRequest, opts: GenerateOptions, arrived: number): Promise<GenerateResponse> {
    let plan: Plan;
    let hits: Map<number, CachedImage>;
    try {
      if (this.stopping) throw new ResourceExhaustedError('the scheduler is shutting down; retry on another scheduler');
      // Fail fast while NATS is away: a new request could only wait out its deadline.
      if (!this.transport.connected)
        throw new UnavailableError('the scheduler has lost its connection to NATS and is reconnecting; retry shortly');
      plan = await this.plan(req, opts.onEvent !== undefined);
      const found = this.cachedImages(plan);
      hits = found ?? new Map<number, CachedImage>();
      // Images from the cache take no sampling capacity: a whole repeat is answered even when full.
      this.admit(plan.labels.length - hits.size);
      if (found) this.repeatCache.count(hits.size, plan.labels.length - hits.size);
    } catch (err) {
      const e = toDitpipeError(err);
      this.metrics.rejected.inc({ reason: codeName(e.code).toLowerCase() });
      this.logFailure(e, req.model);
      throw e;
    }
    const n = plan.labels.length - hits.size;
    const labels = { model: plan.model.name };
    this.metrics.requestsInFlight.inc();
    this.metrics.samplesInFlight.inc(n);
    // A drain whose grace runs out stops the request at its next step or call, as a cancel would.
    const signal = opts.signal ? AbortSignal.any([opts.signal, this.shutdown.signal]) : this.shutdown.signal;
    try {
      const res = await this.sample(plan, hits, { ...opts, signal }, arrived);
      this.metrics.requestSeconds.observe({ ...labels, outcome: 'OK' }, res.timings!.totalMs / 1000);
      // The retry hint is about capacity: a request answered wholly from the cache took none.
      if (n > 0) this.typicalRequestMs = 0.8 * this.typicalRequestMs + 0.2 * res.timings!.totalMs;
      return res;
    } catch (err) {
      let e = toDitpipeError(err);
      if (this.shutdown.signal.aborted && !opts.signal?.aborted) e = toDitpipeError(this.shutdown.signal.reason);
      // gRPC reports a passed deadline as a cancellation of the call; name it for what it is.
      if (e instanceof CancelledError && opts.deadline !== undefined && Date.now() >= opts.deadline - DEADLINE_SLACK_MS) {
        e = new DeadlineExceededError('the request deadline passed', { cause: e });
      }
      this.metrics.requestSeconds.observe({ ...labels, outcome: codeName(e.code) }, (performance.now() - arrived) / 1000);
      this.logFailure(e, plan.model.name);
      throw e;
    } finally {
      this.samplesInFlight -= n;
      this.metrics.requestsInFlight.dec();
      this.metrics.samplesInFlight.dec(n);
    }
  }

  /**
   * The images of the request the repeat cache holds, by sample index; null when it was not looked
   * up: only a request that named its seed is (a new seed repeats nothing), and a PNG request only
   * once the model's VAE is known (the key names its weights).
   */
  private cachedImages(plan: Plan): Map<number, CachedImage> | null {
    if (!plan.useCache || !plan.seedGiven) return null;
    const decoder = plan.raw ? null : plan.model.decoder && { vae: plan.model.vae, info: plan.model.decoder };
    if (decoder === null && !plan.raw) return null;
    const hits = new Map<number, CachedImage>();
    const settings = this.repeatSettings(plan, decoder);
    this.repeatCache.lookup(plan.labels.map((label, i) => repeatKey(settings, label, i))).forEach((img, i) => {
      if (img) hits.set(i, img);
    });
    return hits;
  }

  private repeatSettings(plan: Plan, decoder: RepeatSettings['decoder']): RepeatSettings {
    return {
      denoiser: plan.model.denoiser,
      decoder,
      sampler: plan.sampler,
      numSteps: plan.numSteps,
      cfgScale: plan.cfgScale,
      guidance: plan.guidance,
      eta: plan.eta,
      seed: plan.seed,
      stepCache: describeStepCache(plan.stepCache),
    };
  }

  /** Counts and logs a request refused before it reached generate() (e.g. by the gRPC layer). */
  refused(e: DitpipeError, model = ''): void {
    this.metrics.rejected.inc({ reason: codeName(e.code).toLowerCase() });
    this.logFailure(e, model);
  }

  /** Logs a failed request (code, field), rate-limited per kind so a storm stays readable. */
  private logFailure(e: DitpipeError, model: string): void {
    const code = codeName(e.code);
    const field = errorField(e);
    const level = CLIENT_CODES.has(e.code) ? 'info' : e.code === Code.RESOURCE_EXHAUSTED || e.code === Code.UNAVAILABLE ? 'warn' : 'error';
    // class_labels[3] and class_labels[7] are the same kind of failure.
    const key = `${code}|${field?.replace(/\[\d+\]/g, '[]') ?? ''}`;
    const fields: Record<string, unknown> = { code, model: truncate(model, 64) };
    if (field !== undefined) fields.field = field;
    this.events.event(level, key, fields, `request failed: ${code}${field ? ` (${field})` : ''}: ${truncate(e.message, 300)}`);
  }

  /** How long a refused client should wait: about half a typical request, when capacity frees up. */
  private retryHintMs(): number {
    return Math.round(Math.min(RETRY_HINT_MAX_MS, Math.max(RETRY_HINT_MIN_MS, this.typicalRequestMs / 2)));
  }

  private admit(n: number): void {
    if (this.samplesInFlight + n > this.config.maxSamplesInFlight) {
      const retryAfterMs = this.retryHintMs();
      throw new ResourceExhaustedError(
        `scheduler is at capacity: ${this.samplesInFlight} of ${this.config.maxSamplesInFlight} samples in flight, request needs ${n}; retry in ${retryAfterMs} ms`,
        { retryAfterMs },
      );
    }
    this.samplesInFlight += n;
  }

  /** Validates every field; errors are INVALID_ARGUMENT naming the field (NOT_FOUND for an unknown model). */
  private async plan(req: GenerateRequest, streaming: boolean): Promise<Plan> {
    if (!req.model) throw new InvalidArgumentError('model is required (see ListModels)', { field: 'model' });
    if (!this.config.models.includes(req.model)) {
      throw new NotFoundError(`model ${quoteInput(req.model)} is not served here; available: ${this.config.models.join(', ')}`);
    }
    const n = req.classLabels.length;
    if (n === 0) throw new InvalidArgumentError('class_labels must name at least one class', { field: 'class_labels' });
    if (n > this.config.maxImagesPerRequest) {
      throw new InvalidArgumentError(`class_labels asks for ${n} images; at most ${this.config.maxImagesPerRequest} per request`, {
        field: 'class_labels',
      });
    }
    // Such a request could never be admitted: retrying it later would spin forever.
    if (n > this.config.maxSamplesInFlight) {
      throw new InvalidArgumentError(
        `class_labels asks for ${n} images; this scheduler samples at most ${this.config.maxSamplesInFlight} at once (--max-samples-in-flight): split the request`,
        { field: 'class_labels' },
      );
    }
    const samplerDef = samplerOfKind(req.sampler);
    if (!samplerDef) throw new InvalidArgumentError(`sampler: unknown value ${req.sampler}`, { field: 'sampler' });
    const sampler = samplerDef.name;
    const numSteps = req.numSteps ?? this.config.defaultSteps[sampler];
    if (!Number.isInteger(numSteps) || numSteps < 1 || numSteps > 1000) {
      throw new InvalidArgumentError(`num_steps must be within 1..1000, got ${numSteps}`, { field: 'num_steps' });
    }
    const cfgScale = req.cfgScale ?? this.config.defaultCfgScale;
    const guided = checkGuidance(cfgScale, req.guidanceChannels);
    const eta = checkEta(req.eta, samplerDef);
    const fmt = req.outputFormat;
    if (
      fmt !== OutputFormat.OUTPUT_FORMAT_UNSPECIFIED &&
      fmt !== OutputFormat.OUTPUT_FORMAT_PNG &&
      fmt !== OutputFormat.OUTPUT_FORMAT_RAW_LATENT
    ) {
      throw new InvalidArgumentError(`output_format: unknown value ${fmt}`, { field: 'output_format' });
    }
    let preview: PreviewPlan | null = null;
    if (req.preview && req.preview.everySteps > 0) {
      if (!streaming)
        throw new InvalidArgumentError(
          'preview: previews need a streaming request (GenerateStream, or "stream": true over HTTP); Generate returns the final images only',
          { field: 'preview' },
        );
      const m = req.preview.method;
      if (
        m !== PreviewMethod.PREVIEW_METHOD_UNSPECIFIED &&
        m !== PreviewMethod.PREVIEW_METHOD_DECODER &&
        m !== PreviewMethod.PREVIEW_METHOD_PROJECTION
      ) {
        throw new InvalidArgumentError(`preview.method: unknown value ${m}`, { field: 'preview.method' });
      }
      preview = { every: req.preview.everySteps, method: m === PreviewMethod.PREVIEW_METHOD_PROJECTION ? 'projection' : 'decoder' };
    }
    const policy = req.cachePolicy;
    if (
      policy !== CachePolicy.CACHE_POLICY_UNSPECIFIED &&
      policy !== CachePolicy.CACHE_POLICY_USE &&
      policy !== CachePolicy.CACHE_POLICY_BYPASS
    ) {
      throw new InvalidArgumentError(`cache_policy: unknown value ${policy}`, { field: 'cache_policy' });
    }
    const stepCache = resolveStepCache(req.stepCache);
    const model = await this.catalog.get(req.model);
    const numClasses = model.denoiser.config?.numClasses ?? 0;
    const labels = req.classLabels.map((l, i) => {
      const field = `class_labels[${i}]`;
      if (l.index !== undefined) {
        if (!Number.isInteger(l.index) || l.index < 0 || l.index >= numClasses) {
          throw new InvalidArgumentError(
            `${field}: class index must be within 0..${numClasses - 1} for model "${model.name}", got ${l.index}`,
            { field },
          );
        }
        return l.index;
      }
      if (l.name !== undefined) {
        const idx = l.name.length > MAX_CLASS_NAME_LENGTH ? undefined : model.classIndex.get(l.name.toLowerCase());
        if (idx === undefined) {
          const names = model.denoiser.classNames;
          const known = names.length ? `known: ${truncate(names.join(', '), 400)}` : 'this model has no class names; use indices';
          throw new InvalidArgumentError(`${field}: unknown class name ${quoteInput(l.name)} (${known})`, { field });
        }
        return idx;
      }
      throw new InvalidArgumentError(`${field}: set index or name`, { field });
    });
    const seed = req.seed ?? randomBytes(8).readBigUInt64LE();
    return {
      id: randomUUID(),
      model,
      labels,
      sampler,
      numSteps,
      cfgScale,
      guidance: guided === 'all' ? GuidanceChannels.GUIDANCE_CHANNELS_ALL : GuidanceChannels.GUIDANCE_CHANNELS_THREE,
      eta,
      seed,
      seedGiven: req.seed !== undefined,
      raw: fmt === OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
      preview,
      useCache: this.repeatCache.enabled && policy !== CachePolicy.CACHE_POLICY_BYPASS,
      stepCache,
    };
  }

  private checkAlive(opts: GenerateOptions): void {
    if (opts.signal?.aborted) {
      if (opts.deadline !== undefined && Date.now() >= opts.deadline) throw new DeadlineExceededError('the request deadline passed');
      throw new CancelledError('the client cancelled the request');
    }
    if (opts.deadline !== undefined && Date.now() >= opts.deadline) throw new DeadlineExceededError('the request deadline passed');
  }

  /** Budget of one call with its redeliveries: every delivery may use `attempt` ms, within the client's deadline. */
  private callBudget(opts: GenerateOptions, attempt: number): number {
    const all = attempt * this.maxDeliver;
    return opts.deadline === undefined ? all : Math.max(1, Math.min(all, opts.deadline - Date.now()));
  }

  /**
   * Samples the request's images the repeat cache did not hold (`hits`, by sample index) and
   * decodes them; the cached ones join them after the last step. The noise of each sampled image
   * is that of its own sample index, so it comes out as it would in the whole request.
   */
  private async sample(plan: Plan, hits: Map<number, CachedImage>, opts: GenerateOptions, arrived: number): Promise<GenerateResponse> {
    const { model } = plan;
    const c = model.denoiser.config!;
    const n = plan.labels.length;
    // The images to sample, by sample index, and their classes.
    const todo = plan.labels.flatMap((_, i) => (hits.has(i) ? [] : [i]));
    const todoLabels = todo.map((i) => plan.labels[i]);
    const m = todo.length;
    let state = null;
    if (m > 0) {
      try {
        state = start({
          sampler: plan.sampler,
          numSteps: plan.numSteps,
          shape: [c.inChannels, c.inputSize, c.inputSize],
          count: m,
          sampleIndices: todo,
          // Only samplers that read the learned variance get it; the others take the mean channels alone (see omitVariance).
          learnSigma: c.learnSigma && samplerByName(plan.sampler)!.learnedVariance,
          seed: plan.seed,
          eta: plan.eta,
        });
      } catch (err) {
        if (err instanceof DiffusionInputError) throw new InvalidArgumentError(err.message, { field: err.field });
        throw err;
      }
    }
    const queueMs = performance.now() - arrived;
    opts.onEvent?.({
      accepted: {
        requestId: plan.id,
        model: model.name,
        seed: plan.seed,
        numImages: n,
        numSteps: plan.numSteps,
        queueMs,
        cfgScale: plan.cfgScale,
        cachedImages: hits.size,
      },
    });
    const labels = { model: model.name };
    const denoiseStart = performance.now();
    const inPer = c.inChannels * c.inputSize * c.inputSize;
    let gflops = 0;
    if (state) gflops = await this.denoise(plan, state, todoLabels, opts);
    // A whole repeat runs no step; its stream still shows every step done.
    else for (let s = 1; s <= plan.numSteps; s++) opts.onEvent?.({ progress: { step: s, numSteps: plan.numSteps } });
    const denoiseMs = state ? performance.now() - denoiseStart : 0;
    for (let j = 0; j < m; j++) this.metrics.imageTflops.observe(labels, gflops / m / 1000);

    const images: Image[] = new Array<Image>(n);
    const names = model.denoiser.classNames;
    const base = (i: number): Image => ({
      png: new Uint8Array(0),
      latent: undefined,
      classLabel: plan.labels[i],
      className: names[plan.labels[i]] ?? '',
      seed: plan.seed,
      sampleIndex: i,
      width: c.inputSize,
      height: c.inputSize,
      cached: false,
    });
    for (const [i, img] of hits) {
      images[i] = { ...base(i), ...img, cached: true };
      opts.onEvent?.({ image: { image: images[i], timings: timings({ queueMs, totalMs: performance.now() - arrived }) } });
    }
    const latents = state ? result(state) : new Float32Array(0);
    let decodeMs = 0;
    let decoder: RepeatSettings['decoder'] = null;
    if (plan.raw) {
      todo.forEach((i, j) => {
        images[i] = { ...base(i), latent: f32Tensor([c.inChannels, c.inputSize, c.inputSize], latents.slice(j * inPer, (j + 1) * inPer)) };
        opts.onEvent?.({ image: { image: images[i], timings: timings({ queueMs, denoiseMs, totalMs: performance.now() - arrived }) } });
      });
    } else if (m > 0) {
      this.checkAlive(opts);
      decoder = await this.catalog.decoderFor(model);
      const { vae, info } = decoder;
      const decodeStart = performance.now();
      // One call per image: images stream out as they finish and spread over the decoder replicas.
      await Promise.all(
        todo.map(async (i, j) => {
          const started = performance.now();
          const png = await this.decodeToPng(plan, vae, latents.subarray(j * inPer, (j + 1) * inPer), 'final', opts);
          const size = servedImageSize(c.inputSize, info);
          images[i] = { ...base(i), png, width: size.width, height: size.height };
          opts.onEvent?.({
            image: {
              image: images[i],
              timings: timings({ queueMs, denoiseMs, decodeMs: performance.now() - started, totalMs: performance.now() - arrived }),
            },
          });
        }),
      );
      decodeMs = performance.now() - decodeStart;
    }
    // Every image exists: only now are the sampled ones worth keeping.
    if (plan.useCache && m > 0) {
      const settings = this.repeatSettings(plan, decoder);
      for (const i of todo) this.repeatCache.store(repeatKey(settings, plan.labels[i], i), images[i]);
    }
    this.metrics.images.inc(labels, n);
    const all = timings({ queueMs, denoiseMs, decodeMs, totalMs: performance.now() - arrived });
    opts.onEvent?.({ completed: { timings: all, numImages: n, samplingGflops: gflops } });
    return {
      images,
      timings: all,
      requestId: plan.id,
      model: model.name,
      seed: plan.seed,
      numSteps: plan.numSteps,
      samplingGflops: gflops,
    };
  }

  /**
   * The sampling loop: one denoise step after another until `state` is done; `y` is each sample's
   * class. Returns the Gflops the denoisers computed for it.
   */
  private async denoise(plan: Plan, state: SamplerState, y: number[], opts: GenerateOptions): Promise<number> {
    const { model } = plan;
    const c = model.denoiser.config!;
    const m = y.length;
    const denoiser = this.catalog.denoiserClient(model.name);
    const labels = { model: model.name };
    const omitVariance = c.learnSigma && !samplerByName(plan.sampler)!.learnedVariance;
    const outChannels = modelOutChannels(c.inChannels, c.learnSigma && !omitVariance);
    const inPer = c.inChannels * c.inputSize * c.inputSize;
    const outPer = outChannels * c.inputSize * c.inputSize;
    // A step of many samples is split into calls that fit one replica's row budget (guidance rows
    // count); the calls run concurrently, so a large request also spreads over the replicas.
    const rowBudget = model.denoiser.maxBatchRows || Number.POSITIVE_INFINITY;
    const chunk = Math.max(1, Math.floor(rowBudget / guidanceRows(1, plan.cfgScale)));
    const modelOut = new Float32Array(m * outPer);
    // With step caching, each call's cache state lives on one replica: the next step of that
    // group of samples goes there directly (holders, by call), and through the queue if it is gone.
    const holders = new Map<number, string>();
    const stepCache = plan.stepCache ?? undefined;
    let gflops = 0;
    const previews = plan.preview ? await this.previews(plan, opts, inPer, state.sampleIndices) : null;
    for (let p = next(state); p !== null; p = next(state)) {
      this.checkAlive(opts);
      const step = p;
      const t = Array.from(step.t, (v) => BigInt(v));
      const calls: Array<Promise<void>> = [];
      for (let a = 0; a < m; a += chunk) {
        const b = Math.min(m, a + chunk);
        const target = holders.get(a);
        this.metrics.stepsDispatched.inc(labels);
        calls.push(
          denoiser
            .denoise(
              {
                model: model.name,
                x: f32Tensor([b - a, c.inChannels, c.inputSize, c.inputSize], step.x.subarray(a * inPer, b * inPer)),
                t: t.slice(a, b),
                y: y.slice(a, b),
                cfgScale: plan.cfgScale,
                guidanceChannels: plan.guidance,
                requestId: plan.id,
                stepIndex: step.step,
                omitVariance,
                stepCache,
                cacheKey: stepCache ? `${plan.id}/${state.sampleIndices[a]}` : '',
                numSteps: plan.numSteps,
              },
              {
                signal: opts.signal,
                attemptTimeoutMs: this.config.stepTimeoutMs,
                timeoutMs: this.callBudget(opts, this.config.stepTimeoutMs),
                target,
              },
            )
            .then((res) => {
              this.observeStep(labels, res);
              gflops += res.gflops;
              this.metrics.samplingGflops.inc(labels, res.gflops);
              if (stepCache) {
                this.metrics.stepCacheCalls.inc({ ...labels, outcome: res.cached ? 'cached' : 'full', route: target ? 'direct' : 'queue' });
                if (res.cacheHolder) holders.set(a, res.cacheHolder);
                else holders.delete(a);
              }
              copyF32TensorInto(res.out, 'out', [b - a, outChannels, c.inputSize, c.inputSize], modelOut, a * outPer);
            }),
        );
      }
      await Promise.all(calls);
      previews?.afterStep(step.step, state, modelOut); // before advance: reads the step's x_t
      advance(state, modelOut);
      opts.onEvent?.({ progress: { step: step.step + 1, numSteps: plan.numSteps } });
    }
    previews?.close();
    return gflops;
  }

  /** What the denoiser reported with a step's answer (the scheduler cannot read its metrics). */
  private observeStep(labels: { model: string }, res: { batchRows: number; queueMs: number }): void {
    if (res.batchRows > 0) this.metrics.stepBatchRows.observe(labels, res.batchRows);
    this.metrics.stepQueueSeconds.observe(labels, res.queueMs / 1000);
  }

  /** Previews of a request: x0 predictions decoded by the model's decoder pool, or projected here. */
  private async previews(plan: Plan, opts: GenerateOptions, inPer: number, sampleIndices: ArrayLike<number>): Promise<Previews> {
    const { model } = plan;
    const c = model.denoiser.config!;
    const { vae, info } = await this.catalog.decoderFor(model);
    const size = servedImageSize(c.inputSize, info);
    const sink = {
      model: model.name,
      numSteps: plan.numSteps,
      sampleIndices,
      perSample: inPer,
      metrics: this.metrics,
      emit: (preview: Preview) => opts.onEvent?.({ preview }),
    };
    if (plan.preview!.method === 'projection') {
      const projection = await this.projection(plan, vae, info, opts);
      return new Previews(plan.preview!, {
        ...sink,
        render: async (latent) => ({ png: projectToPng(projection, latent, c.inputSize), width: c.inputSize, height: c.inputSize }),
      });
    }
    return new Previews(plan.preview!, {
      ...sink,
      render: async (latent) => ({
        png: await this.decodeToPng(plan, vae, latent, 'preview', opts),
        width: size.width,
        height: size.height,
      }),
    });
  }

  /**
   * The latent-to-pixel map of a VAE at this latent size: fitted once (8 calibration decodes on the
   * decoder pool, under the first request's signal), then shared; a failed fit is tried again later.
   */
  private projection(plan: Plan, vae: string, info: DecoderInfo, opts: GenerateOptions): Promise<Projection> {
    const c = plan.model.denoiser.config!;
    const key = `${vae}/${c.inChannels}x${c.inputSize}`;
    let p = this.projections.get(key);
    if (!p) {
      const count = 8;
      const per = c.inChannels * c.inputSize * c.inputSize;
      const latents = calibrationLatents(count, c.inChannels, c.inputSize);
      p = Promise.all(
        Array.from({ length: count }, (_, i) => this.decodeToPng(plan, vae, latents.subarray(i * per, (i + 1) * per), 'calibration', opts)),
      ).then((pngs) => fitProjection(latents, c.inChannels, c.inputSize, pngs, { upsample: info.upsample, crop: info.outputCrop }));
      p.catch(() => this.projections.delete(key));
      this.projections.set(key, p);
    }
    return p;
  }

  /**
   * One latent decoded to a PNG by the VAE's decoder pool, counted and timed by purpose. A final or
   * calibration decode gets the work queue's redelivery like a step; a preview is not worth a
   * retry (a later one replaces it).
   */
  private async decodeToPng(
    plan: Plan,
    vae: string,
    latent: Float32Array,
    purpose: 'final' | 'preview' | 'calibration',
    opts: GenerateOptions,
  ): Promise<Uint8Array> {
    const c = plan.model.denoiser.config!;
    const labels = { model: plan.model.name, purpose };
    const started = performance.now();
    this.metrics.decodes.inc(labels);
    const budget = this.callBudget(opts, this.config.decodeTimeoutMs);
    const res = await this.catalog.decoderClient(vae).decode(
      {
        model: vae,
        latents: f32Tensor([1, c.inChannels, c.inputSize, c.inputSize], latent),
        format: ImageFormat.IMAGE_FORMAT_PNG,
        requestId: plan.id,
      },
      purpose === 'preview'
        ? { signal: opts.signal, retries: 0, timeoutMs: Math.min(this.config.decodeTimeoutMs, budget) }
        : { signal: opts.signal, attemptTimeoutMs: this.config.decodeTimeoutMs, timeoutMs: budget },
    );
    this.metrics.decodeSeconds.observe(labels, (performance.now() - started) / 1000);
    return res.png[0];
  }

  /**
   * Refuses new requests and waits up to graceMs for those in flight. Any still running then fail
   * UNAVAILABLE, saying so (a client retries them elsewhere: same seed, same images), and get a
   * moment to send that answer before the caller closes the server.
   */
  async drain(graceMs: number): Promise<void> {
    this.stopping = true;
    const settled = (ms: number): Promise<boolean> => settledWithin(Promise.allSettled([...this.active]), ms);
    if (!(await settled(graceMs))) {
      const left = this.active.size;
      this.shutdown.abort(
        new UnavailableError(
          `the scheduler shut down before this request finished (its drain grace of ${graceMs} ms passed); retry on another scheduler`,
        ),
      );
      this.log.warn({ requests: left, graceMs }, `drain grace passed: ${left} request(s) still in flight fail UNAVAILABLE`);
      await settled(DRAIN_ABORT_MS);
    }
    this.events.flush();
  }
}
