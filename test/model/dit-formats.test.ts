// The same golden weights under diffusers names and as torch.save checkpoints build to the same model.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildDitModel, resolveDitConfig } from '../../shared/model/dit.ts';
import { openWeights } from '../../shared/weights/index.ts';
import { cli, goldenCases, goldenIo, maxAbsDiff, runDit, writeDiffusersFixture } from './dit-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-dit-formats-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const cases = goldenCases();
const byName = (n: string) => cases.find((c) => c.name === n)!;

describe.each(cases)('diffusers names: $name', (gc) => {
  it('detects the scheme, builds identical outputs, computes pos_embed', async () => {
    const fixture = join(tmp, `${gc.name}-diffusers.safetensors`);
    writeDiffusersFixture(join(gc.dir, 'weights.safetensors'), fixture, gc.config.depth);
    const f = openWeights(fixture);
    expect(f.has('pos_embed')).toBe(false);
    expect(f.has('transformer_blocks.0.attn1.to_q.weight')).toBe(true);
    f.close();

    const io = goldenIo(gc.dir);
    const orig = buildDitModel({ weights: join(gc.dir, 'weights.safetensors'), out: join(tmp, `${gc.name}-orig`), config: gc.config });
    const warnings: string[] = [];
    const diff = buildDitModel({
      weights: fixture,
      out: join(tmp, `${gc.name}-diff`),
      config: gc.config,
      onWarning: (w) => warnings.push(w),
    });
    expect(warnings).toEqual([]);
    expect(diff.meta.source.format).toBe('diffusers/safetensors');
    expect(diff.meta.params).toBe(gc.params);
    const a = await runDit(orig.onnxPath, io.x, io.xShape, io.t, io.y);
    const b = await runDit(diff.onnxPath, io.x, io.xShape, io.t, io.y);
    expect(maxAbsDiff(a, b)).toBe(0);
    expect(maxAbsDiff(b, io.out)).toBeLessThanOrEqual(1e-4);
  });
});

describe('diffusers specifics', () => {
  const gc = byName('dit-tiny-p2');

  it('needs input_size from outside (no pos_embed) and takes it from --input-size or a preset', () => {
    const fixture = join(tmp, 'tiny-diffusers.safetensors');
    writeDiffusersFixture(join(gc.dir, 'weights.safetensors'), fixture, gc.config.depth);
    const f = openWeights(fixture);
    try {
      expect(() => resolveDitConfig(f, { config: { num_heads: 4 } })).toThrow(/cannot determine input_size.*--input-size/);
      const r = resolveDitConfig(f, { config: { num_heads: 4 }, inputSize: 8 });
      expect(r.format).toBe('diffusers');
      expect(r.config).toEqual(gc.config);
    } finally {
      f.close();
    }
  });

  it('warns when a block carries a different embedder copy', () => {
    const fixture = join(tmp, 'tiny-diffusers-skewed.safetensors');
    writeDiffusersFixture(join(gc.dir, 'weights.safetensors'), fixture, gc.config.depth, (name, data) => {
      if (name === 'transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias') data[0] += 0.5;
    });
    const warnings: string[] = [];
    buildDitModel({ weights: fixture, out: join(tmp, 'skewed'), config: gc.config, onWarning: (w) => warnings.push(w) });
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain("'transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias' differs");
  });

  it('--format original on diffusers weights names the missing original tensor', async () => {
    const fixture = join(tmp, 'tiny-diffusers-2.safetensors');
    writeDiffusersFixture(join(gc.dir, 'weights.safetensors'), fixture, gc.config.depth);
    const r = await cli([
      'model',
      'build',
      'dit',
      '--weights',
      fixture,
      '--format',
      'original',
      '--preset',
      'DiT-S/2',
      '--out',
      join(tmp, 'x'),
    ]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("'x_embedder.proj.weight'");
  });
});

describe('torch.save checkpoints', () => {
  it('a bare state_dict (.pt, like DiT-XL-2-256x256.pt) builds to the same outputs', async () => {
    const gc = byName('dit-tiny-p2');
    const io = goldenIo(gc.dir);
    const m = buildDitModel({ weights: join(gc.dir, 'weights.pt'), out: join(tmp, 'pt-bare'), config: gc.config });
    expect(m.meta.source.format).toBe('original/torch');
    expect(m.meta.params).toBe(gc.params);
    expect(maxAbsDiff(await runDit(m.onnxPath, io.x, io.xShape, io.t, io.y), io.out)).toBeLessThanOrEqual(1e-4);
  });

  it('a training checkpoint {model, ema} builds from ema', async () => {
    const gc = byName('dit-tiny-p4-nosigma');
    const io = goldenIo(gc.dir);
    const m = buildDitModel({ weights: join(gc.dir, 'checkpoint-train-layout.pt'), out: join(tmp, 'pt-train'), config: gc.config });
    expect(maxAbsDiff(await runDit(m.onnxPath, io.x, io.xShape, io.t, io.y), io.out)).toBeLessThanOrEqual(1e-4);
  });
});

describe('diffusers config.json beside the weights', () => {
  it('supplies input_size (sample_size) and num_heads (num_attention_heads)', () => {
    const gc = byName('dit-tiny-p2');
    const dir = join(tmp, 'transformer');
    mkdirSync(dir);
    const w = join(dir, 'diffusion_pytorch_model.safetensors');
    writeDiffusersFixture(join(gc.dir, 'weights.safetensors'), w, gc.config.depth);
    writeFileSync(
      join(dir, 'config.json'),
      JSON.stringify({ _class_name: 'DiTTransformer2DModel', sample_size: 8, num_attention_heads: 4, attention_head_dim: 16 }),
    );
    const f = openWeights(w);
    try {
      const r = resolveDitConfig(f);
      expect(r.config).toEqual(gc.config);
      expect(r.notes[1]).toContain('input_size = 8 (config.json)');
      expect(r.notes[1]).toContain('num_heads = 4 (config.json)');
    } finally {
      f.close();
    }
  });
});
