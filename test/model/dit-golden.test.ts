// Every golden DiT case compiled through the CLI's code path and run in onnxruntime matches the
// original PyTorch model; guidance over the compiled model reproduces `forward_with_cfg`.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { combineGuidance } from '../../shared/diffusion/guidance.ts';
import { buildDitModel, sincosPosEmbed } from '../../shared/model/dit.ts';
import { GRAPH_REVISION, readDitModelDir } from '../../shared/model/modeldir.ts';
import { openSafetensors } from '../../shared/weights/index.ts';
import { cli, goldenCases, goldenIo, maxAbsDiff, runDit } from './dit-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-dit-golden-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const TOL = 1e-4;

describe.each(goldenCases())('golden $name', (gc) => {
  const io = goldenIo(gc.dir);
  const out = join(tmp, gc.name);
  const model = buildDitModel({ weights: join(gc.dir, 'weights.safetensors'), out, config: gc.config });

  it('records the config, params and io of the original model', () => {
    const m = readDitModelDir(out).meta;
    expect(m.config).toEqual(gc.config);
    expect(m.params).toBe(gc.params);
    expect(m.source.format).toBe('original/safetensors');
    expect(m.inputs.map((v) => [v.name, v.dtype, v.shape])).toEqual([
      ['x', 'float32', ['B', gc.config.in_channels, gc.config.input_size, gc.config.input_size]],
      ['t', 'int64', ['B']],
      ['y', 'int64', ['B']],
    ]);
    const oc = gc.config.learn_sigma ? 2 * gc.config.in_channels : gc.config.in_channels;
    expect(m.outputs[0].shape).toEqual(['B', oc, gc.config.input_size, gc.config.input_size]);
  });

  it('out matches model(x, t, y) for all 4 rows', async () => {
    const got = await runDit(model.onnxPath, io.x, io.xShape, io.t, io.y);
    expect(maxAbsDiff(got, io.out)).toBeLessThanOrEqual(TOL);
  });

  it('guidance on [x; x] with [y; null] reproduces cfg.out_3ch and cfg.out_all', async () => {
    const n = io.cfg.xShape[0];
    const x2 = new Float32Array(2 * io.cfg.x.length);
    x2.set(io.cfg.x);
    x2.set(io.cfg.x, io.cfg.x.length);
    const t2 = BigInt64Array.from([...io.cfg.t, ...io.cfg.t]);
    const y2 = BigInt64Array.from([...io.cfg.y, ...Array.from({ length: n }, () => BigInt(gc.config.num_classes))]);
    const raw = await runDit(model.onnxPath, x2, [2 * n, ...io.cfg.xShape.slice(1)], t2, y2);
    const outChannels = gc.config.learn_sigma ? 2 * gc.config.in_channels : gc.config.in_channels;
    const base = { rows: n, outChannels, inChannels: gc.config.in_channels, plane: gc.config.input_size ** 2, scale: gc.cfgScale };
    expect(maxAbsDiff(combineGuidance(raw, { ...base, channels: 3 }), io.cfg.out3ch)).toBeLessThanOrEqual(TOL);
    expect(maxAbsDiff(combineGuidance(raw, { ...base, channels: 'all' }), io.cfg.outAll)).toBeLessThanOrEqual(TOL);
  });

  it('computes the same sin-cos pos_embed the original stored', () => {
    const f = openSafetensors(join(gc.dir, 'weights.safetensors'));
    const stored = f.readF32('pos_embed');
    f.close();
    expect(maxAbsDiff(sincosPosEmbed(gc.config.hidden_size, gc.config.input_size / gc.config.patch_size), stored)).toBe(0);
  });

  it('builds at float16 weight storage and stays close', async () => {
    const m16 = buildDitModel({ weights: join(gc.dir, 'weights.safetensors'), out: `${out}-f16`, config: gc.config, dtype: 'f16' });
    expect(m16.meta.weightDtype).toBe('float16');
    expect(m16.meta.params).toBe(gc.params);
    const got = await runDit(m16.onnxPath, io.x, io.xShape, io.t, io.y);
    // Weights rounded to 11 significant bits: ~1.5e-3 on outputs of order 4 here.
    const d = maxAbsDiff(got, io.out);
    expect(d).toBeGreaterThan(0);
    expect(d).toBeLessThanOrEqual(1e-2);
  });
});

describe('the real CLI', () => {
  it('builds dit-tiny-p2 with the config inferred from the weights (heads given) and matches', async () => {
    const gc = goldenCases().find((c) => c.name === 'dit-tiny-p2')!;
    const out = join(tmp, 'cli-tiny-p2');
    const r = await cli([
      'model',
      'build',
      'dit',
      '--weights',
      join(gc.dir, 'weights.safetensors'),
      '--config',
      '{"num_heads": 4}',
      '--out',
      out,
    ]);
    expect(r.stderr).toContain('input_size = 8 (pos_embed)');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('182,176 params');
    const m = readDitModelDir(out);
    expect(m.meta.config).toEqual(gc.config);
    const io = goldenIo(gc.dir);
    expect(maxAbsDiff(await runDit(m.onnxPath, io.x, io.xShape, io.t, io.y), io.out)).toBeLessThanOrEqual(TOL);

    const info = await cli(['model', 'info', out]);
    expect(info.code).toBe(0);
    expect(info.stdout).toMatch(/params:\s+182,176/);
    expect(info.stdout).toMatch(/Gflops:\s+0\.002 per forward at batch 1 \(multiply-accumulates/);
    expect(info.stdout).toContain('x: float32 [B, 4, 8, 8]');
    expect(info.stdout).toContain('weights.safetensors (original/safetensors)');
    expect(info.stdout).toMatch(new RegExp(`built by: ditpipe [0-9.]+, graph revision ${GRAPH_REVISION}\\n`));
  });
});
