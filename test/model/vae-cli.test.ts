// `ditpipe model build vae` as a user runs it (a spawned process), and its errors on bad input.
import { execFile } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildVaeModel } from '../../cli/model-vae.ts';
import { readVaeModelDir } from '../../shared/model/modeldir.ts';
import { toUint8Nhwc } from '../../shared/image/pixels.ts';
import { MissingTensorError, ShapeMismatchError } from '../../shared/weights/index.ts';
import { loadCase, maxAbsDiff, renameWeights, ROOT, runDecoder, writeConfig } from './vae-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-vae-cli-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const tiny = loadCase('vae-tiny');
const legacy = loadCase('vae-tiny-legacy-names');

function ditpipe(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done) => {
    execFile(process.execPath, ['bin/ditpipe.js', ...args], { cwd: ROOT, timeout: 60_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      done({ code, stdout, stderr });
    });
  });
}

describe('ditpipe model build vae (spawned)', () => {
  it.each([tiny, legacy])('builds $name, which matches the reference in onnxruntime', async (c) => {
    const out = join(tmp, `cli-${c.name}`);
    const cfg = writeConfig(tmp, c, { scaling_factor: 0.5 });
    const r = await ditpipe(['model', 'build', 'vae', '--weights', c.weights, '--config', cfg, '--name', 'sd-vae', '--out', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr.trim()).toBe(`scaling factor: 0.5 (--config)`);
    expect(r.stdout).toContain(`${c.params} params`);
    const m = readVaeModelDir(out);
    expect(m.meta.name).toBe('sd-vae');
    expect(m.meta.scalingFactor).toBe(0.5); // from the config's scaling_factor
    const img = await runDecoder(m.onnxPath, c.z.data, c.z.shape);
    expect(maxAbsDiff(img.data, c.image.data)).toBeLessThanOrEqual(1e-4);
    expect(toUint8Nhwc(img.data, img.dims)).toEqual(c.uint8);
  });

  it('names a missing tensor and exits non-zero', async () => {
    const weights = join(tmp, 'missing.safetensors');
    const gone = 'decoder.up_blocks.1.resnets.0.conv2.weight';
    renameWeights(tiny.weights, weights, (name) => (name === gone ? null : { name }));
    const r = await ditpipe(['model', 'build', 'vae', '--weights', weights, '--scaling-factor', '0.18215', '--out', join(tmp, 'missing')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(`missing tensor '${gone}'`);
  });

  it('names the tensor and both shapes on a shape mismatch, and exits non-zero', async () => {
    const weights = join(tmp, 'mismatch.safetensors');
    renameWeights(tiny.weights, weights, (name, shape) =>
      name === 'decoder.mid_block.attentions.0.to_v.weight' ? { name, shape: [32, 128] } : { name, shape },
    );
    const r = await ditpipe(['model', 'build', 'vae', '--weights', weights, '--scaling-factor', '0.18215', '--out', join(tmp, 'mismatch')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("'decoder.mid_block.attentions.0.to_v.weight'");
    expect(r.stderr).toContain('expected [64, 64], got [32, 128]');
  });

  it('rejects an unknown --format and exits non-zero', async () => {
    const r = await ditpipe(['model', 'build', 'vae', '--weights', tiny.weights, '--format', 'compvis', '--out', join(tmp, 'fmt')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/--format.*compvis.*auto, diffusers, ldm/s);
  });
});

describe('buildVaeModel errors', () => {
  const build =
    (weights: string, extra: { config?: string; format?: 'diffusers' | 'ldm' } = {}) =>
    () =>
      buildVaeModel({ weights, out: join(tmp, 'err'), scalingFactor: 0.18215, ...extra });

  it('throws typed errors for a missing tensor and a shape mismatch', () => {
    const missing = join(tmp, 'missing-attn.safetensors');
    renameWeights(tiny.weights, missing, (name) => (name.includes('to_k.bias') ? null : { name }));
    expect(build(missing)).toThrow(MissingTensorError);
    expect(build(missing)).toThrow("'decoder.mid_block.attentions.0.to_k.bias'");
    // The config says 2 latent channels, the weights have 4.
    expect(build(tiny.weights, { config: writeConfig(tmp, tiny, { latent_channels: 2 }) })).toThrow(ShapeMismatchError);
    expect(build(tiny.weights, { config: writeConfig(tmp, tiny, { latent_channels: 2 }) })).toThrow(
      "'post_quant_conv.weight' in " + tiny.weights + ': expected [2, 2, 1, 1], got [4, 4, 1, 1]',
    );
  });

  it('rejects configs that disagree with the weights or the architecture', () => {
    expect(build(tiny.weights, { config: writeConfig(tmp, tiny, { layers_per_block: 0 }) })).toThrow(/field "layers_per_block"/);
    expect(build(tiny.weights, { config: writeConfig(tmp, tiny, { act_fn: 'gelu' }) })).toThrow(/field "act_fn": only "silu"/);
    expect(build(tiny.weights, { config: writeConfig(tmp, tiny, { norm_num_groups: 24 }) })).toThrow(
      /norm_num_groups 24 does not divide .* 32/,
    );
    // legacy case has 3 resnets per block; claiming 1 must not silently drop two of them
    expect(build(legacy.weights, { config: writeConfig(tmp, legacy, { layers_per_block: 1 }) })).toThrow(
      /up block 0 has 3 resnets but layers_per_block = 1/,
    );
    const bad = join(tmp, 'bad.json');
    writeFileSync(bad, '{ not json');
    expect(build(tiny.weights, { config: bad })).toThrow(/--config .*bad\.json/);
    expect(build(tiny.weights, { config: '{"norm_num_groups": "32"}' })).toThrow(/--config \(inline\): field "norm_num_groups"/);
    expect(build(tiny.weights, { config: '{"norm_num_groups": 16, "up_block_types": ["UpDecoderBlock2D"]}' })).toThrow(
      /up_block_types has 1 entries but block_out_channels has 3/,
    );
  });

  it('explains a format that does not fit the file, and a file without a decoder', () => {
    expect(build(tiny.weights, { format: 'ldm' })).toThrow(/--format ldm given, but the tensors use diffusers/);
    const dit = join(ROOT, '../shared/golden/dit/dit-tiny-p2/weights.safetensors');
    expect(build(dit)).toThrow(/no VAE decoder found/);
  });
});

describe('the latent scaling factor travels with the weights, never guessed', () => {
  /** A copy of the tiny VAE's weights at `dir/file`, with optional header metadata. */
  const weightsAt = (dir: string, file: string, metadata?: Record<string, string>): string => {
    mkdirSync(join(tmp, dir), { recursive: true });
    const path = join(tmp, dir, file);
    if (metadata) renameWeights(tiny.weights, path, (name) => ({ name }), [], metadata);
    else copyFileSync(tiny.weights, path);
    return path;
  };

  it("refuses to build without one, naming --scaling-factor and SD's value, and writes nothing", async () => {
    const weights = weightsAt('lonely', 'weights.safetensors');
    const out = join(tmp, 'lonely-out');
    const r = await ditpipe(['model', 'build', 'vae', '--weights', weights, '--out', out]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/--scaling-factor: .*weights\.safetensors does not say its latent scaling factor/);
    expect(r.stderr).toContain('--scaling-factor 0.18215 for Stable Diffusion');
    expect(existsSync(out)).toBe(false);
  });

  it('reads a <name>.json record beside the weights (the repository layout): factor, config and output crop', async () => {
    const weights = weightsAt('record', 'vae.safetensors');
    writeFileSync(
      join(tmp, 'record', 'vae.json'),
      JSON.stringify({ config: { ...tiny.config, in_channels: 3 }, params: 1, scaling_factor: 0.3, output_crop: 2 }),
    );
    const r = await ditpipe(['model', 'build', 'vae', '--weights', weights, '--out', join(tmp, 'record-out')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`scaling factor: 0.3 (${join(tmp, 'record', 'vae.json')})`);
    const m = readVaeModelDir(join(tmp, 'record-out')).meta;
    expect(m.scalingFactor).toBe(0.3);
    expect(m.outputCrop).toEqual({ top: 2, right: 2, bottom: 2, left: 2 });
    expect(m.config.latent_size).toBe(8); // from the record's config, not the 32 default
    expect(r.stdout).toContain('output crop 2/2/2/2 px');
  });

  it("reads a diffusers config.json in the weights' folder, and the safetensors header before it", async () => {
    const diffusers = weightsAt('diffusers', 'diffusion_pytorch_model.safetensors');
    writeFileSync(join(tmp, 'diffusers', 'config.json'), JSON.stringify({ ...tiny.config, scaling_factor: 0.25 }));
    expect(buildVaeModel({ weights: diffusers, out: join(tmp, 'diffusers-out') }).meta.scalingFactor).toBe(0.25);
    const headed = weightsAt('headed', 'diffusion_pytorch_model.safetensors', { scaling_factor: '0.4' });
    writeFileSync(join(tmp, 'headed', 'config.json'), JSON.stringify({ ...tiny.config, scaling_factor: 0.25 }));
    const notes: string[] = [];
    expect(buildVaeModel({ weights: headed, out: join(tmp, 'headed-out'), onNote: (n) => notes.push(n) }).meta.scalingFactor).toBe(0.4);
    expect(notes).toContain(`scaling factor: 0.4 (${headed} header metadata)`);
    // The flag and --config come first.
    expect(buildVaeModel({ weights: headed, out: join(tmp, 'headed-flag'), scalingFactor: 0.1 }).meta.scalingFactor).toBe(0.1);
    expect(buildVaeModel({ weights: headed, out: join(tmp, 'headed-cfg'), config: '{"scaling_factor": 0.2}' }).meta.scalingFactor).toBe(
      0.2,
    );
    const bad = weightsAt('bad-header', 'w.safetensors', { scaling_factor: 'big' });
    expect(() => buildVaeModel({ weights: bad, out: join(tmp, 'bad-header-out') })).toThrow(
      /header metadata scaling_factor must be a positive number, got "big"/,
    );
  });

  it('takes --output-crop and rejects crops that are not square or leave nothing', async () => {
    const r = await ditpipe([
      'model',
      'build',
      'vae',
      '--weights',
      tiny.weights,
      '--scaling-factor',
      '0.18215',
      '--config',
      writeConfig(tmp, tiny),
      '--output-crop',
      '1,3,3,1',
      '--out',
      join(tmp, 'crop-out'),
    ]);
    expect(r.code, r.stderr).toBe(0);
    expect(readVaeModelDir(join(tmp, 'crop-out')).meta.outputCrop).toEqual({ top: 1, right: 3, bottom: 3, left: 1 });
    const odd = await ditpipe([
      'model',
      'build',
      'vae',
      '--weights',
      tiny.weights,
      '--scaling-factor',
      '0.18215',
      '--output-crop',
      '2,1,2,1',
      '--out',
      join(tmp, 'crop-odd'),
    ]);
    expect(odd.code).toBe(1);
    expect(odd.stderr).toMatch(/--output-crop .*: must remove as many rows \(top \+ bottom\) as columns/);
    const huge = () =>
      buildVaeModel({
        weights: tiny.weights,
        config: writeConfig(tmp, tiny),
        outputCrop: { top: 16, right: 16, bottom: 16, left: 16 },
        out: join(tmp, 'crop-huge'),
      });
    expect(huge).toThrow(/leaves no pixels of the 32×32 images this VAE decodes at latent_size 8/);
    const text = await ditpipe([
      'model',
      'build',
      'vae',
      '--weights',
      tiny.weights,
      '--scaling-factor',
      '1',
      '--output-crop',
      'two',
      '--out',
      join(tmp, 'crop-text'),
    ]);
    expect(text.stderr).toContain('--output-crop must be N (every edge) or TOP,RIGHT,BOTTOM,LEFT in pixels, got "two"');
  });
});
