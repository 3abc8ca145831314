// A model directory: `model.onnx` (+ `model.onnx.data` for large weights) and `model.json`, which
// says what the graph is, so services and the CLI never have to open the ONNX file to learn it.
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import { z } from 'zod';
import { modelOutChannels } from '../diffusion/guidance.ts';
import { imageCropSchema } from '../image/crop.ts';
import { inspectOnnx, OnnxFormatError, type OnnxSummary, type OnnxValueInfo } from '../onnx/inspect.ts';

export const MODEL_JSON = 'model.json';
export const MODEL_ONNX = 'model.onnx';

/**
 * The DiT's step-cache graphs, cut from the same weights as model.onnx: `head` is the embedders and
 * block 0, `tail` the other blocks and the final layer, `skip` the final layer alone on h1 plus a
 * block-stack residual kept from an earlier step. So a full step is head then tail, a cached step
 * head then skip; the residuals head and tail return are what a cache policy compares and keeps.
 */
export const CACHE_GRAPHS = ['head', 'tail', 'skip'] as const;
export type CacheGraphName = (typeof CACHE_GRAPHS)[number];

/** Where the compiler writes a step-cache graph in the model directory. */
export const cacheGraphFile = (name: CacheGraphName): string => `model.${name}.onnx`;

const ioSpec = z.object({
  name: z.string(),
  dtype: z.enum(['float32', 'float16', 'int64', 'int32', 'bool']),
  shape: z.array(z.union([z.number().int(), z.string()])),
});

type IoSpec = z.infer<typeof ioSpec>;

const cacheGraphSpec = z.object({
  onnx: z.string(),
  inputs: z.array(ioSpec),
  outputs: z.array(ioSpec),
  /** Multiply-accumulates of this graph at batch 1, ×1e-9: head + tail is the full pass's gflops. */
  gflops: z.number().nonnegative(),
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
    /** The step-cache graphs (CACHE_GRAPHS), when built; absent in directories built without them. */
    cacheGraphs: z.object({ head: cacheGraphSpec, tail: cacheGraphSpec, skip: cacheGraphSpec }).optional(),
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
  /** What model.onnx holds, when it was verified (readModelDir's verifyGraph). */
  graph?: OnnxSummary;
}

/**
 * A file a model.json names, which must lie inside the model directory: a plain relative path,
 * no "..", and (after symlinks) still inside it. Returns its absolute path.
 */
function confined(dir: string, file: string, field: string, jsonPath: string): string {
  const base = resolve(dir);
  const full = resolve(base, file);
  const rel = relative(base, full);
  if (isAbsolute(file) || rel === '' || rel.startsWith('..') || isAbsolute(rel)) {
    throw new ModelDirError(`${jsonPath}: field "${field}": ${JSON.stringify(file)} is not a file inside the model directory`);
  }
  if (existsSync(full)) {
    const real = realpathSync(full);
    const realBase = realpathSync(base);
    if (!real.startsWith(realBase + sep))
      throw new ModelDirError(
        `${jsonPath}: field "${field}": ${JSON.stringify(file)} leads outside the model directory (symlink to ${real})`,
      );
  }
  return full;
}

export interface ReadModelDirOptions {
  /**
   * Parse model.onnx and check it against model.json: the graph's inputs and outputs must be the
   * ones listed, and agree with the config (channels, sizes). Default true; the check walks the
   * file's framing only (weights are skipped), so it is cheap even for large models.
   */
  verifyGraph?: boolean;
}

/** Reads and validates `<dir>/model.json`; errors name the directory and the offending field. */
export function readModelDir(dir: string, opts: ReadModelDirOptions = {}): ModelDir {
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
  const meta = parsed.data;
  const onnxPath = confined(dir, meta.onnx, 'onnx', path);
  if (meta.externalData !== null) confined(dir, meta.externalData, 'externalData', path);
  // Only the paths: a step-cache graph is checked when it is opened (cacheGraphPath), so a
  // directory whose cache graphs are damaged still serves full steps.
  if (meta.kind === 'dit' && meta.cacheGraphs) {
    for (const name of CACHE_GRAPHS) confined(dir, meta.cacheGraphs[name].onnx, `cacheGraphs.${name}.onnx`, path);
  }
  if (!existsSync(onnxPath)) throw new ModelDirError(`${dir}: ${meta.onnx} is missing`);
  const graph = (opts.verifyGraph ?? true) ? verifyGraph(dir, onnxPath, meta, path) : undefined;
  return { dir, onnxPath, meta, graph };
}

const shapeText = (s: ReadonlyArray<number | string>): string => `[${s.join(', ')}]`;

/** Parses an ONNX file's framing; its external data files must lie in the directory and exist. */
function inspectInDir(dir: string, onnxPath: string): OnnxSummary {
  let g: OnnxSummary;
  try {
    g = inspectOnnx(onnxPath);
  } catch (err) {
    if (err instanceof OnnxFormatError) throw new ModelDirError(err.message);
    throw err;
  }
  for (const loc of g.externalLocations) {
    const full = confined(dir, loc, 'onnx (external data location)', onnxPath);
    if (!existsSync(full)) throw new ModelDirError(`${onnxPath}: its weights are in ${loc}, which is missing`);
  }
  return g;
}

/** The inputs or outputs model.json lists at `field` must be the ones the ONNX file `onnx` has. */
function compareIo(jsonPath: string, field: string, onnx: string, listed: IoSpec[], actual: OnnxValueInfo[]): void {
  const names = (l: Array<{ name: string }>): string => l.map((v) => v.name).join(', ');
  if (listed.length !== actual.length || listed.some((v, i) => v.name !== actual[i].name)) {
    throw new ModelDirError(`${jsonPath}: field "${field}" lists ${names(listed)} but ${onnx} has ${names(actual)}`);
  }
  listed.forEach((v, i) => {
    const a = actual[i];
    if (v.dtype !== a.dtype || shapeText(v.shape) !== shapeText(a.shape)) {
      throw new ModelDirError(
        `${jsonPath}: field "${field}.${i}": ${v.name} is ${v.dtype} ${shapeText(v.shape)} here but ${a.dtype} ${shapeText(a.shape)} in ${onnx}`,
      );
    }
  });
}

/** The graph must be what model.json says, and model.json's config must fit the graph. */
function verifyGraph(dir: string, onnxPath: string, meta: ModelJson, jsonPath: string): OnnxSummary {
  const g = inspectInDir(dir, onnxPath);
  compareIo(jsonPath, 'inputs', meta.onnx, meta.inputs, g.inputs);
  compareIo(jsonPath, 'outputs', meta.onnx, meta.outputs, g.outputs);
  const io = (list: OnnxValueInfo[], name: string, kind: string): OnnxValueInfo => {
    const v = list.find((x) => x.name === name);
    if (!v)
      throw new ModelDirError(
        `${jsonPath}: a ${meta.kind} graph needs ${kind} "${name}"; ${meta.onnx} has ${list.map((x) => x.name).join(', ')}`,
      );
    return v;
  };
  const dim = (v: OnnxValueInfo, axis: number, want: number, field: string): void => {
    const got = v.shape[axis];
    if (v.shape.length !== 4 || got !== want) {
      throw new ModelDirError(
        `${jsonPath}: field "config.${field}" is ${want} but the graph's ${v.name} is ${shapeText(v.shape)} (axis ${axis} is ${got})`,
      );
    }
  };
  if (meta.kind === 'dit') {
    const c = meta.config;
    const x = io(g.inputs, 'x', 'input');
    io(g.inputs, 't', 'input');
    io(g.inputs, 'y', 'input');
    const out = io(g.outputs, 'out', 'output');
    dim(x, 1, c.in_channels, 'in_channels');
    dim(x, 2, c.input_size, 'input_size');
    dim(x, 3, c.input_size, 'input_size');
    dim(out, 1, modelOutChannels(c.in_channels, c.learn_sigma), c.learn_sigma ? 'learn_sigma' : 'in_channels');
    dim(out, 2, c.input_size, 'input_size');
  } else {
    const c = meta.config;
    dim(io(g.inputs, 'z', 'input'), 1, c.latent_channels, 'latent_channels');
    dim(io(g.outputs, 'image', 'output'), 1, c.out_channels, 'out_channels');
  }
  return g;
}

/** A step-cache graph was asked for that the model directory does not have. */
export class MissingCacheGraphError extends ModelDirError {
  constructor(
    message: string,
    readonly path: string,
  ) {
    super(message);
    this.name = 'MissingCacheGraphError';
  }
}

/** What each step-cache graph takes and returns for a config (what the compiler builds). */
export function cacheGraphIo(c: DitConfig): Record<CacheGraphName, { inputs: IoSpec[]; outputs: IoSpec[] }> {
  const tokens = (c.input_size / c.patch_size) ** 2;
  const f32 = (name: string, shape: Array<number | string>): IoSpec => ({ name, dtype: 'float32', shape });
  const i64 = (name: string): IoSpec => ({ name, dtype: 'int64', shape: ['B'] });
  const hidden = (name: string): IoSpec => f32(name, ['B', tokens, c.hidden_size]);
  const cond = f32('c', ['B', c.hidden_size]);
  const out = f32('out', ['B', modelOutChannels(c.in_channels, c.learn_sigma), c.input_size, c.input_size]);
  return {
    head: {
      inputs: [f32('x', ['B', c.in_channels, c.input_size, c.input_size]), i64('t'), i64('y')],
      outputs: [hidden('h1'), hidden('r1'), cond],
    },
    tail: { inputs: [hidden('h1'), cond], outputs: [out, hidden('residual')] },
    skip: { inputs: [hidden('h1'), cond, hidden('residual')], outputs: [out] },
  };
}

/**
 * The path of a DiT model directory's step-cache graph `name`, checked: listed in model.json, present,
 * and taking and returning what model.json lists and the config implies. MissingCacheGraphError
 * (naming the file) when the directory was built without the cache graphs or the file is gone.
 */
export function cacheGraphPath(m: ModelDir<DitModelJson>, name: CacheGraphName): string {
  const jsonPath = join(m.dir, MODEL_JSON);
  const listed = m.meta.cacheGraphs?.[name];
  if (!listed) {
    const path = join(m.dir, cacheGraphFile(name));
    throw new MissingCacheGraphError(
      `${jsonPath} lists no step-cache graphs, so there is no ${name} graph (${path}): ` +
        'the directory was built by an older ditpipe or with --no-cache-graphs; rebuild it with `ditpipe model build dit`',
      path,
    );
  }
  const path = confined(m.dir, listed.onnx, `cacheGraphs.${name}.onnx`, jsonPath);
  if (!existsSync(path)) {
    throw new MissingCacheGraphError(`${path} is missing (${jsonPath} lists it as the step-cache ${name} graph)`, path);
  }
  const g = inspectInDir(m.dir, path);
  const expected = cacheGraphIo(m.meta.config)[name];
  for (const kind of ['inputs', 'outputs'] as const) {
    const field = `cacheGraphs.${name}.${kind}`;
    compareIo(jsonPath, field, listed.onnx, listed[kind], g[kind]);
    compareIo(jsonPath, field, `the ${name} graph of this config`, listed[kind], expected[kind]);
  }
  return path;
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
