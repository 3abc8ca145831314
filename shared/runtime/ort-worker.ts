// Worker thread that owns one onnxruntime InferenceSession. `session.run` is synchronous inside the
// native binding, so it lives here, off the event loop that serves NATS, gRPC health and metrics.
// Plain JavaScript on purpose: workers do not inherit the tsx loader of the main thread.
import { parentPort, workerData } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';

const { modelPath, executionProvider, intraOpThreads } = workerData;

function toWire(tensor) {
  const data = tensor.data;
  return { type: tensor.type, dims: Array.from(tensor.dims), data };
}

let session;
try {
  session = await ort.InferenceSession.create(modelPath, {
    executionProviders: [executionProvider],
    intraOpNumThreads: intraOpThreads,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
  });
  parentPort.postMessage({ kind: 'ready', inputNames: session.inputNames, outputNames: session.outputNames });
} catch (err) {
  parentPort.postMessage({ kind: 'failed', message: err instanceof Error ? err.message : String(err) });
}

parentPort.on('message', async (msg) => {
  if (msg.kind === 'close') {
    await session?.release();
    parentPort.close();
    return;
  }
  const started = performance.now();
  try {
    const feeds = {};
    for (const [name, t] of Object.entries(msg.feeds)) feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
    const out = await session.run(feeds);
    const outputs = {};
    const transfer = [];
    for (const [name, t] of Object.entries(out)) {
      outputs[name] = toWire(t);
      transfer.push(t.data.buffer);
    }
    parentPort.postMessage({ kind: 'result', id: msg.id, outputs, ms: performance.now() - started }, transfer);
  } catch (err) {
    parentPort.postMessage({ kind: 'error', id: msg.id, message: err instanceof Error ? err.message : String(err) });
  }
});
