// Denoiser configuration: validated once, defaults filled; the rest of the service sees only this.
import { z } from 'zod';
import { InvalidArgumentError } from '../../shared/errors.ts';
import { compileConfig, fieldDefault } from '../../shared/config.ts';

const schema = z.object({
  /** Model directory (model.json + model.onnx) built by `ditpipe model build dit`. */
  modelDir: z.string().min(1),
  /** Name served under; default the model.json name. */
  name: z
    .string()
    .regex(/^[A-Za-z0-9_-]+$/, 'letters, digits, "-" and "_" only')
    .optional(),
  executionProvider: z.enum(['cpu', 'cuda']).default('cpu'),
  /** onnxruntime intra-op threads; 0 = onnxruntime's choice (all cores). */
  intraOpThreads: z.number().int().min(0).default(0),
  /** Row budget of one forward pass (guidance rows count). */
  maxBatchRows: z.number().int().min(1).max(4096).default(64),
  /** Longest wait for more steps before a forward pass starts, in milliseconds. */
  maxWaitMs: z.number().min(0).max(1000).default(2),
  /**
   * MiB of per-request step-cache state (block-stack residuals of requests that asked for step
   * caching); fractions allowed, 0 = off (cached-policy steps then run as full steps).
   */
  stepCacheMib: z
    .number()
    .min(0)
    .max(1024 * 1024)
    .default(256),
  /**
   * Simulation: instead of running the model, sleep `baseMs + perRowMs × rows` per forward pass and
   * answer zeros. For scheduler capacity and scale tests.
   */
  simulate: z.object({ baseMs: z.number().min(0), perRowMs: z.number().min(0) }).optional(),
});

export type DenoiserConfig = z.output<typeof schema>;
export type DenoiserConfigInput = z.input<typeof schema>;

/** The schema's default of one field (for --help; the CLI passes only what the user set). */
export function denoiserConfigDefault<K extends keyof typeof schema.shape>(key: K): DenoiserConfig[K] {
  return fieldDefault(schema, key) as DenoiserConfig[K];
}

/** Validates and completes the configuration; errors name the field. */
export function compileDenoiserConfig(input: DenoiserConfigInput): DenoiserConfig {
  return compileConfig('denoiser', schema, input);
}

/** Parses "a+b" or "a,b" (milliseconds per pass, per row) as given on the command line. */
export function parseSimulate(spec: string): { baseMs: number; perRowMs: number } {
  const m = /^\s*([0-9.]+)\s*[+,]\s*([0-9.]+)\s*$/.exec(spec);
  if (!m)
    throw new InvalidArgumentError(`simulate: expected "<ms per pass>+<ms per row>", e.g. "20+1.5", got "${spec}"`, { field: 'simulate' });
  return { baseMs: Number(m[1]), perRowMs: Number(m[2]) };
}
