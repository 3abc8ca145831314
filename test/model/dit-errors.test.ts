// Bad inputs to `ditpipe model build dit` / `model init dit`: a clear message, no stack trace, non-zero exit.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildDitModel, DitConfigError } from '../../shared/model/dit.ts';
import { UnknownPresetError } from '../../shared/model/presets.ts';
import { MissingTensorError, ShapeMismatchError, WeightsError } from '../../shared/weights/index.ts';
import { cli, goldenCases, rewriteSafetensors, type CliResult } from './dit-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-dit-errors-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const gc = goldenCases().find((c) => c.name === 'dit-tiny-p2')!;
const good = join(gc.dir, 'weights.safetensors');
const heads = '{"num_heads": 4}';

const truncated = join(tmp, 'truncated.safetensors');
{
  const bytes = readFileSync(good);
  const fd = openSync(truncated, 'w');
  writeSync(fd, bytes, 0, Math.floor(bytes.length / 2));
  closeSync(fd);
}
const garbage = join(tmp, 'garbage.safetensors');
writeFileSync(garbage, 'this is not a checkpoint at all, just text');
const missing = join(tmp, 'missing.safetensors');
rewriteSafetensors(good, missing, (name, shape, data) => (name === 'blocks.1.mlp.fc2.bias' ? null : { shape, data }));
const wrongShape = join(tmp, 'wrong-shape.safetensors');
rewriteSafetensors(good, wrongShape, (name, shape, data) =>
  name === 'blocks.0.attn.proj.weight' ? { shape: [64, 32], data: data.subarray(0, 64 * 32) } : { shape, data },
);

function expectCleanFailure(r: CliResult, ...fragments: (string | RegExp)[]): void {
  expect(r.code).not.toBe(0);
  for (const f of fragments) expect(r.stderr).toMatch(f);
  expect(r.stderr).not.toMatch(/\n\s+at .*\(/); // no stack trace
}

const build = (...args: string[]) => cli(['model', 'build', 'dit', '--out', join(tmp, 'out'), ...args]);

describe('ditpipe model build dit: bad input', () => {
  it('each case fails with a clear message and a non-zero exit', async () => {
    const [trunc, miss, shape, preset, dtype, badcfg] = await Promise.all([
      build('--weights', truncated, '--config', heads),
      build('--weights', missing, '--config', heads),
      build('--weights', wrongShape, '--config', heads),
      build('--weights', good, '--preset', 'DiT-M/3'),
      build('--weights', good, '--config', heads, '--dtype', 'bf8'),
      build('--weights', good, '--config', '{"num_heads": "four"}'),
    ]);
    expectCleanFailure(trunc, /truncated\.safetensors.*(truncated|past the end|beyond the data section)/);
    expectCleanFailure(miss, "missing tensor 'blocks.1.mlp.fc2.bias'");
    expectCleanFailure(shape, "'blocks.0.attn.proj.weight'", /expected \[64, 64\], got \[64, 32\]/);
    expectCleanFailure(preset, "unknown preset 'DiT-M/3'", 'DiT-XL/2');
    expectCleanFailure(dtype, "unsupported dtype 'bf8'");
    expectCleanFailure(badcfg, /--config \(inline\): field "num_heads"/);
  });

  it('model init dit rejects an unknown preset and an incomplete config', async () => {
    const [preset, partial] = await Promise.all([
      cli(['model', 'init', 'dit', '--preset', 'DiT-XXL/2', '--out', join(tmp, 'w.safetensors')]),
      cli(['model', 'init', 'dit', '--config', '{"hidden_size": 64}', '--out', join(tmp, 'w.safetensors')]),
    ]);
    expectCleanFailure(preset, "unknown preset 'DiT-XXL/2'");
    expectCleanFailure(partial, /config field "input_size"/);
  });
});

describe('buildDitModel: typed errors', () => {
  const out = join(tmp, 'lib');
  it('throws one error class per failure', () => {
    expect(() => buildDitModel({ weights: missing, out, config: gc.config })).toThrow(MissingTensorError);
    expect(() => buildDitModel({ weights: wrongShape, out, config: gc.config })).toThrow(ShapeMismatchError);
    expect(() => buildDitModel({ weights: truncated, out, config: gc.config })).toThrow(WeightsError);
    expect(() => buildDitModel({ weights: garbage, out, config: gc.config })).toThrow(/garbage\.safetensors/);
    expect(() => buildDitModel({ weights: join(tmp, 'nope.safetensors'), out, config: gc.config })).toThrow(/nope\.safetensors/);
    expect(() => buildDitModel({ weights: good, out })).toThrow(/cannot determine num_heads/);
    expect(() => buildDitModel({ weights: good, out, config: gc.config, dtype: 'q4' as 'f16' })).toThrow("unsupported dtype 'q4'");
    expect(() => buildDitModel({ weights: good, out, preset: 'DiT-Z/2' })).toThrow(UnknownPresetError);
    expect(() => buildDitModel({ weights: good, out, config: { ...gc.config, num_heads: 5 } })).toThrow(DitConfigError);
    expect(() => buildDitModel({ weights: good, out, config: { ...gc.config, input_size: 9 } })).toThrow(/not a multiple of patch_size/);
    // A config that contradicts the weights names the first tensor that disagrees, with both shapes.
    expect(() => buildDitModel({ weights: good, out, config: { ...gc.config, num_classes: 1000 } })).toThrow(
      "shape mismatch for tensor 'y_embedder.embedding_table.weight'",
    );
  });
});
