// An onnxruntime session on its own worker thread, with a promise API. One forward at a time per
// session: callers batch work before they call `run` (the denoiser and decoder do).
import { Worker } from 'node:worker_threads';

import type { ImageCrop } from '../image/crop.ts';
import type { ExecutionProvider, WireTensor, WorkerReply, WorkerRequest } from './protocol.ts';

export type { ExecutionProvider, TensorData, WireTensor } from './protocol.ts';

export interface SessionOptions {
  executionProvider?: ExecutionProvider;
  /** onnxruntime intra-op threads; 0 lets onnxruntime choose (all cores). */
  intraOpThreads?: number;
}

export class SessionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SessionError';
  }
}

type WorkerMessage = WorkerReply;

export interface RunResult {
  outputs: Record<string, WireTensor>;
  /** Duration of the forward pass on the worker. */
  ms: number;
  /** PNG files, one per image, when the run asked for them. */
  pngs?: Uint8Array[];
}

interface Pending {
  resolve: (r: RunResult) => void;
  reject: (e: Error) => void;
}

export class WorkerSession {
  private nextId = 0;
  private readonly pending = new Map<number, Pending>();
  private closed: Promise<void> | null = null;

  private constructor(
    private readonly worker: Worker,
    readonly inputNames: string[],
    readonly outputNames: string[],
  ) {
    worker.on('message', (msg: WorkerMessage) => {
      if (msg.kind !== 'result' && msg.kind !== 'error') return;
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.kind === 'result') p.resolve({ outputs: msg.outputs, ms: msg.ms, pngs: msg.pngs });
      else p.reject(new SessionError(msg.message));
    });
    worker.on('error', (err) => this.failAll(err));
    worker.on('exit', (code) => this.failAll(new SessionError(`inference worker exited (code ${code})`)));
  }

  static async create(modelPath: string, opts: SessionOptions = {}): Promise<WorkerSession> {
    const executionProvider = opts.executionProvider ?? 'cpu';
    const worker = new Worker(new URL('./ts-worker.mjs', import.meta.url), {
      workerData: {
        modelPath,
        executionProvider,
        intraOpThreads: opts.intraOpThreads ?? 0,
        __module: new URL('./ort-worker.ts', import.meta.url).href,
      },
    });
    const first = await new Promise<WorkerMessage>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    if (first.kind !== 'ready') {
      await worker.terminate();
      const message = first.kind === 'failed' ? first.message : 'unexpected message from inference worker';
      if (executionProvider === 'cuda') {
        throw new SessionError(
          `execution provider "cuda" is not available (${message}); install onnxruntime-node with its CUDA ` +
            'binaries (without ONNXRUNTIME_NODE_INSTALL=skip) on a machine with CUDA 12, or use --execution-provider cpu',
        );
      }
      throw new SessionError(`cannot load ${modelPath}: ${message}`);
    }
    return new WorkerSession(worker, first.inputNames, first.outputNames);
  }

  /**
   * Runs one forward pass; input buffers are transferred to the worker (do not reuse them). With
   * `crop`, the named output ([N, C, H, W] float images) is cropped on the worker; with `png`, the
   * named output (cropped first) is also encoded as PNGs there.
   */
  run(feeds: Record<string, WireTensor>, opts: { crop?: { output: string; margins: ImageCrop }; png?: { output: string } } = {}): Promise<RunResult> {
    if (this.closed) return Promise.reject(new SessionError('session is closed'));
    const id = this.nextId++;
    const transfer = Object.values(feeds).map((t) => t.data.buffer as ArrayBuffer);
    const msg: WorkerRequest = { kind: 'run', id, feeds, crop: opts.crop, png: opts.png };
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage(msg, transfer);
    });
  }

  close(): Promise<void> {
    this.closed ??= new Promise<void>((resolve) => {
      this.worker.once('exit', () => resolve());
      this.worker.postMessage({ kind: 'close' });
    });
    return this.closed;
  }

  private failAll(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }
}
