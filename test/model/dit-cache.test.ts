// The step-cache graphs (head, tail, skip) cut from the golden DiTs: head then tail is the full
// forward pass, head then skip with the block-stack residual of the same step is too (to float
// rounding), and the residuals are what they say. Built into temporary directories, as embedded
// and as external weights that the cache graphs share with model.onnx.
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, describe, expect, it } from 'vitest';
import { buildDitModel } from '../../shared/model/dit.ts';
import {
  CACHE_GRAPHS,
  cacheGraphIo,
  cacheGraphPath,
  MissingCacheGraphError,
  ModelDirError,
  readDitModelDir,
  type DitConfig,
} from '../../shared/model/modeldir.ts';
import { inspectOnnx } from '../../shared/onnx/inspect.ts';
import { cli, goldenCases, goldenIo, maxAbsDiff, rewriteSafetensors } from './dit-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-dit-cache-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** head∘tail reproduces the full graph's numbers as exactly as this (it runs the same ops). */
const EXACT = 1e-5;

async function run(path: string, feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
  const s = await ort.InferenceSession.create(path);
  try {
    return await s.run(feeds);
  } finally {
    await s.release();
  }
}

const f32 = (t: ort.Tensor): Float32Array => t.data as Float32Array;

interface Step {
  full: Float32Array;
  head: Record<string, ort.Tensor>;
  tail: Record<string, ort.Tensor>;
  skip: Record<string, ort.Tensor>;
}

/** One step of the golden inputs through the full graph, head → tail, and head → skip with tail's residual. */
async function step(dir: string, weightsDir: string): Promise<Step> {
  const m = readDitModelDir(dir);
  const io = goldenIo(weightsDir);
  const feeds = {
    x: new ort.Tensor('float32', io.x, io.xShape),
    t: new ort.Tensor('int64', io.t, [io.t.length]),
    y: new ort.Tensor('int64', io.y, [io.y.length]),
  };
  const full = f32((await run(m.onnxPath, feeds)).out);
  const head = await run(cacheGraphPath(m, 'head'), feeds);
  const tail = await run(cacheGraphPath(m, 'tail'), { h1: head.h1, c: head.c });
  const skip = await run(cacheGraphPath(m, 'skip'), { h1: head.h1, c: head.c, residual: tail.residual });
  return { full, head, tail, skip };
}

describe.each(goldenCases())('step-cache graphs of golden $name', (gc) => {
  const weights = join(gc.dir, 'weights.safetensors');
  const io = goldenIo(gc.dir);

  describe.each([
    ['embedded weights', undefined],
    ['external weights', 1024],
  ] as const)('%s', (_, externalDataThresholdBytes) => {
    const out = join(tmp, `${gc.name}-${externalDataThresholdBytes ?? 'embedded'}`);
    buildDitModel({ weights, out, config: gc.config, externalDataThresholdBytes });
    const model = readDitModelDir(out);

    it('are listed in model.json with the io the config implies and their Gflops, head + tail = full', () => {
      const cg = model.meta.cacheGraphs!;
      const expected = cacheGraphIo(gc.config);
      for (const name of CACHE_GRAPHS) {
        expect(cg[name].onnx).toBe(`model.${name}.onnx`);
        expect({ inputs: cg[name].inputs, outputs: cg[name].outputs }).toEqual(expected[name]);
        expect(cg[name].gflops).toBeGreaterThan(0);
      }
      expect(cg.head.gflops + cg.tail.gflops).toBeCloseTo(model.meta.gflops, 12);
      expect(cg.skip.gflops).toBeLessThan(cg.head.gflops);
    });

    it('head → tail is the full pass, and the full pass still matches the original model', async () => {
      const s = await step(out, gc.dir);
      expect(maxAbsDiff(s.full, io.out)).toBeLessThanOrEqual(1e-4);
      expect(maxAbsDiff(f32(s.tail.out), s.full)).toBeLessThanOrEqual(EXACT);
      expect(maxAbsDiff(f32(s.tail.out), io.out)).toBeLessThanOrEqual(1e-4);
    });

    it("head → skip with the same step's residual is the full pass", async () => {
      const s = await step(out, gc.dir);
      expect(maxAbsDiff(f32(s.skip.out), s.full)).toBeLessThanOrEqual(EXACT);
    });

    if (externalDataThresholdBytes !== undefined) {
      it('point at model.onnx.data for every weight instead of copying it', () => {
        expect(model.meta.externalData).toBe('model.onnx.data');
        for (const name of CACHE_GRAPHS) {
          const path = cacheGraphPath(model, name);
          const g = inspectOnnx(path);
          expect(g.externalLocations).toEqual(['model.onnx.data']);
          expect(statSync(path).size).toBeLessThan(64 * 1024); // graph and small constants only
        }
      });
    }
  });

  it('head r1 is h1 − h0: with block 0 made the identity, h1 − r1 of the real model is its h1', async () => {
    // Zero rows of block 0's adaLN gates (gate_msa, gate_mlp: chunks 2 and 5 of 6) make the block
    // return its input, so that model's h1 is h0, which the real model's head must give as h1 − r1.
    const D = gc.config.hidden_size;
    const identity = join(tmp, `${gc.name}-identity-block0.safetensors`);
    rewriteSafetensors(weights, identity, (name, shape, data) => {
      if (!name.startsWith('blocks.0.adaLN_modulation.1.')) return { shape, data };
      const cols = name.endsWith('.weight') ? D : 1;
      for (const chunk of [2, 5]) data.fill(0, chunk * D * cols, (chunk + 1) * D * cols);
      return { shape, data };
    });
    const real = await step(join(tmp, `${gc.name}-embedded`), gc.dir);
    const idDir = join(tmp, `${gc.name}-identity`);
    buildDitModel({ weights: identity, out: idDir, config: gc.config });
    const id = await step(idDir, gc.dir);
    expect(Array.from(f32(id.head.r1)).every((v) => v === 0)).toBe(true);
    const h0 = f32(id.head.h1);
    const h1 = f32(real.head.h1);
    const r1 = f32(real.head.r1);
    expect(
      maxAbsDiff(
        Float32Array.from(h1, (v, i) => v - r1[i]),
        h0,
      ),
    ).toBeLessThanOrEqual(EXACT);
    expect(maxAbsDiff(r1, new Float32Array(r1.length))).toBeGreaterThan(1e-3); // block 0 does something
    // The conditioning c does not depend on the blocks.
    expect(maxAbsDiff(f32(id.head.c), f32(real.head.c))).toBe(0);
  });
});

describe('a directory without step-cache graphs', () => {
  const gc = goldenCases()[0];
  const weights = join(gc.dir, 'weights.safetensors');

  it('is built with --no-cache-graphs, serves full steps and names the missing file when one is asked for', async () => {
    const out = join(tmp, 'no-cache');
    const r = await cli([
      'model',
      'build',
      'dit',
      '--weights',
      weights,
      '--config',
      JSON.stringify(gc.config),
      '--no-cache-graphs',
      '--out',
      out,
    ]);
    expect(r.code).toBe(0);
    const m = readDitModelDir(out);
    expect(m.meta.cacheGraphs).toBeUndefined();
    expect(() => cacheGraphPath(m, 'head')).toThrow(MissingCacheGraphError);
    expect(() => cacheGraphPath(m, 'head')).toThrow(
      `${join(out, 'model.head.onnx')}): the directory was built by an older ditpipe or with --no-cache-graphs`,
    );
    const info = await cli(['model', 'info', out]);
    expect(info.code).toBe(0);
    expect(info.stdout).toContain('cache:    no step-cache graphs');
  });

  it('rebuilding without them removes the old cache graphs, which point into the old weights file', () => {
    const out = join(tmp, 'rebuilt');
    buildDitModel({ weights, out, config: gc.config });
    buildDitModel({ weights, out, config: gc.config, cacheGraphs: false });
    for (const name of CACHE_GRAPHS) expect(() => statSync(join(out, `model.${name}.onnx`))).toThrow(/ENOENT/);
  });

  it('a listed graph that is gone or does not fit the config is an error naming it; the full graph still loads', async () => {
    const out = join(tmp, 'damaged');
    buildDitModel({ weights, out, config: gc.config });
    rmSync(join(out, 'model.tail.onnx'));
    const m = readDitModelDir(out);
    expect(() => cacheGraphPath(m, 'tail')).toThrow(`${join(out, 'model.tail.onnx')} is missing (${join(out, 'model.json')} lists it`);
    expect(cacheGraphPath(m, 'head')).toBe(join(out, 'model.head.onnx'));
    const info = await cli(['model', 'info', out]);
    expect(info.code).not.toBe(0);
    expect(info.stderr).toContain('model.tail.onnx is missing');

    // model.json says head returns something the graph does not: caught on open.
    const metaPath = join(out, 'model.json');
    const meta = JSON.parse(readFileSync(metaPath, 'utf8')) as { cacheGraphs: { head: { outputs: { name: string }[] } } };
    meta.cacheGraphs.head.outputs[1].name = 'h0';
    writeFileSync(metaPath, JSON.stringify(meta));
    expect(() => cacheGraphPath(readDitModelDir(out), 'head')).toThrow(
      /field "cacheGraphs\.head\.outputs" lists h1, h0, c but model\.head\.onnx has h1, r1, c/,
    );
    // A cache graph path outside the directory is refused when model.json is read.
    meta.cacheGraphs.head = { ...meta.cacheGraphs.head, onnx: '../x.onnx' } as typeof meta.cacheGraphs.head;
    writeFileSync(metaPath, JSON.stringify(meta));
    expect(() => readDitModelDir(out)).toThrow(ModelDirError);
    expect(() => readDitModelDir(out)).toThrow(/field "cacheGraphs\.head\.onnx": "\.\.\/x\.onnx" is not a file inside/);
  });

  it('a config that disagrees with the cache graphs is caught on open', () => {
    const out = join(tmp, 'other-config');
    buildDitModel({ weights, out, config: gc.config });
    const metaPath = join(out, 'model.json');
    const meta = JSON.parse(readFileSync(metaPath, 'utf8')) as { config: DitConfig };
    // Listing and graph agree with each other, but not with a config of another width (which the
    // full graph's io cannot tell).
    const wider: DitConfig = { ...meta.config, hidden_size: 2 * meta.config.hidden_size };
    writeFileSync(metaPath, JSON.stringify({ ...meta, config: wider }));
    expect(() => cacheGraphPath(readDitModelDir(out), 'tail')).toThrow(
      /field "cacheGraphs\.tail\.inputs\.0": h1 is float32 \[B, 16, 64\] here but float32 \[B, 16, 128\] in the tail graph of this config/,
    );
  });
});
