// What the scheduler knows of each served model, learnt from the denoisers and decoders on the bus
// (their Info methods, asked of every replica, first answer wins) and refreshed in the background
// every modelInfoTtlMs (5 s), so validation needs no round trip per request.
import { FailedPreconditionError, NotFoundError, UnavailableError, toDitpipeError } from '../../shared/errors.ts';
import type { DecoderDefinition, DecoderInfo } from '../../shared/gen/ditpipe/v1/decoder.ts';
import type { DenoiserDefinition, DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import type { ModelInfo } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { servedImageSize } from '../../shared/image/crop.ts';
import type { ClientWorkEvent, QueueSettings, RpcClient, Transport } from '../../shared/transport/types.ts';
import type { SchedulerConfig } from './config.ts';
import { RateLimitedLog, silentLogger, type Logger } from '../../shared/log.ts';

export interface CatalogOptions {
  queueSettings?: Partial<QueueSettings>;
  /** Where failures of background refreshes and optional look-ups go (they fail no request); default: nowhere. */
  log?: Logger;
  /** Work events of the denoiser and decoder clients, for metrics. */
  onWorkEvent?: (service: 'denoiser' | 'decoder', event: ClientWorkEvent) => void;
}

export interface ServedModel {
  name: string;
  denoiser: DenoiserInfo;
  decoder: DecoderInfo | null;
  vae: string;
  /** Lower-cased class name → index. */
  classIndex: Map<string, number>;
}

interface Entry {
  model: ServedModel;
  expires: number;
}

export class Catalog {
  private readonly cache = new Map<string, Entry>();
  private readonly loading = new Map<string, Promise<ServedModel>>();
  private readonly denoisers = new Map<string, RpcClient<typeof DenoiserDefinition>>();
  private readonly decoders = new Map<string, RpcClient<typeof DecoderDefinition>>();
  private readonly events: RateLimitedLog;

  constructor(
    private readonly transport: Transport,
    private readonly config: SchedulerConfig,
    private readonly definitions: { denoiser: typeof DenoiserDefinition; decoder: typeof DecoderDefinition },
    private readonly opts: CatalogOptions = {},
  ) {
    this.events = new RateLimitedLog(opts.log ?? silentLogger());
  }

  denoiserClient(model: string): RpcClient<typeof DenoiserDefinition> {
    let c = this.denoisers.get(model);
    if (!c) {
      c = this.transport.client(this.definitions.denoiser, {
        scope: model,
        timeoutMs: this.config.stepTimeoutMs,
        attemptTimeoutMs: this.config.stepTimeoutMs,
        queueSettings: this.opts.queueSettings,
        onWorkEvent: (ev) => this.opts.onWorkEvent?.('denoiser', ev),
      });
      this.denoisers.set(model, c);
    }
    return c;
  }

  decoderClient(vae: string): RpcClient<typeof DecoderDefinition> {
    let c = this.decoders.get(vae);
    if (!c) {
      c = this.transport.client(this.definitions.decoder, {
        scope: vae,
        timeoutMs: this.config.decodeTimeoutMs,
        attemptTimeoutMs: this.config.decodeTimeoutMs,
        queueSettings: this.opts.queueSettings,
        onWorkEvent: (ev) => this.opts.onWorkEvent?.('decoder', ev),
      });
      this.decoders.set(vae, c);
    }
    return c;
  }

  /** Models and VAEs whose clients exist, with their clients (for reading their queues). */
  clients(): { denoisers: Map<string, RpcClient<typeof DenoiserDefinition>>; decoders: Map<string, RpcClient<typeof DecoderDefinition>> } {
    return { denoisers: this.denoisers, decoders: this.decoders };
  }

  /** The model's description; NOT_FOUND for names not configured, UNAVAILABLE when no denoiser answers. */
  async get(name: string): Promise<ServedModel> {
    if (!this.config.models.includes(name)) {
      throw new NotFoundError(`model "${name}" is not served here; available: ${this.config.models.join(', ')}`);
    }
    const hit = this.cache.get(name);
    if (hit && hit.expires > Date.now()) return hit.model;
    let p = this.loading.get(name);
    if (!p) {
      p = this.load(name).finally(() => this.loading.delete(name));
      this.loading.set(name, p);
    }
    // A stale description is refreshed in the background: no request waits for a round trip
    // once the model was seen, and one that fails (no denoiser answers) keeps the old one.
    if (hit) {
      p.catch((err: unknown) =>
        this.events.event(
          'warn',
          `refresh|${name}`,
          { model: name, err: toDitpipeError(err).message },
          `model "${name}": refreshing its description failed; keeping the one from ${new Date(hit.expires - this.config.modelInfoTtlMs).toISOString()}`,
        ),
      );
      return hit.model;
    }
    return await p;
  }

  private async load(name: string): Promise<ServedModel> {
    let denoiser: DenoiserInfo;
    try {
      denoiser = await this.denoiserClient(name).info({}, { timeoutMs: Math.min(this.config.stepTimeoutMs, 10_000) });
    } catch (err) {
      const e = toDitpipeError(err);
      throw new UnavailableError(`no denoiser answers for model "${name}": ${e.message}`, { cause: e });
    }
    const vae = denoiser.vae || this.config.vae[name] || '';
    let decoder: DecoderInfo | null = null;
    if (vae) {
      try {
        decoder = await this.decoderClient(vae).info({}, { timeoutMs: Math.min(this.config.decodeTimeoutMs, 10_000) });
      } catch (err) {
        decoder = null; // PNG requests fail with UNAVAILABLE until a decoder shows up; raw latents still work
        this.events.event(
          'info',
          `decoder|${vae}`,
          { model: name, vae, err: toDitpipeError(err).message },
          `model "${name}": no decoder answers for VAE "${vae}" yet; raw latents work, PNG requests wait for one`,
        );
      }
    }
    const model: ServedModel = {
      name,
      denoiser,
      decoder,
      vae,
      classIndex: new Map(denoiser.classNames.map((n, i) => [n.toLowerCase(), i])),
    };
    this.cache.set(name, { model, expires: Date.now() + this.config.modelInfoTtlMs });
    return model;
  }

  /** The decoder of a model, or an error saying why images cannot be decoded. */
  async decoderFor(model: ServedModel): Promise<{ vae: string; info: DecoderInfo }> {
    if (!model.vae) {
      throw new FailedPreconditionError(
        `model "${model.name}" names no VAE (set one for the scheduler) — ask for OUTPUT_FORMAT_RAW_LATENT or configure a VAE`,
      );
    }
    if (model.decoder) return { vae: model.vae, info: model.decoder };
    // No decoder answered when the description was cached: ask again now rather than trust that
    // (a decoder that started a moment after the denoiser is there by now).
    try {
      const info = await this.decoderClient(model.vae).info({}, { timeoutMs: Math.min(this.config.decodeTimeoutMs, 2_000) });
      model.decoder = info;
      return { vae: model.vae, info };
    } catch (err) {
      throw new UnavailableError(`no decoder answers for VAE "${model.vae}" of model "${model.name}": ${toDitpipeError(err).message}`, {
        cause: err,
      });
    }
  }

  /** Every configured model with replica counts (models without a live denoiser are left out). */
  async list(): Promise<ModelInfo[]> {
    const out: ModelInfo[] = [];
    for (const name of this.config.models) {
      let m: ServedModel;
      try {
        m = await this.get(name);
      } catch (err) {
        this.events.event(
          'info',
          `list|${name}`,
          { model: name, err: toDitpipeError(err).message },
          `ListModels leaves out model "${name}": ${toDitpipeError(err).message}`,
        );
        continue;
      }
      const [denoisers, decoders] = await Promise.all([
        this.denoiserClient(name).collect('info', {}, { waitMs: 150 }),
        m.vae ? this.decoderClient(m.vae).collect('info', {}, { waitMs: 150 }) : Promise.resolve([]),
      ]);
      const c = m.denoiser.config;
      const upsample = m.decoder?.upsample ?? 8;
      out.push({
        name,
        config: c,
        numClasses: c?.numClasses ?? 0,
        classNames: m.denoiser.classNames,
        params: m.denoiser.params,
        gflops: m.denoiser.gflops,
        replicas: new Set(denoisers.map((d) => d.instanceId)).size,
        imageSize: servedImageSize(c?.inputSize ?? 0, { upsample, outputCrop: m.decoder?.outputCrop }).width,
        imageChannels: m.decoder?.outChannels ?? 0,
        decoderReplicas: new Set(decoders.map((d) => d.instanceId)).size,
      });
    }
    return out;
  }
}
