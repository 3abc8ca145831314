// Scheduler configuration: validated once, defaults filled; the rest of the service sees only this.
import { z } from 'zod';
import { SAMPLERS, type SamplerName } from '../../shared/diffusion/sampler/registry.ts';
import { compileConfig, fieldDefault } from '../../shared/config.ts';

const name = z.string().regex(/^[A-Za-z0-9_-]+$/, 'letters, digits, "-" and "_" only');

const schema = z.object({
  /** DiT model names to serve (denoisers announce them on the bus). At least one. */
  models: z.array(name).min(1),
  /** VAE name per model when the model's own model.json does not name one. */
  vae: z.record(z.string(), name).default({}),
  /** Admission control: most images being sampled or decoded at once; more → RESOURCE_EXHAUSTED. */
  maxSamplesInFlight: z.number().int().min(1).default(256),
  /** Most images one request may ask for. */
  maxImagesPerRequest: z.number().int().min(1).max(1024).default(64),
  /** Default steps per sampler when a request leaves num_steps unset; each sampler's own default (its file in shared/diffusion/sampler/). */
  defaultSteps: z
    .object(
      Object.fromEntries(SAMPLERS.map((s) => [s.name, z.number().int().min(1).max(1000).default(s.defaultSteps)])) as Record<
        SamplerName,
        z.ZodDefault<z.ZodNumber>
      >,
    )
    .prefault({}),
  /** Default classifier-free guidance scale (the DiT sampling script's default). */
  defaultCfgScale: z.number().min(1).default(4),
  /**
   * The longest one denoiser may hold a step: past it, the work queue gives the step to another
   * replica (and the replica counts as stuck). Without a client deadline a request waits for a
   * step at most this times the queue's deliveries.
   */
  stepTimeoutMs: z.number().int().min(1).default(30_000),
  /** The same for one decode. */
  decodeTimeoutMs: z.number().int().min(1).default(60_000),
  /** How long model descriptions from the denoisers stay cached. */
  modelInfoTtlMs: z.number().int().min(0).default(5_000),
  /**
   * Budget of the repeat cache in MiB (fractions allowed): finished images kept to answer exact
   * repeats without sampling (repeat-cache.ts). 0 turns it off.
   */
  repeatCacheMiB: z
    .number()
    .min(0)
    .max(1024 * 1024)
    .default(64),
});

export type SchedulerConfig = z.output<typeof schema>;
export type SchedulerConfigInput = z.input<typeof schema>;

/** The schema's default of one field (for --help; the CLI passes only what the user set). */
export function schedulerConfigDefault<K extends keyof typeof schema.shape>(key: K): SchedulerConfig[K] {
  return fieldDefault(schema, key) as SchedulerConfig[K];
}

/** Validates and completes the configuration; errors name the field. */
export function compileSchedulerConfig(input: SchedulerConfigInput): SchedulerConfig {
  return compileConfig('scheduler', schema, input);
}
