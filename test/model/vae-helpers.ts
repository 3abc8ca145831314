// Shared by the VAE tests: golden data, renaming to other checkpoint layouts, running a model dir.
import { readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import * as ort from 'onnxruntime-node';
import { openWeights, writeSafetensors, type TensorToWrite } from '../../shared/weights/index.ts';

export const ROOT = resolve(import.meta.dirname, '../..');
export const GOLDEN = resolve(ROOT, '../shared/golden/vae');

export interface GoldenCase {
  name: string;
  config: Record<string, unknown> & {
    block_out_channels: number[];
    layers_per_block: number;
    norm_num_groups: number;
    latent_channels: number;
    out_channels: number;
    latent_size: number;
  };
  params: number;
  weights: string;
  z: { data: Float32Array; shape: number[] };
  image: { data: Float32Array; shape: number[] };
  uint8: Uint8Array;
}

export function loadCase(name: string): GoldenCase {
  const index = JSON.parse(readFileSync(join(GOLDEN, 'index.json'), 'utf8')) as {
    cases: Record<string, { config: GoldenCase['config']; params: number }>;
  };
  const io = openWeights(join(GOLDEN, name, 'io.safetensors'));
  try {
    const u8 = io.readI64('image_uint8_nhwc');
    return {
      name,
      config: index.cases[name].config,
      params: index.cases[name].params,
      weights: join(GOLDEN, name, 'weights.safetensors'),
      z: { data: io.readF32('z'), shape: io.info('z').shape },
      image: { data: io.readF32('image'), shape: io.info('image').shape },
      uint8: Uint8Array.from(u8, (x) => Number(x)),
    };
  } finally {
    io.close();
  }
}

/**
 * Writes the case's decoder config as a `--config` JSON file (norm_num_groups is not in the shapes),
 * with the golden set's scaling factor (SD's) unless `extra` says otherwise.
 */
export function writeConfig(dir: string, c: GoldenCase, extra: Record<string, unknown> = {}): string {
  const path = join(dir, `${c.name}-config.json`);
  writeFileSync(path, JSON.stringify({ scaling_factor: 0.18215, ...c.config, ...extra }));
  return path;
}

/**
 * Copies a weight file under new names. `rename` returns the new name and optionally a new shape
 * (same element count), or null to drop the tensor; `extra` tensors are appended.
 */
export function renameWeights(
  src: string,
  dst: string,
  rename: (name: string, shape: number[]) => { name: string; shape?: number[] } | null,
  extra: TensorToWrite[] = [],
  metadata?: Record<string, string>,
): void {
  const f = openWeights(src);
  try {
    const out: TensorToWrite[] = [];
    for (const n of f.names()) {
      const shape = f.info(n).shape;
      const r = rename(n, shape);
      if (r) out.push({ name: r.name, dtype: 'F32', shape: r.shape ?? shape, data: f.readF32(n) });
    }
    writeSafetensors(dst, [...out, ...extra], metadata);
  } finally {
    f.close();
  }
}

/** Diffusers names → the original LDM/CompVis names, written independently of the compiler's table. */
export function toLdmName(name: string, shape: number[], numBlocks: number, prefix = ''): { name: string; shape?: number[] } {
  let n = name
    .replace(/^decoder\.mid_block\.resnets\.(\d+)\./, (_, i: string) => `decoder.mid.block_${Number(i) + 1}.`)
    .replace(/^decoder\.mid_block\.attentions\.0\.group_norm\./, 'decoder.mid.attn_1.norm.')
    .replace(/^decoder\.mid_block\.attentions\.0\.(?:to_q|query)\./, 'decoder.mid.attn_1.q.')
    .replace(/^decoder\.mid_block\.attentions\.0\.(?:to_k|key)\./, 'decoder.mid.attn_1.k.')
    .replace(/^decoder\.mid_block\.attentions\.0\.(?:to_v|value)\./, 'decoder.mid.attn_1.v.')
    .replace(/^decoder\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\./, 'decoder.mid.attn_1.proj_out.')
    .replace(
      /^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\./,
      (_, k: string, j: string) => `decoder.up.${numBlocks - 1 - Number(k)}.block.${j}.`,
    )
    .replace(
      /^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\./,
      (_, k: string) => `decoder.up.${numBlocks - 1 - Number(k)}.upsample.conv.`,
    )
    .replace(/\.conv_shortcut\./, '.nin_shortcut.')
    .replace(/^decoder\.conv_norm_out\./, 'decoder.norm_out.');
  n = prefix + n;
  // LDM's attention projections are 1×1 convolutions.
  const isAttnWeight = /^decoder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$/.test(n.slice(prefix.length));
  return isAttnWeight ? { name: n, shape: [...shape, 1, 1] } : { name: n };
}

/** Diffusers current attention names → the legacy ones. */
export function toLegacyName(name: string): { name: string } {
  return {
    name: name
      .replace('.attentions.0.to_q.', '.attentions.0.query.')
      .replace('.attentions.0.to_k.', '.attentions.0.key.')
      .replace('.attentions.0.to_v.', '.attentions.0.value.')
      .replace('.attentions.0.to_out.0.', '.attentions.0.proj_attn.'),
  };
}

export async function runDecoder(onnxPath: string, z: Float32Array, shape: number[]): Promise<{ data: Float32Array; dims: number[] }> {
  const s = await ort.InferenceSession.create(onnxPath);
  try {
    const out = await s.run({ z: new ort.Tensor('float32', z, shape) });
    return { data: out.image.data as Float32Array, dims: [...out.image.dims] };
  } finally {
    await s.release();
  }
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
