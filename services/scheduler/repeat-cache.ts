// The repeat cache: finished images kept so that an exact repeat is answered without sampling.
// Noise is counter-based (seed, sample index, step), so an image's bytes are a function of the
// model and VAE weights (and how they were built: weight dtype, graph revision), the sampling settings, the seed, and the image's class and sample index,
// and of nothing else that runs at the same time. The cache holds one entry per image, keyed by a
// digest of exactly those values (repeatKey), so a request repeating some of an earlier request's
// images gets those and samples only the rest. Bounded by bytes (least recently used out first);
// the scheduler stores only the images of requests that finished successfully.
import { createHash } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import type { SamplerName } from '../../shared/diffusion/sampler/registry.ts';
import { DiTConfig, type GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import type { DecoderInfo } from '../../shared/gen/ditpipe/v1/decoder.ts';
import type { DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import type { Tensor } from '../../shared/gen/ditpipe/v1/tensor.ts';
import type { SchedulerMetrics } from '../../shared/metrics.ts';

/** Changes when the meaning of a key's parts changes, so no older entry can ever match. */
const KEY_VERSION = 'ditpipe-repeat/3';

/** Bytes counted per image besides its own: the key, the entry and the cache's bookkeeping. */
export const ENTRY_OVERHEAD_BYTES = 256;

/** What a request's images are a function of, besides each image's class and sample index. */
export interface RepeatSettings {
  /** The served model: its name, weights (source_sha256) and configuration. */
  denoiser: DenoiserInfo;
  /** The VAE the PNGs are decoded with; null for raw latents (no decoder involved). */
  decoder: { vae: string; info: DecoderInfo } | null;
  sampler: SamplerName;
  numSteps: number;
  cfgScale: number;
  guidance: GuidanceChannels;
  eta: number;
  seed: bigint;
  /** The step-cache settings (describeStepCache); "none" without step caching. */
  stepCache: string;
}

/** What an image's settings made; the rest of an Image (class name, seed, index) comes from the request. */
export interface CachedImage {
  /** PNG bytes (empty for a raw latent). */
  png: Uint8Array;
  /** The final latent (raw latents only). */
  latent?: Tensor;
  width: number;
  height: number;
}

/**
 * The cache key of image `sampleIndex` (class `classLabel`) of a request with these settings: a
 * SHA-256 over a canonical list of every value its bytes depend on. The class is the resolved
 * index, so a class given by name and by index is the same image.
 */
export function repeatKey(s: RepeatSettings, classLabel: number, sampleIndex: number): string {
  const d = s.denoiser;
  const v = s.decoder;
  const crop = v?.info.outputCrop;
  const parts = [
    KEY_VERSION,
    d.model,
    d.sourceSha256,
    d.weightDtype,
    d.graphRevision,
    Buffer.from(DiTConfig.encode(d.config ?? DiTConfig.fromPartial({})).finish()).toString('base64'),
    v
      ? [
          'png',
          v.vae,
          v.info.sourceSha256,
          v.info.weightDtype,
          v.info.graphRevision,
          v.info.latentChannels,
          v.info.outChannels,
          v.info.upsample,
          v.info.scalingFactor,
          crop ? [crop.top, crop.right, crop.bottom, crop.left] : null,
        ]
      : 'raw',
    s.sampler,
    s.numSteps,
    s.cfgScale,
    s.guidance,
    s.eta,
    s.stepCache,
    s.seed.toString(),
    classLabel,
    sampleIndex,
  ];
  return createHash('sha256').update(JSON.stringify(parts)).digest('base64url');
}

function entryBytes(img: CachedImage): number {
  return img.png.byteLength + (img.latent?.data.byteLength ?? 0) + ENTRY_OVERHEAD_BYTES;
}

/** Images by repeatKey within a byte budget; the scheduler's metrics follow every change. */
export class RepeatCache {
  private readonly lru: LRUCache<string, CachedImage> | null;

  constructor(
    readonly maxBytes: number,
    private readonly metrics: SchedulerMetrics,
  ) {
    metrics.repeatCacheMaxBytes.set(maxBytes);
    this.lru =
      maxBytes > 0
        ? new LRUCache<string, CachedImage>({
            maxSize: maxBytes,
            sizeCalculation: entryBytes,
            dispose: (_v, _k, reason) => {
              if (reason === 'evict') metrics.repeatCacheEvictions.inc();
            },
          })
        : null;
  }

  /** False when the budget is 0: nothing is looked up or stored. */
  get enabled(): boolean {
    return this.lru !== null;
  }

  /** The cached image of each key (undefined where none); count() what the request then uses. */
  lookup(keys: readonly string[]): Array<CachedImage | undefined> {
    const lru = this.lru;
    return keys.map((k) => lru?.get(k));
  }

  /** Counts the hits and misses of an admitted request's lookup. */
  count(hits: number, misses: number): void {
    this.metrics.repeatCacheHits.inc(hits);
    this.metrics.repeatCacheMisses.inc(misses);
  }

  /**
   * Keeps an image of a finished request, in buffers of its own (the ones given may be views into
   * a larger message). An image larger than the whole budget is not kept.
   */
  store(key: string, img: CachedImage): void {
    if (!this.lru) return;
    const latent = img.latent && { ...img.latent, shape: [...img.latent.shape], data: img.latent.data.slice() };
    this.lru.set(key, { png: img.png.slice(), latent, width: img.width, height: img.height });
    this.metrics.repeatCacheBytes.set(this.lru.calculatedSize);
    this.metrics.repeatCacheImages.set(this.lru.size);
  }
}
