// `model init dit`: deterministic weights that build and run; `original` reproduces the paper's init.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildDitModel } from '../../shared/model/dit.ts';
import { initDitWeights } from '../../shared/model/dit-init.ts';
import { ditTensorSpecs } from '../../shared/model/dit-names.ts';
import type { DitConfig } from '../../shared/model/modeldir.ts';
import { openWeights } from '../../shared/weights/index.ts';
import { cli, runDit } from './dit-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-dit-init-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const config: DitConfig = {
  input_size: 8,
  patch_size: 2,
  in_channels: 4,
  hidden_size: 96,
  depth: 3,
  num_heads: 6,
  num_classes: 10,
  learn_sigma: true,
};

function inputs(batch: number): { x: Float32Array; t: BigInt64Array; y: BigInt64Array; shape: number[] } {
  const x = Float32Array.from({ length: batch * 4 * 8 * 8 }, (_, i) => Math.sin(i * 0.37));
  return {
    x,
    t: BigInt64Array.from({ length: batch }, (_, i) => BigInt(i * 333)),
    y: BigInt64Array.from({ length: batch }, (_, i) => BigInt(i % 11)),
    shape: [batch, 4, 8, 8],
  };
}

describe('random init', () => {
  const a = join(tmp, 'a.safetensors');
  const res = initDitWeights(config, a, { init: 'random', seed: 7 });

  it('is deterministic in the seed and differs across seeds', () => {
    initDitWeights(config, join(tmp, 'b.safetensors'), { init: 'random', seed: 7 });
    initDitWeights(config, join(tmp, 'c.safetensors'), { init: 'random', seed: 8 });
    const bytes = (n: string) => readFileSync(join(tmp, n));
    expect(bytes('a.safetensors').equals(bytes('b.safetensors'))).toBe(true);
    expect(bytes('a.safetensors').equals(bytes('c.safetensors'))).toBe(false);
  });

  it('makes every tensor non-zero and counts params without pos_embed', () => {
    const f = openWeights(a);
    let total = 0;
    for (const s of ditTensorSpecs(config)) {
      const d = f.readF32(s.name);
      expect(
        d.some((v) => v !== 0),
        s.name,
      ).toBe(true);
      if (s.name !== 'pos_embed') total += d.length;
    }
    f.close();
    expect(res.params).toBe(total);
  });

  it('builds into a model with finite, non-trivial outputs that depend on t and y', async () => {
    const m = buildDitModel({ weights: a, out: join(tmp, 'model'), config: { num_heads: 6 } });
    expect(m.meta.config).toEqual(config);
    expect(m.meta.params).toBe(res.params);
    const { x, t, y, shape } = inputs(3);
    const out = await runDit(m.onnxPath, x, shape, t, y);
    expect(out.every(Number.isFinite)).toBe(true);
    const mean = out.reduce((p, q) => p + q, 0) / out.length;
    const std = Math.sqrt(out.reduce((p, q) => p + (q - mean) ** 2, 0) / out.length);
    expect(std).toBeGreaterThan(0.05);
    expect(std).toBeLessThan(100);
    const row = out.length / 3;
    const sameX = new Float32Array((3 * row) / 2).fill(0.25);
    const out2 = await runDit(m.onnxPath, sameX, shape, t, y);
    // Same x in every row: differences between rows come from t and y alone.
    expect(Math.abs(out2[0] - out2[row])).toBeGreaterThan(1e-4);
  });
});

describe('original init (initialize_weights of the paper)', () => {
  const p = join(tmp, 'orig.safetensors');
  initDitWeights(config, p, { init: 'original', seed: 1 });
  const f = openWeights(p);
  afterAll(() => f.close());

  it('zeroes adaLN modulation, the final layer and all biases; xavier-uniform linears; normal(0.02) embeddings', () => {
    const D = config.hidden_size;
    for (const s of ditTensorSpecs(config)) {
      const d = f.readF32(s.name);
      const maxAbs = d.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      if (s.name === 'pos_embed') continue;
      if (s.name.endsWith('.bias') || s.name.includes('adaLN_modulation') || s.name.startsWith('final_layer.')) {
        expect(maxAbs, s.name).toBe(0);
      } else if (s.name === 'y_embedder.embedding_table.weight' || s.name.startsWith('t_embedder.')) {
        const std = Math.sqrt(d.reduce((a, v) => a + v * v, 0) / d.length);
        expect(std, s.name).toBeGreaterThan(0.018);
        expect(std, s.name).toBeLessThan(0.022);
      } else {
        const fanIn = d.length / s.shape[0];
        const bound = Math.sqrt(6 / (fanIn + s.shape[0]));
        expect(maxAbs, s.name).toBeLessThanOrEqual(bound);
        expect(maxAbs, s.name).toBeGreaterThan(0.9 * bound);
      }
    }
    expect(f.info('blocks.0.attn.qkv.weight').shape).toEqual([3 * D, D]);
  });

  it('gives an all-zero output, as the zero-initialised final layer implies', async () => {
    const m = buildDitModel({ weights: p, out: join(tmp, 'orig-model'), config: { num_heads: 6 } });
    const { x, t, y, shape } = inputs(2);
    const out = await runDit(m.onnxPath, x, shape, t, y);
    expect(out.every((v) => v === 0)).toBe(true);
  });
});

describe('ditpipe model init dit', () => {
  it('writes a preset-shaped checkpoint that builds', async () => {
    const w = join(tmp, 'cli.safetensors');
    const r = await cli([
      'model',
      'init',
      'dit',
      '--preset',
      'DiT-S/8',
      '--input-size',
      '16',
      '--config',
      '{"depth": 2, "num_classes": 10}',
      '--seed',
      '3',
      '--out',
      w,
    ]);
    expect(r.stderr).toContain('initialising: '); // not a TTY: plain progress lines
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/random init, seed 3/);
    const f = openWeights(w);
    expect(f.info('x_embedder.proj.weight').shape).toEqual([384, 4, 8, 8]);
    expect(f.info('pos_embed').shape).toEqual([1, 4, 384]);
    f.close();
    const m = buildDitModel({ weights: w, out: join(tmp, 'cli-model') });
    expect(m.meta.config).toEqual({
      input_size: 16,
      patch_size: 8,
      in_channels: 4,
      hidden_size: 384,
      depth: 2,
      num_heads: 6,
      num_classes: 10,
      learn_sigma: true,
    });
  });
});
