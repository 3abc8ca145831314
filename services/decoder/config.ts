// Decoder configuration: validated once, defaults filled; the rest of the service sees only this.
import { z } from 'zod';
import { compileConfig, fieldDefault } from '../../shared/config.ts';

const schema = z.object({
  /** VAE model directory (model.json + model.onnx) built by `ditpipe model build vae`. */
  modelDir: z.string().min(1),
  /** Name served under; default the model.json name. */
  name: z
    .string()
    .regex(/^[A-Za-z0-9_-]+$/, 'letters, digits, "-" and "_" only')
    .optional(),
  executionProvider: z.enum(['cpu', 'cuda']).default('cpu'),
  /** onnxruntime intra-op threads; 0 = onnxruntime's choice (all cores). */
  intraOpThreads: z.number().int().min(0).default(0),
  /** Most images one forward pass decodes. */
  maxBatch: z.number().int().min(1).max(1024).default(16),
  /** Longest wait for more latents before a decode starts, in milliseconds. */
  maxWaitMs: z.number().min(0).max(1000).default(5),
});

export type DecoderConfig = z.output<typeof schema>;
export type DecoderConfigInput = z.input<typeof schema>;

/** The schema's default of one field (for --help; the CLI passes only what the user set). */
export function decoderConfigDefault<K extends keyof typeof schema.shape>(key: K): DecoderConfig[K] {
  return fieldDefault(schema, key) as DecoderConfig[K];
}

/** Validates and completes the configuration; errors name the field. */
export function compileDecoderConfig(input: DecoderConfigInput): DecoderConfig {
  return compileConfig('decoder', schema, input);
}
