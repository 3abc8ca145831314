// A model directory: `model.onnx` (+ `model.onnx.data` for large weights) and `model.json`, which
// says what the graph is, so services and the CLI never have to open the ONNX file to learn it.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { imageCropSchema } from '../image/crop.ts';
import { writeOnnx, type WriteOptions } from '../onnx/write.ts';
import type { Graph } from '../onnx/graph.ts';
import { VERSION } from '../version.ts';

export const MODEL_JSON = 'model.json';
export const MODEL_ONNX = 'model.onnx';

const ioSpec = z.object({
  name: z.string(),
  dtype: z.enum(['float32', 'float16', 'int64', 'int32', 'bool']),
  shape: z.array(z.union([z.number().int(), z.string()])),
});

export const ditConfigSchema = z.object({
  input_size: z.number().int().positive(),
  patch_size: z.number().int().positive(),
  in_channels: z.number().int().positive(),
  hidden_size: z.number().int().positive(),
  depth: z.number().int().positive(),
  num_heads: z.number().int().positive(),
  num_classes: z.number().int().positive(),
  learn_sigma: z.boolean(),
});
export type DitConfig = z.infer<typeof ditConfigSchema>;

export const vaeConfigSchema = z.object({
  latent_channels: z.number().int().positive(),
  block_out_channels: z.array(z.number().int().positive()).min(1),
  layers_per_block: z.number().int().positive(),
  norm_num_groups: z.number().int().positive(),
  out_channels: z.number().int().positive(),
  /** Latent height/width the model is usually run at (the graph itself takes any size). */
  latent_size: z.number().int().positive().optional(),
});
export type VaeConfig = z.infer<typeof vaeConfigSchema>;

const common = {
  format: z.literal('ditpipe-model'),
  version: z.literal(1),
  /** Name services advertise the model under. */
  name: z.string().min(1),
  inputs: z.array(ioSpec),
  outputs: z.array(ioSpec),
  params: z.number().int().nonnegative(),
  /** Multiply-accumulates per forward pass at batch 1, in units of 1e9 (the DiT paper's "Gflops"). */
  gflops: z.number().nonnegative(),
  flopsConvention: z.literal('multiply-accumulates'),
  weightDtype: z.enum(['float32', 'float16']),
  onnx: z.string(),
  externalData: z.string().nullable(),
  source: z.object({ file: z.string(), format: z.string(), sha256: z.string().regex(/^[0-9a-f]{64}$/) }),
  createdBy: z.string(),
  /**
   * Revision of the graphs the compiler emits (GRAPH_REVISION when written; absent means 1). Same
   * weights, same numbers to float rounding; a newer revision may run faster. Caches rebuild on it.
   */
  graphRevision: z.number().int().positive().optional(),
};

export const modelJsonSchema = z.discriminatedUnion('kind', [
  z.object({
    kind: z.literal('dit'),
    ...common,
    config: ditConfigSchema,
    /** Optional human names for the class labels, index = label. */
    classNames: z.array(z.string()).optional(),
    /** Name of the VAE decoder whose latent space the model samples in, when known. */
    vae: z.string().optional(),
  }),
  z.object({
    kind: z.literal('vae-decoder'),
    ...common,
    config: vaeConfigSchema,
    /** Latents produced by sampling are divided by this before decoding (SD: 0.18215). */
    scalingFactor: z.number().positive(),
    /**
     * Pixels the decoder removes from each edge of every decoded image (an autoencoder trained on
     * padded images); absent means none. The graph itself is not cropped: the decoder applies it.
     */
    outputCrop: imageCropSchema.optional(),
  }),
]);
export type ModelJson = z.infer<typeof modelJsonSchema>;
export type DitModelJson = Extract<ModelJson, { kind: 'dit' }>;
export type VaeModelJson = Extract<ModelJson, { kind: 'vae-decoder' }>;

export class ModelDirError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ModelDirError';
  }
}

export interface ModelDir<M extends ModelJson = ModelJson> {
  dir: string;
  onnxPath: string;
  meta: M;
}

/** Reads and validates `<dir>/model.json`; errors name the directory and the offending field. */
export function readModelDir(dir: string): ModelDir {
  const path = join(dir, MODEL_JSON);
  if (!existsSync(path)) throw new ModelDirError(`${dir} is not a model directory: ${MODEL_JSON} is missing`);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new ModelDirError(`${path}: not valid JSON (${(err as Error).message})`);
  }
  const parsed = modelJsonSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ModelDirError(`${path}: field "${issue.path.join('.') || '(root)'}": ${issue.message}`);
  }
  const onnxPath = join(dir, parsed.data.onnx);
  if (!existsSync(onnxPath)) throw new ModelDirError(`${dir}: ${parsed.data.onnx} is missing`);
  return { dir, onnxPath, meta: parsed.data };
}

export function readDitModelDir(dir: string): ModelDir<DitModelJson> {
  const m = readModelDir(dir);
  if (m.meta.kind !== 'dit') throw new ModelDirError(`${dir} holds a ${m.meta.kind} model, not a DiT`);
  return m as ModelDir<DitModelJson>;
}

export function readVaeModelDir(dir: string): ModelDir<VaeModelJson> {
  const m = readModelDir(dir);
  if (m.meta.kind !== 'vae-decoder') throw new ModelDirError(`${dir} holds a ${m.meta.kind} model, not a VAE decoder`);
  return m as ModelDir<VaeModelJson>;
}

/**
 * Bumped whenever the compiler emits different graphs for the same weights. 2: linear layers as
 * Gemm with the bias inside, tanh-GELU in the form onnxruntime fuses to FastGelu.
 */
export const GRAPH_REVISION = 2;

/** The graph revision a model directory was built with (directories from before the field: 1). */
export function graphRevisionOf(meta: ModelJson): number {
  return meta.graphRevision ?? 1;
}

/** What a graph builder knows; `writeModelDir` adds what writing the graph tells. */
export type ModelJsonDraft =
  | Omit<DitModelJson, 'format' | 'version' | 'inputs' | 'outputs' | 'params' | 'gflops' | 'flopsConvention' | 'weightDtype' | 'onnx' | 'externalData' | 'createdBy' | 'graphRevision'>
  | Omit<VaeModelJson, 'format' | 'version' | 'inputs' | 'outputs' | 'params' | 'gflops' | 'flopsConvention' | 'weightDtype' | 'onnx' | 'externalData' | 'createdBy' | 'graphRevision'>;

/** Multiply-accumulates per forward at batch 1, ×1e-9. */
export function graphGflops(graph: Graph): number {
  let macs = 0;
  for (const m of graph.macs.values()) macs += m;
  return macs / 1e9;
}

export function writeModelDir(dir: string, graph: Graph, draft: ModelJsonDraft, opts: WriteOptions = {}): ModelDir {
  mkdirSync(dir, { recursive: true });
  const onnxPath = join(dir, MODEL_ONNX);
  const res = writeOnnx(graph, onnxPath, opts);
  const meta = modelJsonSchema.parse({
    ...draft,
    format: 'ditpipe-model',
    version: 1,
    inputs: graph.inputs.map(({ name, dtype, shape }) => ({ name, dtype, shape: [...shape] })),
    outputs: graph.outputs.map(({ name, dtype, shape }) => ({ name, dtype, shape: [...shape] })),
    params: res.params,
    gflops: graphGflops(graph),
    flopsConvention: 'multiply-accumulates',
    weightDtype: opts.weightDtype ?? 'float32',
    onnx: MODEL_ONNX,
    externalData: res.externalData,
    createdBy: `ditpipe ${VERSION}`,
    graphRevision: GRAPH_REVISION,
  });
  writeFileSync(join(dir, MODEL_JSON), `${JSON.stringify(meta, null, 2)}\n`);
  return { dir, onnxPath, meta };
}
