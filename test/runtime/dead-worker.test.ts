// A dead inference worker is a dead replica: killing the worker thread mid-pass rejects the pass
// and every later run with UNAVAILABLE at once, the replica reports NOT_SERVING and stops taking
// calls, close() returns, and the scheduler finishes the request on the other replica with the
// same images.
import type { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { Code, UnavailableError, toServiceError } from '../../shared/errors.ts';
import { WorkerExitedError, WorkerSession } from '../../shared/runtime/session.ts';
import { f32Tensor } from '../../shared/tensor.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { healthStatus } from '../helpers/grpc.ts';
import { startPipeline } from '../helpers/pipeline.ts';

const SLOW_WORKER = new URL('./fixtures/slow-worker.ts', import.meta.url);

/** The session's worker thread: killed from outside, as a crash or the OOM killer would. */
const workerOf = (s: WorkerSession): Worker => Reflect.get(s, 'worker') as Worker;

describe('a dead inference worker', () => {
  it('rejects the pass in flight and every later run with UNAVAILABLE at once', async () => {
    const s = await WorkerSession.create('unused.onnx', { workerModule: SLOW_WORKER });
    let died: Error | null = null;
    s.onDead((err) => {
      died = err;
    });
    const ok = await s.run({ x: { type: 'float32', dims: [1, 2], data: Float32Array.of(1, 2) } });
    expect(Array.from(ok.outputs.y.data as Float32Array)).toEqual([2, 4]);
    // Two passes of 10 s each are queued; the thread dies 100 ms into the first.
    const pending = [1, 2].map(() => s.run({ x: { type: 'float32', dims: [100, 1], data: new Float32Array(100) } }));
    await new Promise((r) => setTimeout(r, 100));
    const killedAt = Date.now();
    await workerOf(s).terminate();
    for (const p of pending) {
      const err = await p.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(WorkerExitedError);
      expect(err).toBeInstanceOf(UnavailableError);
      expect(toServiceError(err).code).toBe(Code.UNAVAILABLE);
    }
    expect(Date.now() - killedAt).toBeLessThan(5_000); // at once, not after the 10 s passes
    expect(s.dead).toBe(true);
    expect(died).toBeInstanceOf(WorkerExitedError);
    await expect(s.run({ x: { type: 'float32', dims: [1, 256], data: new Float32Array(256) } })).rejects.toThrow(/inference worker exited/);
    await s.close(); // returns although the worker is gone
  });

  it('turns its replica NOT_SERVING and out of the pool; the request finishes on the other replica with the same images', async () => {
    const p = await startPipeline({ transport: { kind: 'inproc' }, denoisers: 2, denoiserGrpc: true, denoiser: { maxWaitMs: 0 } });
    try {
      const req = { model: DIT_NAME, classLabels: [{ index: 3 }, { index: 5 }], numSteps: 60, cfgScale: 4, seed: 9n };
      const ref = await p.api.generate(req);
      const victim = p.denoisers[0];
      const port = p.denoiserGrpc[0].port ?? 0;
      expect(await healthStatus(`127.0.0.1:${port}`)).toBe(1);
      let steps = 0;
      const images = [];
      for await (const ev of p.api.generateStream(req, { timeoutMs: 60_000 })) {
        // The real onnxruntime worker thread ends behind the session's back (a pass may be running:
        // the thread exits after it, without a word to the session).
        if (ev.progress && ++steps === 10)
          workerOf(Reflect.get(victim.denoiser, 'session') as WorkerSession).postMessage({ kind: 'close' });
        if (ev.image?.image) images.push(ev.image.image);
      }
      expect(steps).toBe(60);
      images.sort((a, b) => a.sampleIndex - b.sampleIndex);
      images.forEach((img, i) => expect(Buffer.from(img.png).equals(ref.images[i].png)).toBe(true));
      expect(victim.denoiser.dead).toBe(true);
      await expect.poll(() => healthStatus(`127.0.0.1:${port}`), { timeout: 5_000, interval: 100 }).toBe(2);
      // Its own calls fail fast with UNAVAILABLE (retryable), not INTERNAL.
      const step = {
        model: DIT_NAME,
        x: f32Tensor([1, 4, 8, 8], new Float32Array(256)),
        t: [10n],
        y: [1],
        cfgScale: 1,
        guidanceChannels: 0,
        requestId: 'r',
        stepIndex: 0,
        omitVariance: false,
        cacheKey: '',
        numSteps: 0,
      };
      const direct = await victim.denoiser.denoise(step).catch((e: unknown) => e);
      expect(direct).toBeInstanceOf(UnavailableError);
      expect(toServiceError(direct).code).toBe(Code.UNAVAILABLE);
      expect((await p.api.generate(req)).images).toHaveLength(2);
      // Stopping the dead replica returns (the worker is gone).
      await victim.stop(1_000);
    } finally {
      await p.stop();
    }
  });
});
