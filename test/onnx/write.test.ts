import { mkdtempSync, rmSync, statSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, describe, expect, it } from 'vitest';
import { Graph } from '../../shared/onnx/graph.ts';
import { writeOnnx } from '../../shared/onnx/write.ts';

const dir = mkdtempSync(join(tmpdir(), 'ditpipe-onnx-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// y = silu(x · W + b), with W given in torch's [out, in] layout.
function linearGraph(): { g: Graph; w: Float32Array; b: Float32Array } {
  const g = new Graph('linear');
  const w = Float32Array.from({ length: 6 }, (_, i) => (i - 2.5) / 3); // [out=3, in=2]
  const b = Float32Array.from([0.25, -0.5, 1]);
  const x = g.input('x', 'float32', ['B', 2]);
  const y = g.silu(
    g.linear(
      x,
      g.linearWeight('w', 3, 2, () => w),
      g.weight('b', [3], () => b),
    ),
  );
  g.output(y, 'y');
  return { g, w, b };
}

function reference(x: number[], w: Float32Array, b: Float32Array): number[] {
  return [0, 1, 2].map((o) => {
    const v = x[0] * w[o * 2] + x[1] * w[o * 2 + 1] + b[o];
    return v / (1 + Math.exp(-v));
  });
}

async function run(path: string, x: number[][]): Promise<Float32Array> {
  const s = await ort.InferenceSession.create(path);
  try {
    const out = await s.run({ x: new ort.Tensor('float32', Float32Array.from(x.flat()), [x.length, 2]) });
    return out.y.data as Float32Array;
  } finally {
    await s.release();
  }
}

describe('ONNX writer', () => {
  it('writes an embedded model that onnxruntime runs with a dynamic batch', async () => {
    const { g, w, b } = linearGraph();
    const path = join(dir, 'embedded.onnx');
    const res = writeOnnx(g, path);
    expect(res.externalData).toBeNull();
    expect(res.params).toBe(9);
    expect(g.macs.size).toBe(1);
    expect([...g.macs.values()][0]).toBe(6);
    const xs = [
      [1, 2],
      [-0.5, 3],
      [0, 0],
    ];
    const y = await run(path, xs);
    xs.forEach((x, i) => reference(x, w, b).forEach((v, o) => expect(y[i * 3 + o]).toBeCloseTo(v, 6)));
  });

  it('streams weights to an external data file above the threshold', async () => {
    const { g, w, b } = linearGraph();
    const path = join(dir, 'external.onnx');
    const res = writeOnnx(g, path, { externalDataThresholdBytes: 0 });
    expect(res.externalData).toBe('external.onnx.data');
    expect(existsSync(`${path}.data`)).toBe(true);
    expect(statSync(`${path}.data`).size).toBe(9 * 4);
    const y = await run(path, [[1, 2]]);
    reference([1, 2], w, b).forEach((v, o) => expect(y[o]).toBeCloseTo(v, 6));
  });

  it('keeps generated constants in the model when the weights go external, so onnxruntime can load it', async () => {
    // Unsqueeze axes and Reshape shapes are read by onnxruntime's shape inference, which fails on
    // external tensors ("Cannot parse data from external tensors"); only named weights move out.
    const g = new Graph('shapes');
    const x = g.input('x', 'float32', ['B', 4]);
    const w = Float32Array.from({ length: 4 }, (_, i) => i + 1);
    const y = g.reshape(
      g.mul(
        g.unsqueeze(x, [1]),
        g.weight('w', [4], () => w),
      ),
      [0, 2, 2],
    );
    g.output(y, 'y');
    const path = join(dir, 'shapes.onnx');
    const res = writeOnnx(g, path, { externalDataThresholdBytes: 0 });
    expect(res.externalData).toBe('shapes.onnx.data');
    expect(statSync(`${path}.data`).size).toBe(4 * 4);
    const s = await ort.InferenceSession.create(path);
    const out = await s.run({ x: new ort.Tensor('float32', Float32Array.of(1, 1, 2, 2), [1, 4]) });
    await s.release();
    expect(out.y.dims).toEqual([1, 2, 2]);
    expect(Array.from(out.y.data as Float32Array)).toEqual([1, 2, 6, 8]);
  });

  it("points a second graph at the first one's external data instead of copying the weights", async () => {
    const { g, b } = linearGraph();
    const first = writeOnnx(g, join(dir, 'first.onnx'), { externalDataThresholdBytes: 0 });
    expect([...first.external!.tensors.keys()]).toEqual(['w', 'b']);
    // The same bias under its name, a fresh scale of its own: only the bias is shared.
    const h = new Graph('second');
    const x = h.input('x', 'float32', ['B', 3]);
    h.output(
      h.mul(
        h.add(
          x,
          h.weight('b', [3], () => b),
        ),
        h.constFloat([2]),
      ),
      'y',
    );
    const path = join(dir, 'second.onnx');
    const res = writeOnnx(h, path, { externalDataThresholdBytes: 0, reuse: first.external! });
    expect(res.externalData).toBeNull(); // nothing of its own went out: no second data file
    expect(existsSync(`${path}.data`)).toBe(false);
    expect(res.weightBytes).toBe(4); // the constant
    const s = await ort.InferenceSession.create(path);
    const out = await s.run({ x: new ort.Tensor('float32', Float32Array.of(1, 2, 3), [1, 3]) });
    await s.release();
    expect(Array.from(out.y.data as Float32Array)).toEqual(Array.from(b, (v, i) => 2 * (v + i + 1)));
  });

  it('refuses to share a weight stored differently from what the graph needs', () => {
    const { g } = linearGraph();
    const first = writeOnnx(g, join(dir, 'shared-f32.onnx'), { externalDataThresholdBytes: 0 });
    const h = new Graph('other');
    h.output(
      h.add(
        h.input('x', 'float32', ['B', 3]),
        h.weight('b', [3], () => new Float32Array(3)),
      ),
      'y',
    );
    expect(() => writeOnnx(h, join(dir, 'other.onnx'), { weightDtype: 'float16', reuse: first.external! })).toThrow(
      /initializer b: shared-f32\.onnx\.data holds it as b \(type 1, \[3\]\), this graph needs b__f16 \(type 10, \[3\]\)/,
    );
  });

  it('stores float16 weights and casts them back inside the graph', async () => {
    const { g, w, b } = linearGraph();
    const path = join(dir, 'half.onnx');
    const res = writeOnnx(g, path, { weightDtype: 'float16' });
    expect(res.weightBytes).toBe(9 * 2);
    const y = await run(path, [[1, 2]]);
    reference([1, 2], w, b).forEach((v, o) => expect(y[o]).toBeCloseTo(v, 2));
  });
});
