// DiT parameter names: the canonical (original facebookresearch/DiT) tensor list for a config, and a
// view that serves those names from a diffusers `DiTTransformer2DModel` state dict.
import { MissingTensorError, WeightsError, expectShape, type WeightFile } from '../weights/index.ts';
import { modelOutChannels } from '../diffusion/guidance.ts';
import type { DitConfig } from './modeldir.ts';

export type DitFormat = 'original' | 'diffusers';

/** Width of the sinusoidal timestep features (`frequency_embedding_size` in the original). */
export const FREQ_EMBED = 256;
export const MLP_RATIO = 4;

export interface DitTensorSpec {
  name: string;
  shape: number[];
}

export function ditOutChannels(c: DitConfig): number {
  return modelOutChannels(c.in_channels, c.learn_sigma);
}

export function ditTokens(c: DitConfig): number {
  return (c.input_size / c.patch_size) ** 2;
}

/** Every tensor of the original model's state_dict, in module order, with its shape. */
export function ditTensorSpecs(c: DitConfig): DitTensorSpec[] {
  const D = c.hidden_size;
  const p = c.patch_size;
  const specs: DitTensorSpec[] = [
    { name: 'pos_embed', shape: [1, ditTokens(c), D] },
    { name: 'x_embedder.proj.weight', shape: [D, c.in_channels, p, p] },
    { name: 'x_embedder.proj.bias', shape: [D] },
    { name: 't_embedder.mlp.0.weight', shape: [D, FREQ_EMBED] },
    { name: 't_embedder.mlp.0.bias', shape: [D] },
    { name: 't_embedder.mlp.2.weight', shape: [D, D] },
    { name: 't_embedder.mlp.2.bias', shape: [D] },
    // One extra row: label `num_classes` is the null (unconditional) label of classifier-free guidance.
    { name: 'y_embedder.embedding_table.weight', shape: [c.num_classes + 1, D] },
  ];
  const H = D * MLP_RATIO;
  for (let i = 0; i < c.depth; i++) {
    const b = `blocks.${i}`;
    specs.push(
      { name: `${b}.attn.qkv.weight`, shape: [3 * D, D] },
      { name: `${b}.attn.qkv.bias`, shape: [3 * D] },
      { name: `${b}.attn.proj.weight`, shape: [D, D] },
      { name: `${b}.attn.proj.bias`, shape: [D] },
      { name: `${b}.mlp.fc1.weight`, shape: [H, D] },
      { name: `${b}.mlp.fc1.bias`, shape: [H] },
      { name: `${b}.mlp.fc2.weight`, shape: [D, H] },
      { name: `${b}.mlp.fc2.bias`, shape: [D] },
      { name: `${b}.adaLN_modulation.1.weight`, shape: [6 * D, D] },
      { name: `${b}.adaLN_modulation.1.bias`, shape: [6 * D] },
    );
  }
  const out = p * p * ditOutChannels(c);
  specs.push(
    { name: 'final_layer.linear.weight', shape: [out, D] },
    { name: 'final_layer.linear.bias', shape: [out] },
    { name: 'final_layer.adaLN_modulation.1.weight', shape: [2 * D, D] },
    { name: 'final_layer.adaLN_modulation.1.bias', shape: [2 * D] },
  );
  return specs;
}

// ---- diffusers names --------------------------------------------------------------------------

/** The diffusers tensors one original tensor comes from (several rows concatenated for qkv). */
type DiffusersSource = { concat: string[] } | { computed: 'sincos' };

const EMB = 'transformer_blocks.0.norm1.emb';

/**
 * Maps an original name to its diffusers source. The diffusers model keeps a copy of the timestep
 * and label embedders in every block's AdaLayerNormZero but only uses block 0's for the final layer;
 * all copies are equal in converted checkpoints, so block 0's stands for the original's single one.
 */
export function diffusersSource(orig: string): DiffusersSource {
  const one = (n: string): DiffusersSource => ({ concat: [n] });
  const fixed: Record<string, string> = {
    'x_embedder.proj.weight': 'pos_embed.proj.weight',
    'x_embedder.proj.bias': 'pos_embed.proj.bias',
    't_embedder.mlp.0.weight': `${EMB}.timestep_embedder.linear_1.weight`,
    't_embedder.mlp.0.bias': `${EMB}.timestep_embedder.linear_1.bias`,
    't_embedder.mlp.2.weight': `${EMB}.timestep_embedder.linear_2.weight`,
    't_embedder.mlp.2.bias': `${EMB}.timestep_embedder.linear_2.bias`,
    'y_embedder.embedding_table.weight': `${EMB}.class_embedder.embedding_table.weight`,
    // diffusers chunks proj_out_1 as (shift, scale), the same order as the original FinalLayer.
    'final_layer.adaLN_modulation.1.weight': 'proj_out_1.weight',
    'final_layer.adaLN_modulation.1.bias': 'proj_out_1.bias',
    'final_layer.linear.weight': 'proj_out_2.weight',
    'final_layer.linear.bias': 'proj_out_2.bias',
  };
  if (orig === 'pos_embed') return { computed: 'sincos' };
  if (orig in fixed) return one(fixed[orig]);
  const m = /^blocks\.(\d+)\.(.+)\.(weight|bias)$/.exec(orig);
  if (m) {
    const [, i, mod, kind] = m;
    const b = `transformer_blocks.${i}`;
    switch (mod) {
      case 'attn.qkv':
        return { concat: ['to_q', 'to_k', 'to_v'].map((x) => `${b}.attn1.${x}.${kind}`) };
      case 'attn.proj':
        return one(`${b}.attn1.to_out.0.${kind}`);
      case 'mlp.fc1':
        return one(`${b}.ff.net.0.proj.${kind}`);
      case 'mlp.fc2':
        return one(`${b}.ff.net.2.${kind}`);
      // AdaLayerNormZero chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), as the original.
      case 'adaLN_modulation.1':
        return one(`${b}.norm1.linear.${kind}`);
    }
  }
  throw new WeightsError(`no diffusers equivalent for DiT tensor '${orig}'`);
}

/** Detects the naming scheme from the tensor names. */
export function detectDitFormat(file: WeightFile): DitFormat {
  if (file.has('x_embedder.proj.weight')) return 'original';
  if (file.has('pos_embed.proj.weight')) return 'diffusers';
  throw new WeightsError(
    `${file.path}: not a DiT checkpoint: found neither 'x_embedder.proj.weight' (original names) nor 'pos_embed.proj.weight' (diffusers names)`,
  );
}

/**
 * Original-named tensors served from a weight file in either naming scheme. `pos_embed` of a
 * diffusers checkpoint is not stored (diffusers computes it), so `read` returns null for it.
 */
export class DitTensors {
  constructor(
    readonly file: WeightFile,
    readonly format: DitFormat,
  ) {}

  /** Source tensor name(s) of an original name, for messages. */
  sourceNames(orig: string): string[] {
    if (this.format === 'original') return [orig];
    const s = diffusersSource(orig);
    return 'concat' in s ? s.concat : [];
  }

  /** Shape of the original-named tensor, or null when the file doesn't store it. */
  shape(orig: string): number[] | null {
    if (this.format === 'original') return this.file.has(orig) ? this.file.info(orig).shape : null;
    const s = diffusersSource(orig);
    if ('computed' in s) return null;
    if (!s.concat.every((n) => this.file.has(n))) return null;
    const shapes = s.concat.map((n) => this.file.info(n).shape);
    return [shapes.reduce((acc, sh) => acc + sh[0], 0), ...shapes[0].slice(1)];
  }

  /** Throws MissingTensorError / ShapeMismatchError naming the tensor as stored in the file. */
  check(spec: DitTensorSpec): void {
    if (this.format === 'original') {
      if (!this.file.has(spec.name)) throw new MissingTensorError(spec.name, this.file.path);
      expectShape(this.file, spec.name, spec.shape);
      return;
    }
    const s = diffusersSource(spec.name);
    if ('computed' in s) return;
    const part = [spec.shape[0] / s.concat.length, ...spec.shape.slice(1)];
    for (const n of s.concat) {
      if (!this.file.has(n)) throw new MissingTensorError(n, this.file.path);
      expectShape(this.file, n, part);
    }
  }

  stores(orig: string): boolean {
    return this.format === 'original' || !('computed' in diffusersSource(orig));
  }

  read(orig: string): Float32Array {
    if (this.format === 'original') return this.file.readF32(orig);
    const s = diffusersSource(orig);
    if ('computed' in s) throw new WeightsError(`'${orig}' is not stored in diffusers checkpoints`);
    if (s.concat.length === 1) return this.file.readF32(s.concat[0]);
    const parts = s.concat.map((n) => this.file.readF32(n));
    const out = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }

  /** Number of transformer blocks stored (`blocks.N` / `transformer_blocks.N`), checked to be contiguous. */
  depth(): number {
    const re = this.format === 'original' ? /^blocks\.(\d+)\./ : /^transformer_blocks\.(\d+)\./;
    const seen = new Set<number>();
    for (const n of this.file.names()) {
      const m = re.exec(n);
      if (m) seen.add(Number(m[1]));
    }
    for (let i = 0; i < seen.size; i++) {
      if (!seen.has(i))
        throw new WeightsError(`${this.file.path}: transformer blocks are not numbered 0..${seen.size - 1} (block ${i} is missing)`);
    }
    return seen.size;
  }
}

/** The per-block embedder copies of a diffusers DiT (block 0's are used; the rest should be equal). */
export function diffusersEmbedderCopies(depth: number): { block0: string; copies: string[] }[] {
  const parts = [
    'timestep_embedder.linear_1.weight',
    'timestep_embedder.linear_1.bias',
    'timestep_embedder.linear_2.weight',
    'timestep_embedder.linear_2.bias',
    'class_embedder.embedding_table.weight',
  ];
  return parts.map((p) => ({
    block0: `transformer_blocks.0.norm1.emb.${p}`,
    copies: Array.from({ length: depth - 1 }, (_, i) => `transformer_blocks.${i + 1}.norm1.emb.${p}`),
  }));
}

/** Original state_dict name → diffusers names and how to split it; used to make diffusers fixtures. */
export function originalToDiffusers(orig: string, depth: number): { names: string[]; copies: boolean } | null {
  const s = diffusersSource(orig);
  if ('computed' in s) return null;
  if (s.concat.length > 1) return { names: s.concat, copies: false };
  const n = s.concat[0];
  if (n.startsWith(`${EMB}.`)) {
    const suffix = n.slice(EMB.length);
    return { names: Array.from({ length: depth }, (_, i) => `transformer_blocks.${i}.norm1.emb${suffix}`), copies: true };
  }
  return { names: [n], copies: false };
}
