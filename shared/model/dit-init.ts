// DiT weights without a checkpoint: the paper's initialisation or random non-zero weights for tests
// and benchmarks, streamed tensor by tensor into safetensors; and a shapes-only view for FLOP counts.
import { MissingTensorError, WeightsError, writeSafetensors, type TensorInfo, type WeightFile } from '../weights/index.ts';
import { sincosPosEmbed, validateDitConfig } from './dit.ts';
import { ditTensorSpecs, type DitTensorSpec } from './dit-names.ts';
import type { DitConfig } from './modeldir.ts';

export type DitInit = 'original' | 'random';

/** xoshiro128** seeded through splitmix32 from (seed, tensor index): each tensor is reproducible on its own. */
class Rng {
  private s = new Uint32Array(4);
  constructor(seed: number, stream: number) {
    let z = (seed ^ Math.imul(stream + 1, 0x9e3779b9)) >>> 0;
    for (let i = 0; i < 4; i++) {
      // splitmix32
      z = (z + 0x9e3779b9) >>> 0;
      let x = z;
      x = Math.imul(x ^ (x >>> 16), 0x85ebca6b) >>> 0;
      x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35) >>> 0;
      this.s[i] = (x ^ (x >>> 16)) >>> 0;
    }
  }

  /** Uniform in (0, 1). */
  uniform(): number {
    const s = this.s;
    const r = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return (r + 0.5) / 4294967296;
  }

  /** Standard normal (Box–Muller). */
  fillNormal(out: Float32Array, std: number): Float32Array {
    for (let i = 0; i < out.length; i += 2) {
      const r = Math.sqrt(-2 * Math.log(this.uniform()));
      const a = 2 * Math.PI * this.uniform();
      out[i] = std * r * Math.cos(a);
      if (i + 1 < out.length) out[i + 1] = std * r * Math.sin(a);
    }
    return out;
  }

  fillUniform(out: Float32Array, bound: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = (2 * this.uniform() - 1) * bound;
    return out;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

const numel = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

/**
 * One tensor's initial values. `original` follows DiT's `initialize_weights`: xavier-uniform linear
 * weights (the patch conv as a [hidden, C·p·p] matrix) with zero biases, normal(0.02) label table and
 * timestep-MLP weights, zero adaLN modulation and final linear, sin-cos pos_embed. `random` makes
 * every tensor non-zero: weights normal(1/√fan_in) so activations stay O(1) at any depth, biases
 * normal(0.02), label table normal(0.5).
 */
export function initTensor(spec: DitTensorSpec, config: DitConfig, init: DitInit, seed: number, index: number): Float32Array {
  const n = numel(spec.shape);
  const out = new Float32Array(n);
  const rng = new Rng(seed, index);
  const name = spec.name;
  if (name === 'pos_embed') return sincosPosEmbed(config.hidden_size, config.input_size / config.patch_size);
  const isWeight = name.endsWith('.weight');
  const fanIn = isWeight ? n / spec.shape[0] : 0;
  const fanOut = spec.shape[0];
  if (init === 'random') {
    if (name === 'y_embedder.embedding_table.weight') return rng.fillNormal(out, 0.5);
    return rng.fillNormal(out, isWeight ? 1 / Math.sqrt(fanIn) : 0.02);
  }
  if (!isWeight) return out; // every bias starts at zero
  if (name.includes('adaLN_modulation') || name.startsWith('final_layer.')) return out;
  if (name === 'y_embedder.embedding_table.weight' || name.startsWith('t_embedder.mlp.')) return rng.fillNormal(out, 0.02);
  return rng.fillUniform(out, Math.sqrt(6 / (fanIn + fanOut)));
}

/** Writes a DiT state_dict (original names) to `path`, one tensor in memory at a time. */
export function initDitWeights(
  config: DitConfig,
  path: string,
  opts: { init?: DitInit; seed?: number; onProgress?: (done: number, total: number, name: string) => void } = {},
): { params: number; bytes: number; tensors: number } {
  validateDitConfig(config);
  const init = opts.init ?? 'random';
  if (init !== 'random' && init !== 'original') throw new WeightsError(`unknown init '${String(init)}': use original or random`);
  const seed = opts.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new WeightsError(`seed must be a non-negative integer, got ${seed}`);
  const specs = ditTensorSpecs(config);
  let done = 0;
  writeSafetensors(
    path,
    specs.map((s, i) => ({
      name: s.name,
      dtype: 'F32' as const,
      shape: s.shape,
      data: () => {
        const d = initTensor(s, config, init, seed, i);
        opts.onProgress?.(++done, specs.length, s.name);
        return d;
      },
    })),
    { format: 'pt', ditpipe_init: init, ditpipe_seed: String(seed), ditpipe_config: JSON.stringify(config) },
  );
  const total = specs.reduce((a, s) => a + numel(s.shape), 0);
  const params = total - numel(specs[0].shape); // pos_embed is fixed, not a parameter
  return { params, bytes: total * 4, tensors: specs.length };
}

/** A WeightFile holding only the shapes of a config's tensors; reading any data throws. For FLOP counts. */
export function shapeOnlyDitWeights(config: DitConfig): WeightFile {
  const specs = new Map(ditTensorSpecs(config).map((s) => [s.name, s]));
  const path = `<shapes of ${JSON.stringify(config)}>`;
  const spec = (name: string): DitTensorSpec => {
    const s = specs.get(name);
    if (!s) throw new MissingTensorError(name, path);
    return s;
  };
  const noData = (name: string): never => {
    throw new WeightsError(`${path}: '${name}' has no data (shapes-only weights)`);
  };
  return {
    path,
    format: 'safetensors',
    names: () => [...specs.keys()],
    has: (name) => specs.has(name),
    info: (name): TensorInfo => ({ name, dtype: 'F32', shape: [...spec(name).shape] }),
    readF32: noData,
    readI64: noData,
    close: () => {},
  };
}
