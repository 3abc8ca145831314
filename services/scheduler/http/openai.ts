// The OpenAI images API's request and answer shapes, translated to and from the Sampler API's
// messages. Only the shape is checked here (types, names of enum values, conversions the JSON
// needs, such as a uint64 seed); every value the Sampler API accepts is judged by the scheduler
// itself (Scheduler.generate), exactly as for a gRPC request.
import { z } from 'zod';
import { GuidanceChannels, StepCacheOptions, StepCachePolicy } from '../../../shared/gen/ditpipe/v1/common.ts';
import {
  CachePolicy,
  OutputFormat,
  PreviewMethod,
  SamplerKind,
  type ClassLabel,
  type GenerateRequest,
  type GenerateResponse,
  type Image,
  type ModelInfo,
  type Preview,
  type Timings,
} from '../../../shared/gen/ditpipe/v1/sampler.ts';
import { DEFAULT_SAMPLER, SAMPLER_NAMES } from '../../../shared/diffusion/sampler/registry.ts';
import { SAMPLER_KINDS } from '../../../shared/sampler-kinds.ts';
import type { SchedulerConfig } from '../config.ts';
import { badRequest } from './errors.ts';

/** Most images one HTTP request may name before the scheduler's own (configurable) limit applies. */
const MAX_N = 1024;

const seed = z.union([
  z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  z.string().regex(/^\d{1,20}$/, 'must be a decimal integer string'),
]);

/** ditpipe's own parameters: the `ditpipe` object of a request (all optional). */
export const ditpipeExtension = z.strictObject({
  steps: z.number().optional(),
  sampler: z.enum(SAMPLER_NAMES).optional(),
  cfg_scale: z.number().optional(),
  guidance_channels: z.enum(['three', 'all']).optional(),
  eta: z.number().optional(),
  seed: seed.optional(),
  preview: z
    .strictObject({
      every_steps: z.number().int().min(0).max(1000),
      method: z.enum(['decoder', 'projection']).optional(),
    })
    .optional(),
  cache: z.enum(['use', 'bypass']).optional(),
  /** Step caching: a preset's name, or a policy and its settings (StepCacheOptions). */
  step_cache: z
    .union([
      z.string(),
      z.strictObject({
        policy: z.enum(['interval', 'adaptive']),
        interval: z.number().optional(),
        threshold: z.number().optional(),
        warmup_steps: z.number().optional(),
        max_cached_steps: z.number().optional(),
      }),
    ])
    .optional(),
  timeout_ms: z
    .number()
    .int()
    .min(1)
    .max(24 * 3600 * 1000)
    .optional(),
});
export type DitpipeExtension = z.infer<typeof ditpipeExtension>;

/** The ditpipe object's step_cache as StepCacheOptions (the scheduler checks the values). */
function stepCacheOf(v: DitpipeExtension['step_cache']): StepCacheOptions | undefined {
  if (v === undefined) return undefined;
  if (typeof v === 'string') return StepCacheOptions.fromPartial({ preset: v });
  return StepCacheOptions.fromPartial({
    policy: v.policy === 'interval' ? StepCachePolicy.STEP_CACHE_POLICY_INTERVAL : StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE,
    interval: v.interval,
    threshold: v.threshold,
    warmupSteps: v.warmup_steps,
    maxCachedSteps: v.max_cached_steps,
  });
}

/** POST /v1/images/generations. OpenAI fields ditpipe has no use for (quality, style, user, ...) are ignored. */
export const imagesRequest = z.object({
  model: z.string().optional(),
  prompt: z.union([z.string(), z.number().int()]),
  n: z.number().int().min(0).max(MAX_N).nullish(),
  size: z.string().nullish(),
  response_format: z.string().nullish(),
  output_format: z.string().nullish(),
  stream: z.boolean().nullish(),
  partial_images: z.number().int().min(0).max(1000).nullish(),
  ditpipe: ditpipeExtension.optional(),
});
export type ImagesRequest = z.infer<typeof imagesRequest>;

/** Parses a request body; a shape error is INVALID_ARGUMENT naming the field by its JSON path. */
export function parseImagesRequest(body: unknown): ImagesRequest {
  const r = imagesRequest.safeParse(body);
  if (r.success) return r.data;
  const issue = r.error.issues[0];
  const path = [...issue.path.map(String), ...(issue.code === 'unrecognized_keys' ? [issue.keys[0]] : [])].join('.');
  const message = issue.code === 'unrecognized_keys' ? `unknown field (see the ditpipe extension object in the README)` : issue.message;
  throw badRequest(`${path || 'body'}: ${message}`, path || null);
}

/** "Sandal" or "5" (or 5): the prompt of a class-conditional model is its class. */
function classLabel(prompt: string | number): ClassLabel {
  if (typeof prompt === 'number') return { index: prompt };
  const p = prompt.trim();
  return /^\d+$/.test(p) ? { index: Number(p) } : { name: p };
}

function seedOf(v: number | string | undefined): bigint | undefined {
  if (v === undefined) return undefined;
  const s = BigInt(v);
  if (s >= 2n ** 64n) throw badRequest('ditpipe.seed: must be within 0..2^64-1', 'ditpipe.seed');
  return s;
}

/** The Sampler API request an HTTP request stands for, and what only the HTTP layer uses. */
export function toGenerateRequest(
  r: ImagesRequest,
  config: SchedulerConfig,
): { request: GenerateRequest; stream: boolean; timeoutMs: number | undefined } {
  if (r.response_format === 'url') {
    throw badRequest('response_format: "url" is not served (ditpipe serves no image files to link to); use "b64_json"', 'response_format');
  }
  if (r.response_format != null && r.response_format !== 'b64_json') {
    throw badRequest(`response_format: must be "b64_json", got "${r.response_format}"`, 'response_format');
  }
  if (r.output_format != null && r.output_format !== 'png') {
    throw badRequest(`output_format: ditpipe makes PNG images only, got "${r.output_format}"`, 'output_format');
  }
  const x = r.ditpipe ?? {};
  const stream = r.stream === true;
  const sampler = x.sampler === undefined ? SamplerKind.SAMPLER_KIND_UNSPECIFIED : SAMPLER_KINDS[x.sampler];
  let preview = x.preview
    ? {
        everySteps: x.preview.every_steps,
        method: x.preview.method === 'projection' ? PreviewMethod.PREVIEW_METHOD_PROJECTION : PreviewMethod.PREVIEW_METHOD_DECODER,
      }
    : undefined;
  // OpenAI's streaming knob: that many previews, spread evenly over the steps.
  if (!preview && stream && r.partial_images) {
    const steps = typeof x.steps === 'number' ? x.steps : config.defaultSteps[x.sampler ?? DEFAULT_SAMPLER];
    preview = { everySteps: Math.max(1, Math.ceil(steps / (r.partial_images + 1))), method: PreviewMethod.PREVIEW_METHOD_DECODER };
  }
  const n = r.n ?? 1;
  const label = classLabel(r.prompt);
  return {
    request: {
      model: r.model ?? config.models[0],
      classLabels: Array.from({ length: n }, () => ({ ...label })),
      numSteps: x.steps,
      sampler,
      cfgScale: x.cfg_scale,
      guidanceChannels:
        x.guidance_channels === 'all'
          ? GuidanceChannels.GUIDANCE_CHANNELS_ALL
          : x.guidance_channels === 'three'
            ? GuidanceChannels.GUIDANCE_CHANNELS_THREE
            : GuidanceChannels.GUIDANCE_CHANNELS_UNSPECIFIED,
      eta: x.eta,
      seed: seedOf(x.seed),
      outputFormat: OutputFormat.OUTPUT_FORMAT_PNG,
      preview,
      cachePolicy:
        x.cache === 'bypass'
          ? CachePolicy.CACHE_POLICY_BYPASS
          : x.cache === 'use'
            ? CachePolicy.CACHE_POLICY_USE
            : CachePolicy.CACHE_POLICY_UNSPECIFIED,
      stepCache: stepCacheOf(x.step_cache),
    },
    stream,
    timeoutMs: x.timeout_ms,
  };
}

const b64 = (png: Uint8Array): string => Buffer.from(png.buffer, png.byteOffset, png.byteLength).toString('base64');
const now = (): number => Math.floor(Date.now() / 1000);

export function timingsJson(t: Timings | undefined): Record<string, number> {
  return { queue_ms: t?.queueMs ?? 0, denoise_ms: t?.denoiseMs ?? 0, decode_ms: t?.decodeMs ?? 0, total_ms: t?.totalMs ?? 0 };
}

function imageInfo(img: Image): Record<string, unknown> {
  return {
    image_index: img.sampleIndex,
    class_label: img.classLabel,
    class_name: img.className,
    seed: String(img.seed),
    cached: img.cached,
  };
}

/** The answer of a non-streaming request, in OpenAI's ImagesResponse shape plus a `ditpipe` object. */
export function imagesResponse(res: GenerateResponse): Record<string, unknown> {
  const first = res.images[0];
  return {
    created: now(),
    data: res.images.map((img) => ({ b64_json: b64(img.png), revised_prompt: img.className || String(img.classLabel) })),
    output_format: 'png',
    size: first ? `${first.width}x${first.height}` : undefined,
    background: 'opaque',
    ditpipe: {
      request_id: res.requestId,
      model: res.model,
      seed: String(res.seed),
      num_steps: res.numSteps,
      sampling_gflops: res.samplingGflops,
      timings: timingsJson(res.timings),
      images: res.images.map(imageInfo),
    },
  };
}

/** Stream event: a preview, as OpenAI's partial image event. */
export function partialImageEvent(p: Preview, index: number): Record<string, unknown> {
  return {
    type: 'image_generation.partial_image',
    b64_json: b64(p.png),
    partial_image_index: index,
    created_at: now(),
    size: `${p.width}x${p.height}`,
    output_format: 'png',
    background: 'opaque',
    quality: 'auto',
    ditpipe: {
      image_index: p.sampleIndex,
      step: p.step,
      num_steps: p.numSteps,
      method: p.method === PreviewMethod.PREVIEW_METHOD_PROJECTION ? 'projection' : 'decoder',
    },
  };
}

/** Stream event: one final image, as OpenAI's completed event. */
export function completedImageEvent(img: Image, timings: Timings | undefined): Record<string, unknown> {
  return {
    type: 'image_generation.completed',
    b64_json: b64(img.png),
    created_at: now(),
    size: `${img.width}x${img.height}`,
    output_format: 'png',
    background: 'opaque',
    quality: 'auto',
    ditpipe: { ...imageInfo(img), timings: timingsJson(timings) },
  };
}

/** GET /v1/models entry: OpenAI's model object plus what ditpipe knows of it. */
export function modelObject(m: ModelInfo, created: number): Record<string, unknown> {
  return {
    id: m.name,
    object: 'model',
    created,
    owned_by: 'ditpipe',
    ditpipe: {
      class_names: m.classNames,
      num_classes: m.numClasses,
      image_size: m.imageSize,
      image_channels: m.imageChannels,
      params: Number(m.params),
      gflops: m.gflops,
      replicas: m.replicas,
      decoder_replicas: m.decoderReplicas,
      config: m.config,
    },
  };
}
