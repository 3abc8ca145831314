// The decoder: turns sampled latents into images with a VAE decoder. Latents from many requests
// share a forward pass (latents of one size per pass); the model directory's output crop and PNG
// encoding run on the inference thread.
import { randomUUID } from 'node:crypto';
import { Batcher } from '../../shared/batching.ts';
import { InvalidArgumentError, NotFoundError, UnavailableError } from '../../shared/errors.ts';
import {
  ImageFormat,
  type DecodeRequest,
  type DecodeResponse,
  type DecoderDefinition,
  type DecoderInfo,
} from '../../shared/gen/ditpipe/v1/decoder.ts';
import { croppedSize, isNoCrop } from '../../shared/image/crop.ts';
import { decoderMetrics, type DecoderMetrics } from '../../shared/metrics.ts';
import { graphRevisionOf, readVaeModelDir, type VaeModelJson } from '../../shared/model/modeldir.ts';
import { WorkerSession } from '../../shared/runtime/session.ts';
import { f32Tensor, readF32Tensor } from '../../shared/tensor.ts';
import type { CallContext, ServiceImpl, WorkSource } from '../../shared/transport/types.ts';
import type { DecoderConfig } from './config.ts';

interface DecodeJob {
  n: number;
  h: number;
  w: number;
  latents: Float32Array;
  png: boolean;
}

interface Decoded {
  pngs: Uint8Array[];
  raw: Float32Array | null;
  shape: number[];
  ms: number;
}

export class Decoder {
  readonly name: string;
  readonly info: DecoderInfo;
  readonly metrics: DecoderMetrics;
  readonly upsample: number;
  private readonly batcher: Batcher<DecodeJob, Decoded>;
  private stopping = false;

  private constructor(
    readonly config: DecoderConfig,
    readonly meta: VaeModelJson,
    private readonly session: WorkerSession,
    metrics: DecoderMetrics,
  ) {
    this.name = config.name ?? meta.name;
    this.metrics = metrics;
    this.upsample = 2 ** (meta.config.block_out_channels.length - 1);
    this.info = {
      model: this.name,
      latentChannels: meta.config.latent_channels,
      outChannels: meta.config.out_channels,
      upsample: this.upsample,
      scalingFactor: meta.scalingFactor,
      params: BigInt(meta.params),
      gflops: meta.gflops,
      maxBatch: config.maxBatch,
      executionProvider: config.executionProvider,
      instanceId: randomUUID(),
      outputCrop: meta.outputCrop,
      sourceSha256: meta.source.sha256,
      weightDtype: meta.weightDtype,
      graphRevision: graphRevisionOf(meta),
    };
    this.batcher = new Batcher((jobs, rows) => this.forward(jobs, rows), {
      maxRows: config.maxBatch,
      maxWaitMs: config.maxWaitMs,
      unit: 'images',
    });
  }

  static async create(config: DecoderConfig, metrics: DecoderMetrics = decoderMetrics()): Promise<Decoder> {
    const dir = readVaeModelDir(config.modelDir);
    const session = await WorkerSession.create(dir.onnxPath, {
      executionProvider: config.executionProvider,
      intraOpThreads: config.intraOpThreads,
    });
    return new Decoder(config, dir.meta, session, metrics);
  }

  /** Takes decodes from the VAE's work queue whenever a decode pass can start. */
  attach(source: WorkSource): void {
    this.batcher.attach(source);
  }

  impl(): ServiceImpl<typeof DecoderDefinition> {
    return {
      decode: (req, ctx) => this.decode(req, ctx),
      info: () => this.info,
    };
  }

  async decode(req: DecodeRequest, ctx?: Pick<CallContext, 'signal'>): Promise<DecodeResponse> {
    if (this.stopping) throw new UnavailableError(`decoder ${this.info.instanceId} is shutting down`);
    if (req.model !== this.name) throw new NotFoundError(`VAE "${req.model}" is not served here (this decoder serves "${this.name}")`);
    const { shape, data } = readF32Tensor(req.latents, 'latents', [null, this.meta.config.latent_channels, null, null]);
    const fmt = req.format;
    if (fmt !== ImageFormat.IMAGE_FORMAT_UNSPECIFIED && fmt !== ImageFormat.IMAGE_FORMAT_PNG && fmt !== ImageFormat.IMAGE_FORMAT_RAW) {
      throw new InvalidArgumentError(`format: unknown value ${fmt}`, { field: 'format' });
    }
    const [n, , h, w] = shape;
    const png = fmt !== ImageFormat.IMAGE_FORMAT_RAW;
    if (png && this.meta.config.out_channels !== 1 && this.meta.config.out_channels !== 3) {
      throw new InvalidArgumentError(
        `format: PNG needs 1 or 3 image channels; this VAE makes ${this.meta.config.out_channels} (ask for IMAGE_FORMAT_RAW)`,
        { field: 'format' },
      );
    }
    const served = croppedSize(h * this.upsample, w * this.upsample, this.meta.outputCrop);
    if (served.height < 1 || served.width < 1) {
      throw new InvalidArgumentError(
        `latents: ${h}×${w} latents decode to ${h * this.upsample}×${w * this.upsample} images, nothing left after this VAE's output crop`,
        { field: 'latents' },
      );
    }
    // Latents of one size share a pass.
    const done = await this.batcher.submit({ n, h, w, latents: data, png }, n, ctx?.signal, `${h}x${w}`);
    const labels = { model: this.name };
    this.metrics.queueSeconds.observe(labels, done.queueMs / 1000);
    const r = done.result;
    return {
      png: r.pngs,
      raw: r.raw ? f32Tensor(r.shape, r.raw) : undefined,
      decodeMs: r.ms,
      batchSize: done.batchRows,
    };
  }

  private async forward(jobs: DecodeJob[], images: number): Promise<Decoded[]> {
    const { h, w } = jobs[0];
    const c = this.meta.config.latent_channels;
    const size = c * h * w;
    const z = new Float32Array(images * size);
    const inv = 1 / this.meta.scalingFactor;
    let off = 0;
    for (const j of jobs) {
      for (let i = 0; i < j.latents.length; i++) z[off + i] = j.latents[i] * inv;
      off += j.latents.length;
    }
    const started = performance.now();
    const wantPng = jobs.some((j) => j.png);
    const crop = isNoCrop(this.meta.outputCrop) ? undefined : { output: 'image', margins: this.meta.outputCrop! };
    const res = await this.session.run(
      { z: { type: 'float32', dims: [images, c, h, w], data: z } },
      { crop, png: wantPng ? { output: 'image' } : undefined },
    );
    const ms = performance.now() - started;
    const labels = { model: this.name };
    this.metrics.decodeSeconds.observe(labels, ms / 1000);
    this.metrics.batchSize.observe(labels, images);
    this.metrics.images.inc(labels, images);
    const img = res.outputs.image;
    const [, oc, oh, ow] = img.dims;
    const per = oc * oh * ow;
    let k = 0;
    return jobs.map((j) => {
      const first = k;
      k += j.n;
      return j.png
        ? { pngs: (res.pngs ?? []).slice(first, k), raw: null, shape: [], ms }
        : { pngs: [], raw: (img.data as Float32Array).slice(first * per, k * per), shape: [j.n, oc, oh, ow], ms };
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

  async close(): Promise<void> {
    this.stopping = true;
    await this.batcher.whenIdle();
    await this.session.close();
  }
}
