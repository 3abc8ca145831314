// The denoiser: answers denoise steps for one DiT model. Steps from many requests, at different
// timesteps, share a forward pass (continuous batching); classifier-free guidance is applied here,
// so a step on the wire carries one latent per sample and its answer is the guided output.
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Batcher } from '../../shared/batching.ts';
import { combineGuidance, guidanceRows, modelOutChannels, packGuidedRows } from '../../shared/diffusion/guidance.ts';
import { InvalidArgumentError, NotFoundError, UnavailableError } from '../../shared/errors.ts';
import { checkGuidance } from '../../shared/sampling-settings.ts';
import { StepCachePolicy } from '../../shared/gen/ditpipe/v1/common.ts';
import type { DenoiseRequest, DenoiseResponse, DenoiserDefinition, DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { denoiserMetrics, zeroStepCacheSeries, type DenoiserMetrics } from '../../shared/metrics.ts';
import { graphRevisionOf, ModelDirError, readDitModelDir, type DitModelJson } from '../../shared/model/modeldir.ts';
import { openCacheSessions, type CacheSessions } from '../../shared/runtime/cache-sessions.ts';
import { SessionError, WorkerSession, type SessionOptions } from '../../shared/runtime/session.ts';
import { f32Tensor, readF32Tensor } from '../../shared/tensor.ts';
import type { CallContext, ServiceImpl, WorkSource } from '../../shared/transport/types.ts';
import type { DenoiserConfig } from './config.ts';
import { decideCached, StepCacheStore, validateStepCache, type CacheStep } from './step-cache.ts';

interface StepJob {
  n: number;
  /** Answer the C mean channels only (see DenoiseRequest.omit_variance). */
  omitVariance: boolean;
  x: Float32Array;
  t: bigint[];
  y: number[];
  scale: number;
  channels: 3 | 'all';
  /** The request's step-cache policy and key; null without a policy (a plain full step). */
  cache: CacheStep | null;
}

interface StepResult {
  out: Float32Array;
  /** Duration of the passes that served the job's rows. */
  forwardMs: number;
  cached: boolean;
  cacheHolder: string;
  gflops: number;
}

/** A job's model output rows (guidance rows included) and what computing them took. */
interface RowsOut {
  out: Float32Array;
  ms: number;
  cached: boolean;
  gflops: number;
}

/** Graph inputs for a group of jobs, their rows one after another (see packRows). */
type Packed = Record<'x', Float32Array> & Record<'t' | 'y', BigInt64Array>;

/** The step cache as opened: sessions and state store, or why there is none. */
export type StepCacheStatus = { enabled: true; maxBytes: number } | { enabled: false; reason: string };

/** The first `meanRow` values of each of `n` rows of `rowSize` (the mean channels of a learned-sigma output). */
function meanChannels(out: Float32Array, n: number, rowSize: number, meanRow: number): Float32Array {
  const mean = new Float32Array(n * meanRow);
  for (let i = 0; i < n; i++) mean.set(out.subarray(i * rowSize, i * rowSize + meanRow), i * meanRow);
  return mean;
}

export class Denoiser {
  readonly name: string;
  readonly info: DenoiserInfo;
  readonly metrics: DenoiserMetrics;
  /** Whether cached-policy steps can be cached here (else they run as plain full steps), and why not. */
  readonly stepCache: StepCacheStatus;
  private readonly batcher: Batcher<StepJob, StepResult>;
  private readonly plane: number;
  /** Tokens per row (N) and width (D) of the step-cache graphs' hidden states. */
  private readonly tokens: number;
  private readonly width: number;
  private readonly outChannels: number;
  private readonly store: StepCacheStore | null;
  private stopping = false;

  private constructor(
    readonly config: DenoiserConfig,
    readonly meta: DitModelJson,
    private readonly session: WorkerSession | null,
    private readonly cacheSessions: CacheSessions | null,
    stepCache: StepCacheStatus,
    metrics: DenoiserMetrics,
  ) {
    const c = meta.config;
    this.name = config.name ?? meta.name;
    this.plane = c.input_size * c.input_size;
    this.tokens = (c.input_size / c.patch_size) ** 2;
    this.width = c.hidden_size;
    this.outChannels = modelOutChannels(c.in_channels, c.learn_sigma);
    this.metrics = metrics;
    this.stepCache = stepCache;
    metrics.modelGflops.set({ model: this.name }, meta.gflops);
    // Every series at 0 from the start, so rate() works before the first cached request.
    zeroStepCacheSeries(metrics, this.name);
    this.store = stepCache.enabled ? new StepCacheStore(stepCache.maxBytes, metrics, this.name) : null;
    this.batcher = new Batcher((jobs) => this.forward(jobs), {
      maxRows: config.maxBatchRows,
      maxWaitMs: config.maxWaitMs,
      unit: 'rows (guidance rows count)',
    });
    this.info = {
      model: this.name,
      config: {
        inputSize: c.input_size,
        patchSize: c.patch_size,
        inChannels: c.in_channels,
        hiddenSize: c.hidden_size,
        depth: c.depth,
        numHeads: c.num_heads,
        numClasses: c.num_classes,
        learnSigma: c.learn_sigma,
        mlpRatio: 4,
      },
      classNames: meta.classNames ?? [],
      params: BigInt(meta.params),
      gflops: meta.gflops,
      vae: meta.vae ?? '',
      maxBatchRows: config.maxBatchRows,
      executionProvider: config.simulate ? 'simulate' : config.executionProvider,
      instanceId: randomUUID(),
      sourceSha256: meta.source.sha256,
      weightDtype: meta.weightDtype,
      graphRevision: graphRevisionOf(meta),
    };
  }

  /**
   * Loads the model (on a worker thread) unless simulating, and the step-cache graphs (a worker
   * each) when the budget is above 0 and the directory has them. Unusable cache graphs do not stop
   * the replica: it serves every step in full (see `stepCache`).
   */
  static async create(config: DenoiserConfig, metrics: DenoiserMetrics = denoiserMetrics()): Promise<Denoiser> {
    const dir = readDitModelDir(config.modelDir);
    const opts: SessionOptions = { executionProvider: config.executionProvider, intraOpThreads: config.intraOpThreads };
    const session = config.simulate ? null : await WorkerSession.create(dir.onnxPath, opts);
    let cacheSessions: CacheSessions | null = null;
    let status: StepCacheStatus;
    if (config.simulate) status = { enabled: false, reason: 'simulation runs no graphs' };
    else if (config.stepCacheMib === 0) status = { enabled: false, reason: 'step cache off (--step-cache-mib 0)' };
    else if (!dir.meta.cacheGraphs)
      status = { enabled: false, reason: `${dir.dir} has no step-cache graphs (rebuild it with \`ditpipe model build dit\`)` };
    else {
      try {
        cacheSessions = await openCacheSessions(dir, opts);
        status = { enabled: true, maxBytes: Math.floor(config.stepCacheMib * 1024 * 1024) };
      } catch (err) {
        if (!(err instanceof ModelDirError || err instanceof SessionError)) {
          await session?.close();
          throw err;
        }
        status = { enabled: false, reason: `the step-cache graphs of ${dir.dir} cannot be used: ${err.message}` };
      }
    }
    return new Denoiser(config, dir.meta, session, cacheSessions, status, metrics);
  }

  /** Takes steps from the model's work queue whenever a forward pass can start. */
  attach(source: WorkSource): void {
    this.batcher.attach(source);
  }

  /** Transport-neutral implementation of the Denoiser service. */
  impl(): ServiceImpl<typeof DenoiserDefinition> {
    return {
      denoise: (req, ctx) => this.denoise(req, ctx),
      info: () => this.info,
    };
  }

  async denoise(req: DenoiseRequest, ctx?: Pick<CallContext, 'signal'>): Promise<DenoiseResponse> {
    const started = performance.now();
    if (this.stopping) throw new UnavailableError(`denoiser ${this.info.instanceId} is shutting down`);
    const job = this.validate(req);
    const labels = { model: this.name };
    try {
      const pending = this.batcher.submit(job, guidanceRows(job.n, job.scale), ctx?.signal);
      this.metrics.queuedRows.set(labels, this.batcher.queuedRows);
      const done = await pending;
      this.metrics.steps.inc({ ...labels, outcome: 'ok' });
      this.metrics.queueSeconds.observe(labels, done.queueMs / 1000);
      this.metrics.stepSeconds.observe(labels, (performance.now() - started) / 1000);
      const c = this.meta.config;
      const channels = job.omitVariance ? c.in_channels : this.outChannels;
      const r = done.result;
      return {
        out: f32Tensor([job.n, channels, c.input_size, c.input_size], r.out),
        batchRows: done.batchRows,
        queueMs: done.queueMs,
        forwardMs: r.forwardMs,
        cacheHolder: r.cacheHolder,
        cached: r.cached,
        gflops: r.gflops,
      };
    } catch (err) {
      this.metrics.steps.inc({ ...labels, outcome: 'error' });
      throw err;
    }
  }

  private validate(req: DenoiseRequest): StepJob {
    if (req.model !== this.name) throw new NotFoundError(`model "${req.model}" is not served here (this denoiser serves "${this.name}")`);
    const c = this.meta.config;
    const { shape, data } = readF32Tensor(req.x, 'x', [null, c.in_channels, c.input_size, c.input_size]);
    const n = shape[0];
    if (req.t.length !== n) throw new InvalidArgumentError(`t has ${req.t.length} entries; x has ${n} samples`, { field: 't' });
    if (req.y.length !== n) throw new InvalidArgumentError(`y has ${req.y.length} entries; x has ${n} samples`, { field: 'y' });
    for (const t of req.t) {
      if (t < 0n || t > 999n) throw new InvalidArgumentError(`t must be within 0..999, got ${t}`, { field: 't' });
    }
    for (const y of req.y) {
      if (!Number.isInteger(y) || y < 0 || y > c.num_classes) {
        throw new InvalidArgumentError(`y must be within 0..${c.num_classes} (${c.num_classes} = unconditional), got ${y}`, { field: 'y' });
      }
    }
    const scale = req.cfgScale ?? 1;
    const channels = checkGuidance(scale, req.guidanceChannels);
    const cache = validateStepCache(req.stepCache, req, { rows: guidanceRows(n, scale), scale, channels: String(channels) });
    return { n, x: data, t: req.t, y: req.y, scale, omitVariance: req.omitVariance, channels, cache };
  }

  /**
   * One batch of steps: the jobs without a step-cache policy (all of them while caching is off)
   * through model.onnx in one pass; those with one through one head pass, then one tail pass for
   * the jobs going full and one skip pass for those going cached. Then guidance per job.
   */
  private async forward(jobs: StepJob[]): Promise<StepResult[]> {
    const started = performance.now();
    const byPolicy = (j: StepJob): boolean => this.store !== null && j.cache !== null;
    const plain = jobs.filter((j) => !byPolicy(j));
    const withPolicy = jobs.filter(byPolicy);
    const rowsOut = new Map<StepJob, RowsOut>();
    if (plain.length > 0) {
      const outs = await this.runPlain(plain);
      plain.forEach((j, i) => rowsOut.set(j, outs[i]));
    }
    if (withPolicy.length > 0) {
      const outs = await this.runWithPolicy(withPolicy);
      withPolicy.forEach((j, i) => rowsOut.set(j, outs[i]));
    }
    const forwardMs = performance.now() - started;
    const labels = { model: this.name };
    const rows = jobs.reduce((sum, j) => sum + guidanceRows(j.n, j.scale), 0);
    this.metrics.queuedRows.set(labels, this.batcher.queuedRows);
    this.metrics.forwardSeconds.observe(labels, forwardMs / 1000);
    this.metrics.batchRows.observe(labels, rows);
    this.metrics.forwardRows.inc(labels, rows);
    this.metrics.samplingGflops.inc(
      labels,
      [...rowsOut.values()].reduce((sum, o) => sum + o.gflops, 0),
    );
    return jobs.map((j) => {
      const o = rowsOut.get(j)!;
      return {
        out: this.guide(j, o.out),
        forwardMs: o.ms,
        cached: o.cached,
        // Read after every state of the batch was updated: a later store may have evicted this one.
        cacheHolder: j.cache && this.store?.has(j.cache.key) ? this.info.instanceId : '',
        gflops: o.gflops,
      };
    });
  }

  /** model.onnx over the jobs' rows: the original numerics. */
  private async runPlain(jobs: StepJob[]): Promise<RowsOut[]> {
    const c = this.meta.config;
    const { x, t, y, rows } = this.packRows(jobs);
    const outRow = this.outChannels * this.plane;
    const started = performance.now();
    let out: Float32Array;
    if (this.session) {
      const res = await this.session.run({
        x: { type: 'float32', dims: [rows, c.in_channels, c.input_size, c.input_size], data: x },
        t: { type: 'int64', dims: [rows], data: t },
        y: { type: 'int64', dims: [rows], data: y },
      });
      out = res.outputs.out.data as Float32Array;
    } else {
      const sim = this.config.simulate as { baseMs: number; perRowMs: number };
      await sleep(sim.baseMs + sim.perRowMs * rows);
      out = new Float32Array(rows * outRow);
    }
    const ms = performance.now() - started;
    this.metrics.graphRows.inc({ model: this.name, graph: 'full' }, rows);
    return this.sliceRows(out, jobs, outRow).map((o, i) => ({
      out: o,
      ms,
      cached: false,
      gflops: this.rowsOf(jobs[i]) * this.meta.gflops,
    }));
  }

  /** Head over all the jobs' rows, the decision per job, then tail (full) and skip (cached). */
  private async runWithPolicy(jobs: StepJob[]): Promise<RowsOut[]> {
    const sessions = this.cacheSessions!;
    const store = this.store!;
    const graphs = this.meta.cacheGraphs!;
    const c = this.meta.config;
    const labels = { model: this.name };
    const hidden = this.tokens * this.width;
    const outRow = this.outChannels * this.plane;
    const hDims = (rows: number): number[] => [rows, this.tokens, this.width];

    const { x, t, y, rows } = this.packRows(jobs);
    let started = performance.now();
    const head = await sessions.head.run({
      x: { type: 'float32', dims: [rows, c.in_channels, c.input_size, c.input_size], data: x },
      t: { type: 'int64', dims: [rows], data: t },
      y: { type: 'int64', dims: [rows], data: y },
    });
    const headMs = performance.now() - started;
    this.metrics.graphRows.inc({ ...labels, graph: 'head' }, rows);
    const h1 = this.sliceRows(head.outputs.h1.data as Float32Array, jobs, hidden);
    const r1 = this.sliceRows(head.outputs.r1.data as Float32Array, jobs, hidden);
    const cond = this.sliceRows(head.outputs.c.data as Float32Array, jobs, this.width);

    const states = jobs.map((j) => store.lookup(j.cache!.key, j.cache!.signature));
    const cached = jobs.map((j, i) => decideCached(j.cache!, states[i], r1[i]));
    const full = jobs.map((_, i) => i).filter((i) => !cached[i]);
    const skip = jobs.map((_, i) => i).filter((i) => cached[i]);
    jobs.forEach((j, i) => {
      const outcome = cached[i] ? 'cached' : !states[i] && j.cache!.stepIndex > 0 ? 'miss' : 'full';
      this.metrics.stepCacheSteps.inc({ ...labels, outcome });
    });

    const result: RowsOut[] = new Array<RowsOut>(jobs.length);
    const pick = <T>(xs: T[], idx: number[]): T[] => idx.map((i) => xs[i]);
    if (full.length > 0) {
      const fullRows = full.reduce((sum, i) => sum + this.rowsOf(jobs[i]), 0);
      started = performance.now();
      const tail = await sessions.tail.run({
        h1: { type: 'float32', dims: hDims(fullRows), data: concat(pick(h1, full)) },
        c: { type: 'float32', dims: [fullRows, this.width], data: concat(pick(cond, full)) },
      });
      const ms = headMs + performance.now() - started;
      this.metrics.graphRows.inc({ ...labels, graph: 'tail' }, fullRows);
      const fullJobs = pick(jobs, full);
      const outs = this.sliceRows(tail.outputs.out.data as Float32Array, fullJobs, outRow);
      const residuals = this.sliceRows(tail.outputs.residual.data as Float32Array, fullJobs, hidden);
      full.forEach((i, k) => {
        const step = jobs[i].cache!;
        result[i] = { out: outs[k], ms, cached: false, gflops: this.rowsOf(jobs[i]) * (graphs.head.gflops + graphs.tail.gflops) };
        if (step.stepIndex >= step.numSteps - 1) store.delete(step.key);
        else {
          const adaptive = step.policy.policy === StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE;
          store.store(step.key, {
            signature: step.signature,
            residual: residuals[k].slice(),
            r1: adaptive ? r1[i].slice() : null,
            lastFull: step.stepIndex,
            cachedInARow: 0,
          });
        }
      });
    }
    if (skip.length > 0) {
      const skipRows = skip.reduce((sum, i) => sum + this.rowsOf(jobs[i]), 0);
      started = performance.now();
      const res = await sessions.skip.run({
        h1: { type: 'float32', dims: hDims(skipRows), data: concat(pick(h1, skip)) },
        c: { type: 'float32', dims: [skipRows, this.width], data: concat(pick(cond, skip)) },
        residual: { type: 'float32', dims: hDims(skipRows), data: concat(skip.map((i) => states[i]!.residual)) },
      });
      const ms = headMs + performance.now() - started;
      this.metrics.graphRows.inc({ ...labels, graph: 'skip' }, skipRows);
      const outs = this.sliceRows(res.outputs.out.data as Float32Array, pick(jobs, skip), outRow);
      skip.forEach((i, k) => {
        states[i]!.cachedInARow++;
        result[i] = { out: outs[k], ms, cached: true, gflops: this.rowsOf(jobs[i]) * (graphs.head.gflops + graphs.skip.gflops) };
      });
    }
    return result;
  }

  /** Model rows of a job: its samples, then as many null-label copies when guided. */
  private rowsOf(j: StepJob): number {
    return guidanceRows(j.n, j.scale);
  }

  /** The model inputs of the jobs' rows, [cond rows; uncond rows] per guided job, jobs one after another. */
  private packRows(jobs: StepJob[]): Packed & { rows: number } {
    const c = this.meta.config;
    const rows = jobs.reduce((sum, j) => sum + this.rowsOf(j), 0);
    const packed = {
      x: new Float32Array(rows * c.in_channels * this.plane),
      t: new BigInt64Array(rows),
      y: new BigInt64Array(rows),
    };
    let r = 0;
    for (const j of jobs) r += packGuidedRows(packed, r, j, j.scale, c.num_classes);
    return { ...packed, rows };
  }

  /** The inverse of packRows for a graph output of `rowSize` values per row: each job's rows (views). */
  private sliceRows(out: Float32Array, jobs: StepJob[], rowSize: number): Float32Array[] {
    let r = 0;
    return jobs.map((j) => {
      const used = this.rowsOf(j);
      const rows = out.subarray(r * rowSize, (r + used) * rowSize);
      r += used;
      return rows;
    });
  }

  /** Classifier-free guidance on a job's model rows, then the mean channels only if it asked. */
  private guide(j: StepJob, rowsOut: Float32Array): Float32Array {
    const c = this.meta.config;
    const outRow = this.outChannels * this.plane;
    const guided = combineGuidance(
      rowsOut,
      {
        rows: j.n,
        outChannels: this.outChannels,
        inChannels: c.in_channels,
        plane: this.plane,
        scale: j.scale,
        channels: j.channels,
      },
      new Float32Array(j.n * outRow),
    );
    return j.omitVariance && this.outChannels !== c.in_channels ? meanChannels(guided, j.n, outRow, c.in_channels * this.plane) : guided;
  }

  private sessions(): WorkerSession[] {
    const s = this.cacheSessions;
    return [...(this.session ? [this.session] : []), ...(s ? [s.head, s.tail, s.skip] : [])];
  }

  /** True once an inference worker (model or step-cache graph) has exited: this replica can never serve again. */
  get dead(): boolean {
    return this.sessions().some((s) => s.dead);
  }

  /** Calls `fn` once when any inference worker exits (see WorkerSession.onDead). */
  onDead(fn: (err: Error) => void): void {
    let called = false;
    for (const s of this.sessions()) {
      s.onDead((err) => {
        if (called) return;
        called = true;
        fn(err);
      });
    }
  }

  /** Refuses new steps, lets queued and running ones finish, then releases the models and the states. */
  async close(): Promise<void> {
    this.stopping = true;
    await this.batcher.whenIdle();
    await Promise.all([this.session?.close(), this.cacheSessions?.close()]);
    this.store?.clear();
  }
}

/** The arrays one after another in a new buffer (graph inputs are transferred to the worker). */
function concat(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((sum, p) => sum + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
