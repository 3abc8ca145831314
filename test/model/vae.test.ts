// VAE decoder compiled from the golden weights (and the same weights under LDM and legacy names)
// and run in onnxruntime against the reference outputs.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildVaeModel } from '../../cli/model-vae.ts';
import { readVaeModelDir } from '../../shared/model/modeldir.ts';
import { toUint8Nhwc } from '../../shared/image/pixels.ts';
import { loadCase, maxAbsDiff, renameWeights, runDecoder, toLdmName, toLegacyName, writeConfig, type GoldenCase } from './vae-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-vae-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const cases = ['vae-tiny', 'vae-tiny-legacy-names'].map(loadCase);

/** MACs of the decoder at batch 1, counted layer by layer from the config alone. */
function expectedMacs(c: GoldenCase['config']): number {
  const boc = c.block_out_channels;
  const n = boc.length;
  let s = c.latent_size;
  const L = c.latent_channels;
  const resnet = (cin: number, cout: number, res: number): number =>
    res * res * (9 * cout * cin + 9 * cout * cout + (cin !== cout ? cout * cin : 0));
  let macs = s * s * L * L + s * s * boc[n - 1] * L * 9;
  macs += 2 * resnet(boc[n - 1], boc[n - 1], s);
  const N = s * s;
  macs += 4 * N * boc[n - 1] * boc[n - 1] + 2 * N * N * boc[n - 1];
  let ch = boc[n - 1];
  for (let k = 0; k < n; k++) {
    const out = boc[n - 1 - k];
    for (let j = 0; j <= c.layers_per_block; j++) {
      macs += resnet(ch, out, s);
      ch = out;
    }
    if (k < n - 1) {
      s *= 2;
      macs += s * s * ch * ch * 9;
    }
  }
  return macs + s * s * c.out_channels * boc[0] * 9;
}

describe.each(cases)('VAE decoder $name', (c) => {
  const factor = 2 ** (c.config.block_out_channels.length - 1);
  const dir = join(tmp, c.name);
  const model = buildVaeModel({ weights: c.weights, config: writeConfig(tmp, c), out: dir });

  it('writes model.json with the config, params and MACs of the weights', () => {
    const m = readVaeModelDir(dir).meta;
    expect(m.kind).toBe('vae-decoder');
    expect(m.name).toBe(c.name);
    expect(m.scalingFactor).toBe(0.18215);
    expect(m.config).toEqual({
      latent_channels: c.config.latent_channels,
      block_out_channels: c.config.block_out_channels,
      layers_per_block: c.config.layers_per_block,
      norm_num_groups: c.config.norm_num_groups,
      out_channels: c.config.out_channels,
      latent_size: c.config.latent_size,
    });
    expect(m.params).toBe(c.params);
    expect(m.gflops * 1e9).toBeCloseTo(expectedMacs(c.config), 0);
    expect(m.inputs).toEqual([{ name: 'z', dtype: 'float32', shape: ['B', c.config.latent_channels, 'h', 'w'] }]);
    expect(m.outputs).toEqual([{ name: 'image', dtype: 'float32', shape: ['B', c.config.out_channels, `${factor}h`, `${factor}w`] }]);
    expect(m.source.format).toBe(c.config.legacy_attention_names ? 'diffusers-legacy' : 'diffusers');
    expect(model.meta.source.sha256).toMatch(/^[0-9a-f]{64}$/);
  });

  it('matches the reference image to 1e-4 and its uint8 pixels exactly', async () => {
    const out = await runDecoder(model.onnxPath, c.z.data, c.z.shape);
    expect(out.dims).toEqual(c.image.shape);
    expect(maxAbsDiff(out.data, c.image.data)).toBeLessThanOrEqual(1e-4);
    expect(toUint8Nhwc(out.data, out.dims)).toEqual(c.uint8);
  });

  it('takes any batch size and latent size', async () => {
    const [, C, h, w] = c.z.shape;
    const one = await runDecoder(model.onnxPath, c.z.data.slice(0, C * h * w), [1, C, h, w]);
    expect(maxAbsDiff(one.data, c.image.data.slice(0, one.data.length))).toBeLessThanOrEqual(1e-4);
    const odd = await runDecoder(model.onnxPath, new Float32Array(3 * C * 5 * 3).fill(0.5), [3, C, 5, 3]);
    expect(odd.dims).toEqual([3, c.config.out_channels, 5 * factor, 3 * factor]);
    expect(odd.data.every(Number.isFinite)).toBe(true);
  });

  it('gives identical output from the same weights under LDM names (1×1-conv attention, extra encoder tensors)', async () => {
    const n = c.config.block_out_channels.length;
    const weights = join(tmp, `${c.name}-ldm.safetensors`);
    const encoder = [
      { name: 'encoder.conv_in.weight', dtype: 'F32' as const, shape: [8, 3, 3, 3], data: new Float32Array(8 * 27) },
      { name: 'quant_conv.weight', dtype: 'F32' as const, shape: [8, 8, 1, 1], data: new Float32Array(64) },
    ];
    renameWeights(c.weights, weights, (name, shape) => toLdmName(name, shape, n), encoder);
    const ldm = buildVaeModel({ weights, config: writeConfig(tmp, c), out: join(tmp, `${c.name}-ldm`) });
    expect(ldm.meta.source.format).toBe('ldm');
    expect(ldm.meta.config).toEqual(model.meta.config);
    const ref = await runDecoder(model.onnxPath, c.z.data, c.z.shape);
    const out = await runDecoder(ldm.onnxPath, c.z.data, c.z.shape);
    expect(maxAbsDiff(out.data, ref.data)).toBe(0);
  });

  it('reads a full Stable Diffusion checkpoint layout (first_stage_model. prefix)', async () => {
    const n = c.config.block_out_channels.length;
    const weights = join(tmp, `${c.name}-sd.safetensors`);
    renameWeights(c.weights, weights, (name, shape) => toLdmName(name, shape, n, 'first_stage_model.'), [
      { name: 'model.diffusion_model.input_blocks.0.0.bias', dtype: 'F32', shape: [4], data: new Float32Array(4) },
    ]);
    const sd = buildVaeModel({ weights, format: 'ldm', config: writeConfig(tmp, c), out: join(tmp, `${c.name}-sd`) });
    const out = await runDecoder(sd.onnxPath, c.z.data, c.z.shape);
    expect(maxAbsDiff(out.data, c.image.data)).toBeLessThanOrEqual(1e-4);
  });
});

describe('VAE name schemes', () => {
  it('legacy attention names give the same output as current ones', async () => {
    const c = cases[0];
    const weights = join(tmp, 'legacy.safetensors');
    renameWeights(c.weights, weights, (name) => toLegacyName(name));
    const legacy = buildVaeModel({ weights, config: writeConfig(tmp, c), out: join(tmp, 'legacy') });
    expect(legacy.meta.source.format).toBe('diffusers-legacy');
    const ref = await runDecoder(join(tmp, c.name, 'model.onnx'), c.z.data, c.z.shape);
    const out = await runDecoder(legacy.onnxPath, c.z.data, c.z.shape);
    expect(maxAbsDiff(out.data, ref.data)).toBe(0);
  });

  it('infers the config from the shapes when none is given (norm groups default 32); f16 weights run', async () => {
    const c = cases[0];
    const m = buildVaeModel({ weights: c.weights, out: join(tmp, 'inferred'), scalingFactor: 0.13025, dtype: 'f16' });
    expect(m.meta.config).toEqual({
      latent_channels: 4,
      block_out_channels: [32, 64, 64],
      layers_per_block: 1,
      norm_num_groups: 32,
      out_channels: 3,
      latent_size: 32,
    });
    expect(m.meta.scalingFactor).toBe(0.13025);
    expect(m.meta.weightDtype).toBe('float16');
    const out = await runDecoder(m.onnxPath, c.z.data, c.z.shape);
    // float16 storage rounds each weight to ~5e-4 relative; measured 2.8e-3 here
    expect(maxAbsDiff(out.data, c.image.data)).toBeLessThanOrEqual(1e-2);
  });
});

describe('toUint8Nhwc', () => {
  it.each(cases)('reproduces the reference pixels from the reference image ($name)', (c) => {
    expect(toUint8Nhwc(c.image.data, c.image.shape)).toEqual(c.uint8);
  });

  it('clamps, truncates and transposes to NHWC', () => {
    // [1, 2, 1, 2]: channel 0 = (-2, 0.999), channel 1 = (1.5, -0.0039)
    const px = toUint8Nhwc(Float32Array.from([-2, 0.999, 1.5, -0.0039]), [1, 2, 1, 2]);
    expect([...px]).toEqual([0, 255, 255, 127]);
    expect([...toUint8Nhwc(Float32Array.from([NaN]), [1, 1, 1, 1])]).toEqual([0]);
    expect(() => toUint8Nhwc(new Float32Array(3), [1, 1, 2, 2])).toThrow(/do not fill shape \[1, 1, 2, 2\]/);
  });
});
