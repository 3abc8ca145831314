// Gflops counted from the built graph reproduce the DiT paper's table (multiply-accumulates of
// linear/conv layers and the two attention matmuls, per forward of one sample). Shapes only: the
// weights are never read.
import { describe, expect, it } from 'vitest';
import { buildDitGraph, ditGraphBuilder, type DitGraphKind } from '../../shared/model/dit.ts';
import { shapeOnlyDitWeights } from '../../shared/model/dit-init.ts';
import { graphGflops } from '../../shared/model/modeldir-write.ts';
import { DIT_PRESETS, ditPreset } from '../../shared/model/presets.ts';

// Peebles & Xie, Table 4 (256×256, i.e. 32×32 latents).
const PAPER_256: Record<string, number> = {
  'DiT-S/8': 0.36,
  'DiT-S/4': 1.41,
  'DiT-S/2': 6.06,
  'DiT-B/8': 1.42,
  'DiT-B/4': 5.56,
  'DiT-B/2': 23.01,
  'DiT-L/8': 5.01,
  'DiT-L/4': 19.7,
  'DiT-L/2': 80.71,
  'DiT-XL/8': 7.39,
  'DiT-XL/4': 29.05,
  'DiT-XL/2': 118.64,
};

describe('Gflops (multiply-accumulates) from the graph', () => {
  it('covers all 12 presets', () => {
    expect(Object.keys(DIT_PRESETS).sort()).toEqual(Object.keys(PAPER_256).sort());
  });

  it.each(Object.entries(PAPER_256))('%s at 256×256 is within 1%% of the paper (%s)', (preset, paper) => {
    const c = ditPreset(preset);
    const gflops = graphGflops(buildDitGraph(shapeOnlyDitWeights(c), c));
    expect(Math.abs(gflops / paper - 1)).toBeLessThan(0.01);
  });

  it('DiT-XL/2 at 512×512 is within 1% of 524.6', () => {
    const c = { ...ditPreset('DiT-XL/2'), input_size: 64 };
    const gflops = graphGflops(buildDitGraph(shapeOnlyDitWeights(c), c));
    expect(Math.abs(gflops / 524.6 - 1)).toBeLessThan(0.01);
  });

  it.each(Object.keys(PAPER_256))('%s step-cache graphs: head + tail = full, skip is the final layer alone', (preset) => {
    const c = ditPreset(preset);
    const build = ditGraphBuilder(shapeOnlyDitWeights(c), c);
    const macs = (k: DitGraphKind): number => [...build(k).macs.values()].reduce((a, b) => a + b, 0);
    const [full, head, tail, skip] = (['full', 'head', 'tail', 'skip'] as const).map(macs);
    expect(head + tail).toBe(full);
    // By hand, per sample: D = width, N tokens, p = patch, C in / OC out channels.
    const D = c.hidden_size;
    const N = (c.input_size / c.patch_size) ** 2;
    const pp = c.patch_size ** 2;
    const OC = c.learn_sigma ? 2 * c.in_channels : c.in_channels;
    const finalLayer = D * 2 * D + N * D * pp * OC; // adaLN (shift, scale) + projection
    const block = D * 6 * D + N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * 4 * D; // adaLN, qkv, attention, proj, MLP
    const embed = N * D * c.in_channels * pp + 256 * D + D * D; // patch conv, timestep MLP
    expect(skip).toBe(finalLayer);
    expect(head).toBe(embed + block);
    expect(tail).toBe((c.depth - 1) * block + finalLayer);
  });

  it('never reads weight data while building', () => {
    const c = ditPreset('DiT-S/8');
    const g = buildDitGraph(shapeOnlyDitWeights(c), c);
    const weight = g.initializers.find((i) => i.name === 'blocks.0.attn.qkv.weight')!;
    expect(() => weight.load()).toThrow(/has no data/);
  });
});
