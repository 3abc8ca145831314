// Tensor names of the VAE decoder under the three schemes published checkpoints use: diffusers
// (current attention names), diffusers before the Attention refactor (query/key/value/proj_attn),
// and the original LDM/CompVis code. The graph builder only ever asks this module for names, so
// one builder serves all three.
import { WeightsError, type WeightFile } from '../weights/index.ts';

export type VaeNameScheme = 'diffusers' | 'diffusers-legacy' | 'ldm';
/** What `--format` accepts: the legacy attention names are a variant of diffusers, told apart by key. */
export type VaeFormat = 'diffusers' | 'ldm';
export const VAE_FORMATS: readonly VaeFormat[] = ['diffusers', 'ldm'];

export interface ResnetNames {
  norm1: string;
  conv1: string;
  norm2: string;
  conv2: string;
  /** 1×1 conv used when the block changes its channel count. */
  shortcut: string;
}

export interface AttentionNames {
  norm: string;
  q: string;
  k: string;
  v: string;
  out: string;
  /** LDM stores q/k/v/out as 1×1 convs ([C,C,1,1]); diffusers as linears ([C,C]). */
  conv1x1: boolean;
}

export interface VaeNames {
  scheme: VaeNameScheme;
  /** Prefix in front of every name (e.g. `first_stage_model.` in a full Stable Diffusion checkpoint). */
  prefix: string;
  postQuantConv: string;
  convIn: string;
  /** i = 0 before the attention, 1 after. */
  midResnet(i: number): ResnetNames;
  midAttention: AttentionNames;
  /** k in diffusers order: up block 0 is the deepest (lowest resolution). */
  upResnet(k: number, j: number, numBlocks: number): ResnetNames;
  upsampleConv(k: number, numBlocks: number): string;
  normOut: string;
  convOut: string;
}

function resnet(prefix: string, shortcut: string): ResnetNames {
  return {
    norm1: `${prefix}.norm1`,
    conv1: `${prefix}.conv1`,
    norm2: `${prefix}.norm2`,
    conv2: `${prefix}.conv2`,
    shortcut: `${prefix}.${shortcut}`,
  };
}

export function vaeNames(scheme: VaeNameScheme, prefix = ''): VaeNames {
  const p = prefix;
  if (scheme === 'ldm') {
    const attn = `${p}decoder.mid.attn_1`;
    return {
      scheme,
      prefix,
      postQuantConv: `${p}post_quant_conv`,
      convIn: `${p}decoder.conv_in`,
      midResnet: (i) => resnet(`${p}decoder.mid.block_${i + 1}`, 'nin_shortcut'),
      midAttention: { norm: `${attn}.norm`, q: `${attn}.q`, k: `${attn}.k`, v: `${attn}.v`, out: `${attn}.proj_out`, conv1x1: true },
      // LDM indexes up levels by resolution (0 = full size), the reverse of diffusers' up_blocks.
      upResnet: (k, j, n) => resnet(`${p}decoder.up.${n - 1 - k}.block.${j}`, 'nin_shortcut'),
      upsampleConv: (k, n) => `${p}decoder.up.${n - 1 - k}.upsample.conv`,
      normOut: `${p}decoder.norm_out`,
      convOut: `${p}decoder.conv_out`,
    };
  }
  const attn = `${p}decoder.mid_block.attentions.0`;
  const legacy = scheme === 'diffusers-legacy';
  return {
    scheme,
    prefix,
    postQuantConv: `${p}post_quant_conv`,
    convIn: `${p}decoder.conv_in`,
    midResnet: (i) => resnet(`${p}decoder.mid_block.resnets.${i}`, 'conv_shortcut'),
    midAttention: {
      norm: `${attn}.group_norm`,
      q: `${attn}.${legacy ? 'query' : 'to_q'}`,
      k: `${attn}.${legacy ? 'key' : 'to_k'}`,
      v: `${attn}.${legacy ? 'value' : 'to_v'}`,
      out: `${attn}.${legacy ? 'proj_attn' : 'to_out.0'}`,
      conv1x1: false,
    },
    upResnet: (k, j) => resnet(`${p}decoder.up_blocks.${k}.resnets.${j}`, 'conv_shortcut'),
    upsampleConv: (k) => `${p}decoder.up_blocks.${k}.upsamplers.0.conv`,
    normOut: `${p}decoder.conv_norm_out`,
    convOut: `${p}decoder.conv_out`,
  };
}

// Full Stable Diffusion checkpoints nest the VAE under one of these.
const PREFIXES = ['', 'first_stage_model.', 'vae.'];

/**
 * Picks the naming scheme from the tensor names. `format` restricts the choice (the user said
 * which family it is); a file that matches none gets an error saying what was looked for.
 */
export function detectVaeNames(file: WeightFile, format: VaeFormat | 'auto' = 'auto'): VaeNames {
  const names = file.names();
  for (const prefix of PREFIXES) {
    const has = (stem: string): boolean => names.some((n) => n.startsWith(prefix + stem));
    const ldm = has('decoder.mid.');
    const diffusers = has('decoder.mid_block.');
    if (ldm && (format === 'auto' || format === 'ldm')) return vaeNames('ldm', prefix);
    if (diffusers && (format === 'auto' || format === 'diffusers')) {
      const legacy = has('decoder.mid_block.attentions.0.query.');
      return vaeNames(legacy ? 'diffusers-legacy' : 'diffusers', prefix);
    }
    if ((ldm || diffusers) && format !== 'auto') {
      throw new WeightsError(
        `${file.path}: --format ${format} given, but the tensors use ${ldm ? 'LDM (decoder.mid.*)' : 'diffusers (decoder.mid_block.*)'} names`,
      );
    }
  }
  throw new WeightsError(
    `${file.path}: no VAE decoder found: expected tensors named decoder.mid_block.* (diffusers) or decoder.mid.* (LDM)`,
  );
}

/** Number of up blocks, counted from the tensor names (diffusers order or LDM levels alike). */
export function countUpBlocks(file: WeightFile, names: VaeNames): number {
  const re =
    names.scheme === 'ldm'
      ? new RegExp(`^${escape(names.prefix)}decoder\\.up\\.(\\d+)\\.`)
      : new RegExp(`^${escape(names.prefix)}decoder\\.up_blocks\\.(\\d+)\\.`);
  return countIndices(file, re);
}

/** Resnets in up block k (diffusers order), counted from the tensor names. */
export function countUpResnets(file: WeightFile, names: VaeNames, k: number, numBlocks: number): number {
  const stem = names.upResnet(k, 0, numBlocks).conv1.replace(/\.0\.conv1$/, '');
  return countIndices(file, new RegExp(`^${escape(stem)}\\.(\\d+)\\.`));
}

function countIndices(file: WeightFile, re: RegExp): number {
  let max = -1;
  for (const n of file.names()) {
    const m = re.exec(n);
    if (m) max = Math.max(max, Number(m[1]));
  }
  return max + 1;
}

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
