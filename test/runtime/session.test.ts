import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Graph } from '../../shared/onnx/graph.ts';
import { writeOnnx } from '../../shared/onnx/write.ts';
import { SessionError, WorkerSession } from '../../shared/runtime/session.ts';

const dir = mkdtempSync(join(tmpdir(), 'ditpipe-session-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function doubler(): string {
  const g = new Graph('double');
  const x = g.input('x', 'float32', ['B', 3]);
  g.output(g.mul(x, g.constFloat([2])), 'y');
  const path = join(dir, 'double.onnx');
  writeOnnx(g, path);
  return path;
}

/**
 * x [B, 256] through 64 MatMuls by the identity, then doubled: exactly 2x, and about 1 GMAC per
 * 64-row batch, so a forward takes long enough that a blocked event loop would show.
 */
function slowDoubler(): string {
  const n = 256;
  const g = new Graph('slow_double');
  const eye = g.constFloat(
    Float32Array.from({ length: n * n }, (_, i) => (i % (n + 1) === 0 ? 1 : 0)),
    [n, n],
    'eye',
  );
  let y = g.input('x', 'float32', ['B', n]);
  for (let i = 0; i < 64; i++) y = g.matmul(y, eye);
  g.output(g.mul(y, g.constFloat([2])), 'y');
  const path = join(dir, 'slow_double.onnx');
  writeOnnx(g, path);
  return path;
}

describe('WorkerSession', () => {
  it('runs forwards on a worker thread while the event loop stays free', async () => {
    const s = await WorkerSession.create(slowDoubler(), { intraOpThreads: 1 });
    expect(s.inputNames).toEqual(['x']);
    // Count event-loop turns while the forwards run. A forward on this thread would block the loop
    // for its whole length (onnxruntime only defers the start with setImmediate), leaving a turn
    // or two per call; on a worker the loop keeps turning throughout.
    let ticks = 0;
    let spinning = true;
    const spin = (): void => {
      if (!spinning) return;
      ticks++;
      setImmediate(spin);
    };
    setImmediate(spin);
    const rows = 64;
    const feed = (k: number) => Float32Array.from({ length: rows * 256 }, (_, i) => ((i % 7) - 3) * k);
    const results = await Promise.all([1, 2, 3].map((k) => s.run({ x: { type: 'float32', dims: [rows, 256], data: feed(k) } })));
    spinning = false;
    results.forEach((r, idx) => {
      expect(Array.from(r.outputs.y.data as Float32Array)).toEqual(Array.from(feed(idx + 1), (v) => 2 * v));
      expect(r.outputs.y.dims).toEqual([rows, 256]);
    });
    expect(ticks).toBeGreaterThan(50);
    await s.close();
    await expect(s.run({ x: { type: 'float32', dims: [1, 256], data: new Float32Array(256) } })).rejects.toThrow(/closed/);
  });

  it('reports a bad feed as an error and keeps serving', async () => {
    const s = await WorkerSession.create(doubler());
    await expect(s.run({ x: { type: 'float32', dims: [1, 4], data: new Float32Array(4) } })).rejects.toBeInstanceOf(SessionError);
    const ok = await s.run({ x: { type: 'float32', dims: [1, 3], data: Float32Array.of(1, 2, 3) } });
    expect(Array.from(ok.outputs.y.data as Float32Array)).toEqual([2, 4, 6]);
    await s.close();
  });

  it('names the model file it cannot load, and explains a missing CUDA provider', async () => {
    await expect(WorkerSession.create(join(dir, 'nope.onnx'))).rejects.toThrow(/nope\.onnx/);
    await expect(WorkerSession.create(doubler(), { executionProvider: 'cuda' })).rejects.toThrow(/"cuda" is not available/);
  });
});
