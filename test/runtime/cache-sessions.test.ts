// The step-cache graphs open as worker sessions: head → tail and head → skip on workers give the
// full graph's output, and a directory without them fails before any worker starts, naming the file.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildDitModel } from '../../shared/model/dit.ts';
import { MissingCacheGraphError, readDitModelDir } from '../../shared/model/modeldir.ts';
import { openCacheSessions } from '../../shared/runtime/cache-sessions.ts';
import { WorkerSession, type WireTensor } from '../../shared/runtime/session.ts';
import { goldenCases, goldenIo, maxAbsDiff } from '../model/dit-helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-cache-sessions-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const gc = goldenCases().find((c) => c.name === 'dit-tiny-p2')!;
const weights = join(gc.dir, 'weights.safetensors');

/** A copy: run() transfers its feeds' buffers to the worker. */
const copy = (t: WireTensor): WireTensor => ({ ...t, dims: [...t.dims], data: t.data.slice() });

describe('openCacheSessions', () => {
  it('opens head, tail and skip on workers; a full and a cached step give the full graph', async () => {
    const dir = join(tmp, 'with');
    buildDitModel({ weights, out: dir, config: gc.config });
    const m = readDitModelDir(dir);
    const io = goldenIo(gc.dir);
    const feeds = (): Record<string, WireTensor> => ({
      x: { type: 'float32', dims: io.xShape, data: io.x.slice() },
      t: { type: 'int64', dims: [io.t.length], data: io.t.slice() },
      y: { type: 'int64', dims: [io.y.length], data: io.y.slice() },
    });
    const full = await WorkerSession.create(m.onnxPath, { intraOpThreads: 1 });
    const s = await openCacheSessions(m, { intraOpThreads: 1 });
    try {
      expect(s.head.outputNames).toEqual(['h1', 'r1', 'c']);
      expect(s.tail.inputNames).toEqual(['h1', 'c']);
      expect(s.skip.inputNames).toEqual(['h1', 'c', 'residual']);
      const want = (await full.run(feeds())).outputs.out.data as Float32Array;
      const head = (await s.head.run(feeds())).outputs;
      const tail = (await s.tail.run({ h1: copy(head.h1), c: copy(head.c) })).outputs;
      const skip = (await s.skip.run({ h1: head.h1, c: head.c, residual: tail.residual })).outputs;
      expect(maxAbsDiff(tail.out.data as Float32Array, want)).toBeLessThanOrEqual(1e-5);
      expect(maxAbsDiff(skip.out.data as Float32Array, want)).toBeLessThanOrEqual(1e-5);
    } finally {
      await s.close();
      await full.close();
    }
    await expect(s.tail.run({})).rejects.toThrow(/closed/);
  });

  it('names the missing graph of a directory built without them', async () => {
    const dir = join(tmp, 'without');
    buildDitModel({ weights, out: dir, config: gc.config, cacheGraphs: false });
    const err = await openCacheSessions(readDitModelDir(dir)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MissingCacheGraphError);
    expect((err as MissingCacheGraphError).path).toBe(join(dir, 'model.head.onnx'));
    expect((err as Error).message).toContain(`${join(dir, 'model.head.onnx')}`);
  });
});
