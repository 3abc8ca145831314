/**
 * DiT as an ONNX graph, numerically the original facebookresearch/DiT `models.py`.
 *
 * Inputs `x` [B, C, H, W] float32, `t` [B] int64 (original timesteps 0..999), `y` [B] int64 (label
 * `num_classes` is the null label); output `out` [B, 2C (learn_sigma) or C, H, W]. B is dynamic.
 *
 * The graph always follows the original numerics, whatever naming scheme the weights use:
 * - timestep features: freqs = exp(−ln(10000)·k/half), k < half = 128, computed in float32 as torch
 *   does; features = [cos(t·freqs), sin(t·freqs)] (cos first, divisor `half`);
 * - LayerNorm eps 1e-6 without affine everywhere;
 * - adaLN-Zero chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), final layer
 *   (shift, scale); modulate(x, shift, scale) = x·(1 + scale) + shift;
 * - attention as timm's: qkv → [B, N, 3, heads, hd], softmax(q·hd^−½ · kᵀ)·v → proj;
 * - MLP GELU with the tanh approximation (composed, since opset 17 has no Gelu, in the form that
 *   onnxruntime fuses into one FastGelu kernel);
 * - every Linear as one Gemm with its bias, on rows flattened from [B, N, ·] (Graph.linear);
 * - unpatchify as `reshape(N, h, w, p, p, c)` then `nhwpqc → nchpwq`.
 *
 * diffusers `DiTTransformer2DModel` checkpoints are mapped onto the same graph. Where the diffusers
 * port computes differently, this graph keeps the original: its `Timesteps(downscale_freq_shift=1)`
 * divides by half−1 instead of half, and its per-block MLP LayerNorm uses eps 1e-5 instead of 1e-6;
 * its per-block copies of the timestep/label embedders are taken from block 0 (they are equal in
 * converted checkpoints; a difference is reported as a warning); its fixed sin-cos position
 * embedding, which it does not store, is computed here as the original `get_2d_sincos_pos_embed`.
 */
import { existsSync, readFileSync } from 'node:fs';
import { basename, dirname, join, resolve as resolvePath } from 'node:path';
import { Graph, type Value } from '../onnx/graph.ts';
import { MissingTensorError, openWeights, sha256File, WeightsError, type WeightFile } from '../weights/index.ts';
import {
  DitTensors,
  FREQ_EMBED,
  detectDitFormat,
  diffusersEmbedderCopies,
  ditOutChannels,
  ditTensorSpecs,
  type DitFormat,
} from './dit-names.ts';
import { ditConfigSchema, type CacheGraphName, type DitConfig, type ModelDir } from './modeldir.ts';
import { writeModelDir } from './modeldir-write.ts';
import { defaultHeadsForWidth, ditPreset } from './presets.ts';

export type { DitConfig } from './modeldir.ts';
export type { DitFormat } from './dit-names.ts';

export const LN_EPS = 1e-6;

/** A request that cannot be built as asked (bad config, contradicting options). */
export class DitConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DitConfigError';
  }
}

// ---- fixed tensors -----------------------------------------------------------------------------

/**
 * The original `get_2d_sincos_pos_embed(dim, grid)` ([grid², dim], row-major tokens): first half of
 * the channels encodes the column, second half the row (numpy meshgrid 'xy'), each as
 * [sin(pos·ω), cos(pos·ω)] with ω_k = 10000^(−k/(dim/4)), in float64, then rounded to float32.
 */
export function sincosPosEmbed(dim: number, grid: number): Float32Array {
  if (dim % 4 !== 0) throw new DitConfigError(`hidden_size ${dim} must be divisible by 4 for the sin-cos position embedding`);
  const quarter = dim / 4;
  const omega = Float64Array.from({ length: quarter }, (_, k) => 1 / 10000 ** (k / quarter));
  const out = new Float32Array(grid * grid * dim);
  for (let r = 0; r < grid; r++) {
    for (let c = 0; c < grid; c++) {
      const o = (r * grid + c) * dim;
      for (let k = 0; k < quarter; k++) {
        const a = c * omega[k];
        const b = r * omega[k];
        out[o + k] = Math.sin(a);
        out[o + quarter + k] = Math.cos(a);
        out[o + 2 * quarter + k] = Math.sin(b);
        out[o + 3 * quarter + k] = Math.cos(b);
      }
    }
  }
  return out;
}

/** exp(−ln(10000)·k/half) for k < half, each operation rounded to float32 as torch computes it. */
export function timestepFreqs(dim = FREQ_EMBED): Float32Array {
  const half = Math.floor(dim / 2);
  const f = Math.fround;
  const negLog = f(-Math.log(10000));
  return Float32Array.from({ length: half }, (_, k) => f(Math.exp(f(f(negLog * k) / half))));
}

// ---- config ------------------------------------------------------------------------------------

export interface DitConfigRequest {
  /** Weight naming scheme; 'auto' (default) decides by key names. */
  format?: DitFormat | 'auto';
  /** A preset name (`DiT-XL/2`); its input_size is a default, the weights' pos_embed wins. */
  preset?: string;
  /** Explicit constructor arguments (any subset); they must agree with the weights. */
  config?: Partial<DitConfig>;
  /** Overrides everything else for input_size. */
  inputSize?: number;
}

export interface ResolvedDit {
  config: DitConfig;
  format: DitFormat;
  /** How each field was decided, for the CLI to print. */
  notes: string[];
}

const partialConfig = ditConfigSchema.partial().strict();

export interface DitConfigJson {
  config: Partial<DitConfig>;
  /** A training record's `class_names`. */
  classNames?: string[];
}

/**
 * Validates a user-supplied config: the DiT constructor arguments (any subset, nothing else), or a
 * training record holding them under `config`, beside `class_names` and whatever else the run
 * recorded (what models/fashion-mnist/dit.json is). Errors name the field.
 */
export function parseDitConfigJson(raw: unknown, where = '--config'): DitConfigJson {
  const record =
    typeof raw === 'object' && raw !== null && !Array.isArray(raw) && 'config' in raw
      ? (raw as { config: unknown; class_names?: unknown })
      : null;
  const r = partialConfig.safeParse(record ? record.config : raw);
  if (!r.success) {
    const issue = r.error.issues[0];
    const field = [...(record ? ['config'] : []), ...issue.path].join('.');
    throw new DitConfigError(`${where}: ${field ? `field "${field}": ` : ''}${issue.message}`);
  }
  const names = record?.class_names;
  if (names !== undefined && !(Array.isArray(names) && names.every((n) => typeof n === 'string'))) {
    throw new DitConfigError(`${where}: field "class_names": expected an array of strings`);
  }
  return { config: r.data, ...(names ? { classNames: names } : {}) };
}

/** The constructor arguments of a user-supplied config (see parseDitConfigJson). */
export function parseDitConfig(raw: unknown, where = '--config'): Partial<DitConfig> {
  return parseDitConfigJson(raw, where).config;
}

/**
 * The model config: shapes of the weights decide depth, width, patch, in_channels, classes and
 * learn_sigma (a preset or --config that disagrees fails the shape check, naming the tensor);
 * input_size comes from --input-size, else --config, else pos_embed's token count (√N·p), else a
 * diffusers `config.json` next to the weights, else the preset; num_heads from --config, the preset,
 * a diffusers `config.json`, or the preset head count for a known width.
 */
export function resolveDitConfig(file: WeightFile, req: DitConfigRequest = {}): ResolvedDit {
  const format = !req.format || req.format === 'auto' ? detectDitFormat(file) : req.format;
  const tensors = new DitTensors(file, format);
  const notes: string[] = [`naming: ${format}${req.format && req.format !== 'auto' ? ' (given)' : ' (detected)'}`];
  const preset = req.preset ? ditPreset(req.preset) : null;
  const given = req.config ?? {};
  const sidecar = format === 'diffusers' ? readDiffusersConfig(file.path) : {};

  const patchW = tensors.shape('x_embedder.proj.weight');
  if (!patchW) throw new MissingTensorError(tensors.sourceNames('x_embedder.proj.weight')[0], file.path);
  if (patchW.length !== 4 || patchW[2] !== patchW[3]) {
    throw new WeightsError(
      `${file.path}: tensor '${tensors.sourceNames('x_embedder.proj.weight')[0]}' has shape [${patchW.join(', ')}]; expected a square [hidden, C, p, p] conv kernel`,
    );
  }
  const [D, C, p] = patchW;
  const table = tensors.shape('y_embedder.embedding_table.weight');
  const finalW = tensors.shape('final_layer.linear.weight');
  const inferred: Partial<DitConfig> = { hidden_size: D, in_channels: C, patch_size: p, depth: tensors.depth() };
  if (table && table.length === 2) inferred.num_classes = table[0] - 1;
  if (finalW && finalW.length === 2) {
    const oc = finalW[0] / (p * p);
    if (oc === 2 * C) inferred.learn_sigma = true;
    else if (oc === C) inferred.learn_sigma = false;
  }
  const pos = tensors.shape('pos_embed');
  if (pos && pos.length === 3) {
    const g = Math.round(Math.sqrt(pos[1]));
    if (g * g === pos[1]) inferred.input_size = g * p;
  }

  const pick = <K extends keyof DitConfig>(key: K, sources: [string, DitConfig[K] | undefined][]): DitConfig[K] => {
    for (const [from, v] of sources) {
      if (v !== undefined) {
        notes.push(`${key} = ${String(v)} (${from})`);
        return v;
      }
    }
    const why = key === 'num_heads' ? ' (weight shapes do not tell the head count and the width is not a preset width)' : '';
    throw new DitConfigError(
      `cannot determine ${key}${why}: give it with --config${key === 'input_size' ? ' or --input-size' : ''} or --preset`,
    );
  };
  // Shape-derived fields: explicit values first so that a disagreement surfaces as a named shape mismatch.
  const fromShapes = <K extends 'patch_size' | 'in_channels' | 'hidden_size' | 'depth' | 'num_classes' | 'learn_sigma'>(key: K) =>
    pick(key, [
      ['--config', given[key]],
      ['--preset', preset?.[key]],
      ['weights', inferred[key]],
    ]);
  const hidden = fromShapes('hidden_size');
  const config: DitConfig = {
    input_size: pick('input_size', [
      ['--input-size', req.inputSize],
      ['--config', given.input_size],
      ['pos_embed', inferred.input_size],
      ['config.json', sidecar.input_size],
      ['--preset', preset?.input_size],
    ]),
    patch_size: fromShapes('patch_size'),
    in_channels: fromShapes('in_channels'),
    hidden_size: hidden,
    depth: fromShapes('depth'),
    num_heads: pick('num_heads', [
      ['--config', given.num_heads],
      ['--preset', preset?.num_heads],
      ['config.json', sidecar.num_heads],
      [`preset head count for width ${hidden}`, defaultHeadsForWidth(hidden) ?? undefined],
    ]),
    num_classes: fromShapes('num_classes'),
    learn_sigma: fromShapes('learn_sigma'),
  };
  validateDitConfig(config);
  return { config, format, notes: [notes[0], `config: ${notes.slice(1).join(', ')}`] };
}

/** input_size/num_heads from a diffusers `config.json` beside the weights, when there is one. */
function readDiffusersConfig(weightsPath: string): Partial<DitConfig> {
  const p = join(dirname(weightsPath), 'config.json');
  if (!existsSync(p)) return {};
  try {
    const j = JSON.parse(readFileSync(p, 'utf8')) as Record<string, unknown>;
    if (j._class_name !== 'DiTTransformer2DModel') return {};
    const out: Partial<DitConfig> = {};
    if (typeof j.sample_size === 'number') out.input_size = j.sample_size;
    if (typeof j.num_attention_heads === 'number') out.num_heads = j.num_attention_heads;
    return out;
  } catch {
    return {};
  }
}

export function validateDitConfig(c: DitConfig): void {
  const parsed = ditConfigSchema.safeParse(c);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new DitConfigError(`config field "${issue.path.join('.')}": ${issue.message}`);
  }
  if (c.input_size % c.patch_size !== 0) {
    throw new DitConfigError(`config: input_size ${c.input_size} is not a multiple of patch_size ${c.patch_size}`);
  }
  if (c.hidden_size % c.num_heads !== 0) {
    throw new DitConfigError(`config: hidden_size ${c.hidden_size} is not divisible by num_heads ${c.num_heads}`);
  }
}

// ---- graph -------------------------------------------------------------------------------------

export interface DitGraphOptions {
  format?: DitFormat | 'auto';
  name?: string;
  /** Non-fatal findings (e.g. diffusers embedder copies that differ). */
  onWarning?: (message: string) => void;
  /** Compare a diffusers checkpoint's per-block embedder copies with block 0's (reads them). Default true. */
  checkEmbedderCopies?: boolean;
}

/** A graph of the DiT family: the whole forward pass, or one of the step-cache graphs. */
export type DitGraphKind = 'full' | CacheGraphName;

/**
 * Checks the weights against `config` once, then builds any graph of the family from them. Every
 * tensor's presence and shape is checked first (MissingTensorError / ShapeMismatchError naming the
 * tensor as stored); weight data is read only when the writer streams each initializer.
 */
export function ditGraphBuilder(weights: WeightFile, config: DitConfig, opts: DitGraphOptions = {}): (kind: DitGraphKind) => Graph {
  validateDitConfig(config);
  const format = !opts.format || opts.format === 'auto' ? detectDitFormat(weights) : opts.format;
  const src = new DitTensors(weights, format);
  const specs = ditTensorSpecs(config);
  for (const s of specs) src.check(s);
  const storedDepth = src.depth();
  if (storedDepth !== config.depth) {
    throw new WeightsError(`${weights.path}: holds ${storedDepth} transformer blocks but the config says depth ${config.depth}`);
  }
  if (format === 'diffusers' && opts.checkEmbedderCopies !== false) checkEmbedderCopies(weights, config.depth, opts.onWarning);
  const shapes = new Map(specs.map((s) => [s.name, s.shape]));
  const name = opts.name ?? 'dit';
  return (kind) => emitDit(new Graph(kind === 'full' ? name : `${name}_${kind}`), kind, src, shapes, config);
}

/** Builds the DiT graph (the whole forward pass); see ditGraphBuilder. */
export function buildDitGraph(weights: WeightFile, config: DitConfig, opts: DitGraphOptions = {}): Graph {
  return ditGraphBuilder(weights, config, opts)('full');
}

/**
 * One graph of the family. The cuts are at h1 (the hidden state after block 0) and hN (after the
 * last block), so head + tail run exactly the ops of the full graph, in the same order; the
 * conditioning c crosses the cut as a tensor (B·D values) instead of being recomputed, so the tail
 * and skip graphs need neither the embedders' weights nor t and y.
 */
function emitDit(g: Graph, kind: DitGraphKind, src: DitTensors, shapes: Map<string, number[]>, config: DitConfig): Graph {
  const D = config.hidden_size;
  const p = config.patch_size;
  const C = config.in_channels;
  const OC = ditOutChannels(config);
  const grid = config.input_size / p;
  const N = grid * grid;
  const heads = config.num_heads;
  const hd = D / heads;
  const all = Array.from({ length: config.depth }, (_, i) => i);
  const blocks = { full: all, head: all.slice(0, 1), tail: all.slice(1), skip: [] }[kind];

  const w = (name: string, opt: { param?: boolean } = {}): Value => g.weight(name, shapes.get(name)!, () => src.read(name), opt);
  const lin = (x: Value, name: string): Value => {
    const [o, i] = shapes.get(`${name}.weight`)!;
    return g.linear(
      x,
      g.linearWeight(`${name}.weight`, o, i, () => src.read(`${name}.weight`)),
      w(`${name}.bias`),
    );
  };
  const scalar = (v: number, hint: string): Value => g.constFloat([v], [1], hint);
  const one = scalar(1, 'one');
  const modulate = (x: Value, shift: Value, scale: Value): Value => g.add(g.mul(x, g.add(one, scale)), shift);
  const geluTanh = (() => {
    if (blocks.length === 0) return null;
    const half = scalar(0.5, 'gelu_half');
    const kappa = scalar(0.044715, 'gelu_kappa');
    const beta = scalar(Math.sqrt(2 / Math.PI), 'gelu_beta');
    const three = scalar(3, 'gelu_cube');
    // torch's tanh GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), written in the exact form
    // (x³ as Pow, this order of operands) that onnxruntime fuses into one FastGelu kernel.
    return (x: Value): Value => {
      const x3 = g.pow(x, three);
      const inner = g.mul(beta, g.add(x, g.mul(kappa, x3)));
      return g.mul(g.mul(half, x), g.add(one, g.tanh(inner)));
    };
  })();

  let h: Value;
  let c: Value;
  if (kind === 'full' || kind === 'head') {
    const x = g.input('x', 'float32', ['B', C, config.input_size, config.input_size]);
    const t = g.input('t', 'int64', ['B']);
    const y = g.input('y', 'int64', ['B']);

    // Patch embedding + fixed position embedding.
    const patches = g.conv(x, w('x_embedder.proj.weight'), w('x_embedder.proj.bias'), { strides: [p, p] });
    h = g.transpose(g.reshape(patches, [0, D, N]), [0, 2, 1]); // [B, N, D]
    const posEmbed = src.stores('pos_embed')
      ? w('pos_embed', { param: false })
      : g.weight('pos_embed', [1, N, D], () => sincosPosEmbed(D, grid), { param: false });
    h = g.add(h, posEmbed);

    // Timestep embedding: [cos, sin] of t·freqs → Linear → SiLU → Linear.
    const freqs = g.constFloat(timestepFreqs(FREQ_EMBED), [FREQ_EMBED / 2], 't_freqs');
    const args = g.mul(g.unsqueeze(g.cast(t, 'float32'), [1]), freqs);
    const tFeat = g.concat([g.unary('Cos', args), g.unary('Sin', args)], -1);
    const tEmb = lin(g.silu(lin(tFeat, 't_embedder.mlp.0')), 't_embedder.mlp.2');
    const yEmb = g.gather(w('y_embedder.embedding_table.weight'), y, 0);
    c = g.add(tEmb, yEmb);
  } else {
    h = g.input('h1', 'float32', ['B', N, D]);
    c = g.input('c', 'float32', ['B', D]);
  }
  const siluC = g.unsqueeze(g.silu(c), [1]); // [B, 1, D]: every adaLN projects SiLU(c)
  const hIn = h;

  if (geluTanh) {
    const qScale = scalar(hd ** -0.5, 'attn_scale');
    for (const i of blocks) {
      const b = `blocks.${i}`;
      const [shiftMsa, scaleMsa, gateMsa, shiftMlp, scaleMlp, gateMlp] = g.chunk(lin(siluC, `${b}.adaLN_modulation.1`), 6, 2);
      // Attention.
      const a = modulate(g.layerNorm(h, LN_EPS), shiftMsa, scaleMsa);
      const [q, k, v] = g.chunk(lin(a, `${b}.attn.qkv`), 3, 2); // qkv features are laid out (3, heads, hd)
      const toHeads = (z: Value, perm: number[]): Value => g.transpose(g.reshape(z, [0, N, heads, hd]), perm);
      const qh = g.mul(toHeads(q, [0, 2, 1, 3]), qScale); // [B, heads, N, hd]
      const kt = toHeads(k, [0, 2, 3, 1]); // [B, heads, hd, N]
      const vh = toHeads(v, [0, 2, 1, 3]);
      const attn = g.softmax(g.matmul(qh, kt), -1);
      const ctx = g.reshape(g.transpose(g.matmul(attn, vh), [0, 2, 1, 3]), [0, N, D]);
      h = g.add(h, g.mul(gateMsa, lin(ctx, `${b}.attn.proj`)));
      // MLP.
      const m = modulate(g.layerNorm(h, LN_EPS), shiftMlp, scaleMlp);
      h = g.add(h, g.mul(gateMlp, lin(geluTanh(lin(m, `${b}.mlp.fc1`)), `${b}.mlp.fc2`)));
    }
  }

  if (kind === 'head') {
    g.output(h, 'h1');
    g.output(g.sub(h, hIn), 'r1'); // the first block's residual h1 − h0, what an adaptive policy compares
    g.output(c, 'c');
    return g;
  }
  if (kind === 'skip') h = g.add(h, g.input('residual', 'float32', ['B', N, D])); // hN ≈ h1 + a kept hN − h1
  const [shift, scale] = g.chunk(lin(siluC, 'final_layer.adaLN_modulation.1'), 2, 2);
  const o = lin(modulate(g.layerNorm(h, LN_EPS), shift, scale), 'final_layer.linear'); // [B, N, p·p·OC]
  const img = g.reshape(g.transpose(g.reshape(o, [0, grid, grid, p, p, OC]), [0, 5, 1, 3, 2, 4]), [0, OC, grid * p, grid * p]);
  g.output(img, 'out');
  if (kind === 'tail') g.output(g.sub(h, hIn), 'residual'); // the block stack's residual hN − h1, what a cached step reuses
  return g;
}

function checkEmbedderCopies(weights: WeightFile, depth: number, onWarning?: (m: string) => void): void {
  for (const { block0, copies } of diffusersEmbedderCopies(depth)) {
    const ref = weights.readF32(block0);
    for (const name of copies) {
      if (!weights.has(name)) continue; // a pruned checkpoint may keep only block 0's copy
      const other = weights.readF32(name);
      let diff = other.length === ref.length ? 0 : Infinity;
      for (let i = 0; i < ref.length && diff !== Infinity; i++) diff = Math.max(diff, Math.abs(ref[i] - other[i]));
      if (diff > 0) {
        onWarning?.(`'${name}' differs from '${block0}' (max |Δ| ${diff}); the original DiT has one embedder, block 0's is used`);
      }
    }
  }
}

// ---- model directory ---------------------------------------------------------------------------

export interface BuildDitModelOptions extends DitConfigRequest {
  weights: string;
  out: string;
  dtype?: 'f32' | 'f16';
  name?: string;
  classNames?: string[];
  /** Name of the VAE whose latent space the model samples in (recorded in model.json). */
  vae?: string;
  /** Weight bytes above which the ONNX weights go to an external data file (default: the writer's). */
  externalDataThresholdBytes?: number;
  /** Also write the step-cache graphs (CACHE_GRAPHS in modeldir.ts). Default true. */
  cacheGraphs?: boolean;
  onWarning?: (message: string) => void;
  onNote?: (message: string) => void;
  onProgress?: (done: number, total: number, name: string) => void;
}

export class UnsupportedDtypeError extends Error {
  constructor(dtype: string) {
    super(`unsupported dtype '${dtype}': use f32 or f16`);
    this.name = 'UnsupportedDtypeError';
  }
}

/**
 * What `ditpipe model build dit` does: resolve the config, check, build, write `model.onnx` (and the
 * step-cache graphs unless `cacheGraphs: false`) + `model.json`.
 */
export function buildDitModel(opts: BuildDitModelOptions): ModelDir {
  const dtype = opts.dtype ?? 'f32';
  if (dtype !== 'f32' && dtype !== 'f16') throw new UnsupportedDtypeError(String(dtype));
  const file = openWeights(opts.weights);
  try {
    const { config, format, notes } = resolveDitConfig(file, opts);
    for (const n of notes) opts.onNote?.(n);
    if (opts.classNames && opts.classNames.length !== config.num_classes) {
      throw new DitConfigError(`class names: ${opts.classNames.length} given, the model has ${config.num_classes} classes`);
    }
    const name = opts.name ?? basename(resolvePath(opts.out));
    const build = ditGraphBuilder(file, config, { format, name, onWarning: opts.onWarning });
    const cacheGraphs = (opts.cacheGraphs ?? true) ? { head: build('head'), tail: build('tail'), skip: build('skip') } : undefined;
    opts.onNote?.('hashing the source weights');
    const sha256 = sha256File(opts.weights);
    return writeModelDir(
      opts.out,
      build('full'),
      {
        kind: 'dit',
        name,
        config,
        ...(opts.classNames ? { classNames: opts.classNames } : {}),
        ...(opts.vae ? { vae: opts.vae } : {}),
        source: { file: basename(opts.weights), format: `${format}/${file.format}`, sha256 },
      },
      {
        weightDtype: dtype === 'f16' ? 'float16' : 'float32',
        externalDataThresholdBytes: opts.externalDataThresholdBytes,
        onProgress: opts.onProgress,
        cacheGraphs,
        docString: `DiT ${JSON.stringify(config)} built by ditpipe from ${basename(opts.weights)} (original DiT numerics)`,
      },
    );
  } finally {
    file.close();
  }
}
