// VAE decoder (the Stable Diffusion KL autoencoder's decoder, diffusers `AutoencoderKL.decode`
// without the scaling) as an ONNX graph: post_quant_conv → conv_in → mid block (resnet, attention,
// resnet) → up blocks → GroupNorm → SiLU → conv_out. GroupNormalization needs opset 18, so it is
// composed from InstanceNormalization over [B, G, C/G·H·W] plus a per-channel affine.
import { z } from 'zod';
import { imageCropSchema, type ImageCrop } from '../image/crop.ts';
import { Graph, GraphError, type Dim, type Value } from '../onnx/graph.ts';
import { expectShape, WeightsError, type WeightFile } from '../weights/index.ts';
import type { VaeConfig } from './modeldir.ts';
import {
  countUpBlocks,
  countUpResnets,
  detectVaeNames,
  type AttentionNames,
  type ResnetNames,
  type VaeFormat,
  type VaeNames,
} from './vae-names.ts';

export { detectVaeNames, vaeNames, VAE_FORMATS } from './vae-names.ts';
export type { VaeFormat, VaeNames, VaeNameScheme } from './vae-names.ts';

/** The scaling factor of the Stable Diffusion VAE (sd-vae-ft-ema/-mse); never assumed, only suggested. */
export const SD_SCALING_FACTOR = 0.18215;
/** norm_num_groups cannot be read off the weight shapes; this is AutoencoderKL's default. */
export const DEFAULT_NORM_GROUPS = 32;
/** Latent size used to count MACs when none is configured (a 256×256 image with an 8× VAE). */
export const DEFAULT_LATENT_SIZE = 32;

// Every GroupNorm in the decoder (resnets, attention, conv_norm_out) uses this epsilon.
const NORM_EPS = 1e-6;

export class VaeConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VaeConfigError';
  }
}

// ---- configuration -------------------------------------------------------------------------

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * The `--config` JSON: diffusers `AutoencoderKL` config.json names. Keys that only concern the
 * encoder are accepted and ignored; keys that would change the decoder's architecture are checked.
 */
const configJsonSchema = z
  .object({
    latent_channels: z.number().int().positive().optional(),
    block_out_channels: z.array(z.number().int().positive()).min(1).optional(),
    layers_per_block: z.number().int().positive().optional(),
    norm_num_groups: z.number().int().positive().optional(),
    out_channels: z.number().int().positive().optional(),
    latent_size: z.number().int().positive().optional(),
    sample_size: z.number().int().positive().optional(),
    scaling_factor: z.number().positive().optional(),
    act_fn: z.literal('silu', { message: 'only "silu" is supported' }).optional(),
    up_block_types: z.array(z.literal('UpDecoderBlock2D', { message: 'only UpDecoderBlock2D is supported' })).optional(),
    mid_block_add_attention: z.literal(true, { message: 'a decoder without mid-block attention is not supported' }).optional(),
    /** ditpipe's own key: pixels the decoder crops from each edge (a number for every edge, or per edge). */
    output_crop: z.union([z.number().int().min(0), imageCropSchema]).optional(),
  })
  .passthrough();

export interface VaeConfigJson {
  config: Partial<VaeConfig>;
  scalingFactor?: number;
  outputCrop?: ImageCrop;
  /** diffusers' `sample_size` (image pixels), turned into a latent size once the depth is known. */
  sampleSize?: number;
  upBlockCount?: number;
}

/**
 * Validates a parsed `--config` object, the error naming the offending field. Takes a diffusers
 * `config.json`, or a training record that holds one under `config` with the top-level keys
 * beside it (what models/fashion-mnist/vae.json is: `{ config: {...}, scaling_factor, output_crop }`).
 */
export function parseVaeConfigJson(raw: unknown, source = 'config'): VaeConfigJson {
  if (isRecord(raw) && isRecord(raw.config)) {
    const { config, ...top } = raw;
    const pick = Object.fromEntries(['scaling_factor', 'output_crop'].filter((k) => k in top).map((k) => [k, top[k]]));
    raw = { ...config, ...pick };
  }
  const parsed = configJsonSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new VaeConfigError(`${source}: field "${issue.path.join('.') || '(root)'}": ${issue.message}`);
  }
  const c = parsed.data;
  const config: Partial<VaeConfig> = {};
  if (c.latent_channels !== undefined) config.latent_channels = c.latent_channels;
  if (c.block_out_channels !== undefined) config.block_out_channels = c.block_out_channels;
  if (c.layers_per_block !== undefined) config.layers_per_block = c.layers_per_block;
  if (c.norm_num_groups !== undefined) config.norm_num_groups = c.norm_num_groups;
  if (c.out_channels !== undefined) config.out_channels = c.out_channels;
  if (c.latent_size !== undefined) config.latent_size = c.latent_size;
  const crop = c.output_crop;
  return {
    config,
    scalingFactor: c.scaling_factor,
    outputCrop: typeof crop === 'number' ? { top: crop, right: crop, bottom: crop, left: crop } : crop,
    sampleSize: c.sample_size,
    upBlockCount: c.up_block_types?.length,
  };
}

/**
 * The decoder config: what the weight shapes tell (channels, depth, layers per block), with
 * `given` (from `--config`) taking precedence; the graph builder then checks every tensor against
 * the result, so a config that disagrees with the weights fails with the tensor named.
 */
export function inferVaeConfig(file: WeightFile, names: VaeNames, given: Partial<VaeConfig> = {}): VaeConfig {
  const n = given.block_out_channels?.length ?? countUpBlocks(file, names);
  if (n === 0)
    throw new WeightsError(
      `${file.path}: no decoder up blocks found (no ${names.scheme === 'ldm' ? 'decoder.up.*' : 'decoder.up_blocks.*'} tensors)`,
    );
  const dim0 = (tensor: string, axis = 0): number => file.info(tensor).shape[axis];
  const block_out_channels =
    given.block_out_channels ?? Array.from({ length: n }, (_, i) => dim0(`${names.upResnet(n - 1 - i, 0, n).conv1}.weight`));
  const resnets = countUpResnets(file, names, 0, n);
  const cfg: VaeConfig = {
    latent_channels: given.latent_channels ?? dim0(`${names.postQuantConv}.weight`),
    block_out_channels,
    layers_per_block: given.layers_per_block ?? (resnets > 1 ? resnets - 1 : 1),
    norm_num_groups: given.norm_num_groups ?? DEFAULT_NORM_GROUPS,
    out_channels: given.out_channels ?? dim0(`${names.convOut}.weight`),
    latent_size: given.latent_size ?? DEFAULT_LATENT_SIZE,
  };
  for (const c of new Set(cfg.block_out_channels)) {
    if (c % cfg.norm_num_groups !== 0) {
      throw new VaeConfigError(
        `norm_num_groups ${cfg.norm_num_groups} does not divide block_out_channels entry ${c} (set norm_num_groups with --config)`,
      );
    }
  }
  return cfg;
}

// ---- graph ---------------------------------------------------------------------------------

export interface VaeGraphOptions {
  /** Graph name. */
  name?: string;
  /** Naming scheme of `weights`; detected from the tensor names when omitted. */
  names?: VaeNames;
  /**
   * Height and width of `z` symbolic (default) or fixed. Either way the MAC count is taken at
   * `config.latent_size` (batch 1), so model.json's Gflops mean something.
   */
  dynamicSpatial?: boolean;
}

/**
 * Builds the decoder: input `z` [B, latent_channels, h, w] (latents already divided by the scaling
 * factor), output `image` [B, out_channels, 2^(n-1)·h, 2^(n-1)·w] float32, unclamped (≈ [-1, 1]).
 * Every tensor is shape-checked against `config` (ShapeMismatchError / MissingTensorError).
 * Weights stay lazy: they are read when the writer reaches them, so `weights` must stay open until
 * the graph is written.
 */
export function buildVaeDecoderGraph(weights: WeightFile, config: VaeConfig, opts: VaeGraphOptions = {}): Graph {
  const names = opts.names ?? detectVaeNames(weights);
  const size = config.latent_size ?? DEFAULT_LATENT_SIZE;
  const counted = build(weights, config, names, opts.name, [size, size]);
  if (opts.dynamicSpatial === false) return counted;
  const graph = build(weights, config, names, opts.name, ['h', 'w']);
  // Both builds emit the same node sequence, so the names line up; use the concrete counts.
  if (counted.macs.size !== graph.macs.size) throw new GraphError('VAE graph: static and dynamic builds differ');
  graph.macs.clear();
  for (const [k, v] of counted.macs) {
    if (!graph.nodes.some((n) => n.outputs[0] === k)) throw new GraphError(`VAE graph: MAC node ${k} missing from the dynamic build`);
    graph.macs.set(k, v);
  }
  return graph;
}

function build(file: WeightFile, cfg: VaeConfig, names: VaeNames, name: string | undefined, spatial: [Dim, Dim]): Graph {
  const b = new Builder(new Graph(name ?? 'vae_decoder'), file, cfg);
  const boc = cfg.block_out_channels;
  const n = boc.length;
  const deepest = boc[n - 1];

  let x = b.g.input('z', 'float32', ['B', cfg.latent_channels, spatial[0], spatial[1]]);
  x = b.conv(x, names.postQuantConv, cfg.latent_channels, cfg.latent_channels, 1);
  x = b.conv(x, names.convIn, cfg.latent_channels, deepest, 3);

  x = b.resnet(x, names.midResnet(0), deepest, deepest);
  x = b.attention(x, names.midAttention, deepest);
  x = b.resnet(x, names.midResnet(1), deepest, deepest);

  let channels = deepest;
  for (let k = 0; k < n; k++) {
    const out = boc[n - 1 - k];
    for (let j = 0; j <= cfg.layers_per_block; j++) {
      x = b.resnet(x, names.upResnet(k, j, n), channels, out);
      channels = out;
    }
    if (k < n - 1) x = b.upsample(x, names.upsampleConv(k, n), channels);
  }
  // Extra up blocks or resnets mean the config disagrees with the file; say so rather than ignore them.
  const blocks = countUpBlocks(file, names);
  if (blocks > n) throw new VaeConfigError(`${file.path}: the weights have ${blocks} up blocks but block_out_channels has ${n} entries`);
  for (let k = 0; k < n; k++) {
    const resnets = countUpResnets(file, names, k, n);
    if (resnets > cfg.layers_per_block + 1) {
      throw new VaeConfigError(
        `${file.path}: up block ${k} has ${resnets} resnets but layers_per_block = ${cfg.layers_per_block} means ${cfg.layers_per_block + 1}`,
      );
    }
  }

  x = b.groupNorm(x, names.normOut, boc[0]);
  x = b.g.silu(x);
  x = b.conv(x, names.convOut, boc[0], cfg.out_channels, 3);
  b.g.output(x, 'image');
  return b.g;
}

class Builder {
  constructor(
    readonly g: Graph,
    private readonly file: WeightFile,
    private readonly cfg: VaeConfig,
  ) {}

  /** Registers a checkpoint tensor as an initializer after checking its shape. */
  private tensor(name: string, shape: number[], stored: number[] = shape): Value {
    expectShape(this.file, name, shape);
    return this.g.weight(name, stored, () => this.file.readF32(name));
  }

  expectAbsent(name: string, why: string): void {
    if (this.file.has(name)) throw new VaeConfigError(`${this.file.path}: unexpected tensor '${name}': ${why}`);
  }

  conv(x: Value, prefix: string, cin: number, cout: number, k: number): Value {
    const w = this.tensor(`${prefix}.weight`, [cout, cin, k, k]);
    const bias = this.tensor(`${prefix}.bias`, [cout]);
    const p = (k - 1) / 2;
    return this.g.conv(x, w, bias, { pads: [p, p, p, p] });
  }

  groupNorm(x: Value, prefix: string, channels: number): Value {
    const groups = this.cfg.norm_num_groups;
    const gamma = this.tensor(`${prefix}.weight`, [channels], [channels, 1, 1]);
    const beta = this.tensor(`${prefix}.bias`, [channels], [channels, 1, 1]);
    const grouped = this.g.reshape(x, [0, groups, -1]);
    const normed = this.g.op(
      'InstanceNormalization',
      [
        grouped,
        this.g.constFloat(new Float32Array(groups).fill(1), [groups], 'gn_one'),
        this.g.constFloat(new Float32Array(groups), [groups], 'gn_zero'),
      ],
      { dtype: 'float32', shape: grouped.shape },
      { epsilon: { float: NORM_EPS } },
    );
    const back = this.g.op('Reshape', [normed, this.shapeOf(x)], { dtype: 'float32', shape: x.shape });
    return this.g.add(this.g.mul(back, gamma), beta);
  }

  resnet(x: Value, n: ResnetNames, cin: number, cout: number): Value {
    let h = this.g.silu(this.groupNorm(x, n.norm1, cin));
    h = this.conv(h, n.conv1, cin, cout, 3);
    h = this.g.silu(this.groupNorm(h, n.norm2, cout));
    h = this.conv(h, n.conv2, cout, cout, 3);
    let shortcut = x;
    if (cin !== cout) shortcut = this.conv(x, n.shortcut, cin, cout, 1);
    else this.expectAbsent(`${n.shortcut}.weight`, `the config gives this resnet ${cin} channels in and out, so it has no shortcut conv`);
    // output_scale_factor is 1 in the decoder: no division.
    return this.g.add(shortcut, h);
  }

  /** Single-head self-attention over the H·W positions, head dim = channels, with residual. */
  attention(x: Value, n: AttentionNames, c: number): Value {
    const stored = n.conv1x1 ? [c, c, 1, 1] : [c, c];
    const proj = (prefix: string): { w: Value; b: Value } => {
      expectShape(this.file, `${prefix}.weight`, stored);
      const w = this.g.linearWeight(`${prefix}.weight`, c, c, () => this.file.readF32(`${prefix}.weight`));
      return { w, b: this.tensor(`${prefix}.bias`, [c]) };
    };
    const h = this.groupNorm(x, n.norm, c);
    const seq = this.g.transpose(this.g.reshape(h, [0, c, -1]), [0, 2, 1]); // [B, HW, C]
    // The projections run as 2-D Gemms on [B·HW, C]; HW may be symbolic, so the way back to
    // [B, HW, C] is seq's runtime shape.
    const seqShape = this.shapeOf(seq);
    const project = (rows: Value, p: { w: Value; b: Value }): Value =>
      this.g.op('Reshape', [this.g.linear(rows, p.w, p.b), seqShape], { dtype: 'float32', shape: seq.shape });
    const flat = this.g.reshape(seq, [-1, c]);
    const qs = project(flat, proj(n.q));
    const ks = project(flat, proj(n.k));
    const vs = project(flat, proj(n.v));
    const o = proj(n.out);
    const scores = this.g.mul(this.g.matmul(qs, this.g.transpose(ks, [0, 2, 1])), this.g.constFloat([1 / Math.sqrt(c)], [1], 'attn_scale'));
    const attn = this.g.matmul(this.g.softmax(scores, -1), vs);
    const out = this.g.transpose(project(this.g.reshape(attn, [-1, c]), o), [0, 2, 1]); // [B, C, HW]
    const back = this.g.op('Reshape', [out, this.shapeOf(x)], { dtype: 'float32', shape: x.shape });
    return this.g.add(back, x);
  }

  /** Nearest-neighbour ×2 (torch `interpolate(scale_factor=2, mode="nearest")`), then a 3×3 conv. */
  upsample(x: Value, prefix: string, channels: number): Value {
    const [bd, c, h, w] = x.shape;
    const up = this.g.op(
      'Resize',
      [x, null, this.g.constFloat([1, 1, 2, 2], [4], 'resize_scales')],
      { dtype: 'float32', shape: [bd, c, double(h), double(w)] },
      // output pixel i reads input floor(i / 2): torch's nearest for an integer scale
      { mode: 'nearest', coordinate_transformation_mode: 'asymmetric', nearest_mode: 'floor' },
    );
    return this.conv(up, prefix, channels, channels, 3);
  }

  private shapeOf(x: Value): Value {
    return this.g.op('Shape', [x], { dtype: 'int64', shape: [x.shape.length] });
  }
}

/** 8 → 16; 'h' → '2h' → '4h': symbolic sizes keep a readable name in the ONNX signature. */
function double(d: Dim): Dim {
  if (typeof d === 'number') return d * 2;
  const m = /^(\d+)(.*)$/.exec(d);
  return m ? `${Number(m[1]) * 2}${m[2]}` : `2${d}`;
}

// ---- opening a checkpoint --------------------------------------------------------------------

export interface VaeSource {
  names: VaeNames;
  config: VaeConfig;
}

/** Detects the naming scheme and settles the config for an open weight file. */
export function resolveVae(file: WeightFile, format: VaeFormat | 'auto', given: VaeConfigJson = { config: {} }): VaeSource {
  const names = detectVaeNames(file, format);
  const config = inferVaeConfig(file, names, given.config);
  if (given.upBlockCount !== undefined && given.upBlockCount !== config.block_out_channels.length) {
    throw new VaeConfigError(
      `config: up_block_types has ${given.upBlockCount} entries but block_out_channels has ${config.block_out_channels.length}`,
    );
  }
  if (given.config.latent_size === undefined && given.sampleSize !== undefined) {
    const factor = 2 ** (config.block_out_channels.length - 1);
    if (given.sampleSize % factor === 0) config.latent_size = given.sampleSize / factor;
  }
  return { names, config };
}
