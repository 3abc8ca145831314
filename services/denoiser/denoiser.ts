// The denoiser: answers denoise steps for one DiT model. Steps from many requests, at different
// timesteps, share a forward pass (continuous batching); classifier-free guidance is applied here,
// so a step on the wire carries one latent per sample and its answer is the guided output.
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Batcher } from '../../shared/batching.ts';
import { combineGuidance, guidanceRows, modelOutChannels, packGuidedRows } from '../../shared/diffusion/guidance.ts';
import { InvalidArgumentError, NotFoundError, UnavailableError } from '../../shared/errors.ts';
import { checkGuidance } from '../../shared/sampling-settings.ts';
import type { DenoiseRequest, DenoiseResponse, DenoiserDefinition, DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { denoiserMetrics, type DenoiserMetrics } from '../../shared/metrics.ts';
import { graphRevisionOf, readDitModelDir, type DitModelJson } from '../../shared/model/modeldir.ts';
import { WorkerSession } from '../../shared/runtime/session.ts';
import { f32Tensor, readF32Tensor } from '../../shared/tensor.ts';
import type { CallContext, ServiceImpl, WorkSource } from '../../shared/transport/types.ts';
import type { DenoiserConfig } from './config.ts';

interface StepJob {
  n: number;
  /** Answer the C mean channels only (see DenoiseRequest.omit_variance). */
  omitVariance: boolean;
  x: Float32Array;
  t: bigint[];
  y: number[];
  scale: number;
  channels: 3 | 'all';
}

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
  private readonly batcher: Batcher<StepJob, { out: Float32Array; forwardMs: number }>;
  private readonly plane: number;
  private readonly outChannels: number;
  private stopping = false;

  private constructor(
    readonly config: DenoiserConfig,
    readonly meta: DitModelJson,
    private readonly session: WorkerSession | null,
    metrics: DenoiserMetrics,
  ) {
    const c = meta.config;
    this.name = config.name ?? meta.name;
    this.plane = c.input_size * c.input_size;
    this.outChannels = modelOutChannels(c.in_channels, c.learn_sigma);
    this.metrics = metrics;
    metrics.modelGflops.set({ model: this.name }, meta.gflops);
    this.batcher = new Batcher((jobs, rows) => this.forward(jobs, rows), {
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

  /** Loads the model (on a worker thread) unless simulating. */
  static async create(config: DenoiserConfig, metrics: DenoiserMetrics = denoiserMetrics()): Promise<Denoiser> {
    const dir = readDitModelDir(config.modelDir);
    const session = config.simulate
      ? null
      : await WorkerSession.create(dir.onnxPath, { executionProvider: config.executionProvider, intraOpThreads: config.intraOpThreads });
    return new Denoiser(config, dir.meta, session, metrics);
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
      return {
        out: f32Tensor([job.n, channels, c.input_size, c.input_size], done.result.out),
        batchRows: done.batchRows,
        queueMs: done.queueMs,
        forwardMs: done.result.forwardMs,
        cacheHolder: '',
        cached: false,
        gflops: guidanceRows(job.n, job.scale) * this.meta.gflops,
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
    return { n, x: data, t: req.t, y: req.y, scale, omitVariance: req.omitVariance, channels };
  }

  /** One forward pass over the rows of several steps: [cond rows; uncond rows] per guided step. */
  private async forward(jobs: StepJob[], rows: number): Promise<Array<{ out: Float32Array; forwardMs: number }>> {
    const c = this.meta.config;
    const rowSize = c.in_channels * this.plane;
    const outRow = this.outChannels * this.plane;
    const x = new Float32Array(rows * rowSize);
    const t = new BigInt64Array(rows);
    const y = new BigInt64Array(rows);
    let r = 0;
    for (const j of jobs) r += packGuidedRows({ x, t, y }, r, j, j.scale, c.num_classes);
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
    const forwardMs = performance.now() - started;
    const labels = { model: this.name };
    this.metrics.queuedRows.set(labels, this.batcher.queuedRows);
    this.metrics.forwardSeconds.observe(labels, forwardMs / 1000);
    this.metrics.batchRows.observe(labels, rows);
    this.metrics.forwardRows.inc(labels, rows);
    this.metrics.samplingGflops.inc(labels, rows * this.meta.gflops);
    r = 0;
    return jobs.map((j) => {
      const used = guidanceRows(j.n, j.scale);
      const rowsOut = out.subarray(r * outRow, (r + used) * outRow);
      r += used;
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
      return {
        out: j.omitVariance && this.outChannels !== c.in_channels ? meanChannels(guided, j.n, outRow, c.in_channels * this.plane) : guided,
        forwardMs,
      };
    });
  }

  /** True once the inference worker has exited: this replica can never serve again. */
  get dead(): boolean {
    return this.session?.dead ?? false;
  }

  /** Calls `fn` if the inference worker exits (see WorkerSession.onDead). */
  onDead(fn: (err: Error) => void): void {
    this.session?.onDead(fn);
  }

  /** Refuses new steps, lets queued and running ones finish, then releases the model. */
  async close(): Promise<void> {
    this.stopping = true;
    await this.batcher.whenIdle();
    await this.session?.close();
  }
}
