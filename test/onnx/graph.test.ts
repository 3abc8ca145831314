import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, describe, expect, it } from 'vitest';
import { Graph } from '../../shared/onnx/graph.ts';
import { writeOnnx } from '../../shared/onnx/write.ts';

const dir = mkdtempSync(join(tmpdir(), 'ditpipe-graph-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('Graph helpers', () => {
  it('layerNorm normalises the last axis without affine parameters (opset 17 LayerNormalization)', async () => {
    const g = new Graph('ln');
    const x = g.input('x', 'float32', ['B', 4]);
    g.output(g.layerNorm(x, 1e-6), 'y');
    const path = join(dir, 'ln.onnx');
    const res = writeOnnx(g, path);
    expect(res.params).toBe(0); // the fixed unit scale is not a parameter
    const s = await ort.InferenceSession.create(path);
    const xs = [1, 2, 3, 4, -2, 0, 2, 8];
    const y = (await s.run({ x: new ort.Tensor('float32', Float32Array.from(xs), [2, 4]) })).y.data as Float32Array;
    await s.release();
    for (let r = 0; r < 2; r++) {
      const row = xs.slice(4 * r, 4 * r + 4);
      const mean = row.reduce((a, b) => a + b, 0) / 4;
      const v = row.reduce((a, b) => a + (b - mean) ** 2, 0) / 4;
      row.forEach((val, i) => expect(y[4 * r + i]).toBeCloseTo((val - mean) / Math.sqrt(v + 1e-6), 5));
    }
  });

  it('leaves weights marked param: false out of the parameter count', () => {
    const g = new Graph('p');
    const x = g.input('x', 'float32', ['B', 3]);
    const a = g.weight('a', [3], () => new Float32Array([1, 2, 3]));
    const fixed = g.weight('fixed', [3], () => new Float32Array([0, 0, 1]), { param: false });
    g.output(g.add(g.mul(x, a), fixed), 'y');
    expect(writeOnnx(g, join(dir, 'p.onnx')).params).toBe(3);
  });

  it('infers -1 in a reshape, symbolic where symbolic dims are folded in', () => {
    const g = new Graph('r');
    const x = g.input('x', 'float32', ['B', 8, 'h', 'w']);
    expect(g.reshape(x, [0, 2, -1]).shape).toEqual(['B', 2, '4*h*w']);
    expect(g.reshape(x, [0, 8, -1]).shape).toEqual(['B', 8, 'h*w']);
    const s = g.input('s', 'float32', ['B', 16, 8]);
    expect(g.reshape(s, [-1, 8]).shape).toEqual(['16*B', 8]);
    expect(g.reshape(s, [0, -1]).shape).toEqual(['B', 128]);
  });

  it('linear is one Gemm on rows flattened from any leading axes, equal to x·W + b, counting MACs per batch item', async () => {
    const g = new Graph('lin');
    const x = g.input('x', 'float32', ['B', 3, 4]);
    const wT = g.weight('w', [4, 2], () => Float32Array.of(1, 0, 0, 1, 1, 1, -1, 2));
    const b = g.weight('b', [2], () => Float32Array.of(0.5, -1));
    const y = g.linear(x, wT, b);
    g.output(y, 'y');
    expect(y.shape).toEqual(['B', 3, 2]);
    expect(g.nodes.map((n) => n.opType).filter((op) => op !== 'Identity')).toEqual(['Reshape', 'Gemm', 'Reshape']);
    expect([...g.macs.values()]).toEqual([3 * 4 * 2]);
    const path = join(dir, 'lin.onnx');
    writeOnnx(g, path);
    const s = await ort.InferenceSession.create(path);
    const xs = Float32Array.from({ length: 2 * 3 * 4 }, (_, i) => i - 7);
    const out = (await s.run({ x: new ort.Tensor('float32', xs, [2, 3, 4]) })).y;
    await s.release();
    expect(out.dims).toEqual([2, 3, 2]);
    const w = [
      [1, 0],
      [0, 1],
      [1, 1],
      [-1, 2],
    ];
    const want: number[] = [];
    for (let r = 0; r < 6; r++)
      for (let o = 0; o < 2; o++) want.push([0, 1, 2, 3].reduce((acc, i) => acc + xs[4 * r + i] * w[i][o], o === 0 ? 0.5 : -1));
    expect(Array.from(out.data as Float32Array)).toEqual(want);
  });
});
