// Worker thread that owns one onnxruntime InferenceSession. `session.run` is synchronous inside the
// native binding, so it lives here, off the event loop that serves NATS, gRPC health and metrics.
// Optional post-processing (cropping and PNG encoding of decoded images) runs here too, for the
// same reason.
import { parentPort, workerData } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { cropImages } from '../image/crop.ts';
import { encodePngs } from '../image/png.ts';
import type { WorkerData, WorkerReply, WorkerRequest, WireTensor } from './protocol.ts';

const port = parentPort;
if (!port) throw new Error('ort-worker must run in a worker thread');
const { modelPath, executionProvider, intraOpThreads } = workerData as WorkerData;

function toWire(t: ort.Tensor): WireTensor {
  return { type: t.type as WireTensor['type'], dims: Array.from(t.dims), data: t.data as WireTensor['data'] };
}

let session: ort.InferenceSession | undefined;
try {
  session = await ort.InferenceSession.create(modelPath, {
    executionProviders: [executionProvider],
    intraOpNumThreads: intraOpThreads,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
    // Idle intra-op threads sleep instead of spinning: a replica runs several sessions one after
    // another (the step cache's head, tail and skip graphs beside model.onnx), and threads spinning
    // after one session's pass steal the cores the next one needs. On the 2-core machine this took
    // a step-cached Fashion-MNIST run from 8.0 to 18.9 images/s and the uncached one from 14.4 to
    // 16.8 (BENCHMARKS.md §8).
    extra: { session: { intra_op: { allow_spinning: '0' } } },
  });
  port.postMessage({ kind: 'ready', inputNames: [...session.inputNames], outputNames: [...session.outputNames] } satisfies WorkerReply);
} catch (err) {
  port.postMessage({ kind: 'failed', message: err instanceof Error ? err.message : String(err) } satisfies WorkerReply);
}

port.on('message', (msg: WorkerRequest) => {
  if (msg.kind === 'close') {
    void (async () => {
      await session?.release();
      port.close();
    })();
    return;
  }
  void (async () => {
    const started = performance.now();
    try {
      if (!session) throw new Error('no session');
      const feeds: Record<string, ort.Tensor> = {};
      for (const [name, t] of Object.entries(msg.feeds)) feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
      const out = await session.run(feeds);
      const outputs: Record<string, WireTensor> = {};
      for (const [name, t] of Object.entries(out)) outputs[name] = toWire(t);
      if (msg.crop) {
        const t = outputs[msg.crop.output];
        outputs[msg.crop.output] = { type: t.type, ...cropImages({ dims: t.dims, data: t.data as Float32Array }, msg.crop.margins) };
      }
      const ms = performance.now() - started;
      const pngs = msg.png ? encodePngs(outputs[msg.png.output]) : undefined;
      const transfer = [
        ...Object.values(outputs).map((t) => t.data.buffer as ArrayBuffer),
        ...(pngs ?? []).map((p) => p.buffer as ArrayBuffer),
      ];
      port.postMessage({ kind: 'result', id: msg.id, outputs, ms, pngs } satisfies WorkerReply, transfer);
    } catch (err) {
      port.postMessage({ kind: 'error', id: msg.id, message: err instanceof Error ? err.message : String(err) } satisfies WorkerReply);
    }
  })();
});
