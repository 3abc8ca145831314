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

describe('WorkerSession', () => {
  it('runs forwards on a worker thread while the event loop stays free', async () => {
    const s = await WorkerSession.create(doubler(), { intraOpThreads: 1 });
    expect(s.inputNames).toEqual(['x']);
    let ticks = 0;
    const timer = setInterval(() => ticks++, 0);
    const results = await Promise.all(
      [1, 2, 3].map((k) => s.run({ x: { type: 'float32', dims: [2, 3], data: Float32Array.from({ length: 6 }, (_, i) => i * k) } })),
    );
    clearInterval(timer);
    results.forEach((r, idx) => {
      expect(Array.from(r.outputs.y.data as Float32Array)).toEqual(Array.from({ length: 6 }, (_, i) => 2 * i * (idx + 1)));
      expect(r.outputs.y.dims).toEqual([2, 3]);
    });
    expect(ticks).toBeGreaterThan(0);
    await s.close();
    await expect(s.run({ x: { type: 'float32', dims: [1, 3], data: new Float32Array(3) } })).rejects.toThrow(/closed/);
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
