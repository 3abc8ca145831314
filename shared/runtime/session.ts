// An onnxruntime session on its own worker thread, with a promise API. One forward at a time per
// session: callers batch work before they call `run` (the denoiser and decoder do).
//
// A worker that exits (crash, out of memory, killed) makes the session dead: every pending and
// later run rejects at once with WorkerExitedError (UNAVAILABLE, so callers retry elsewhere),
// `dead` turns true and `onDead` listeners run, so the replica can report NOT_SERVING.
import { Worker } from 'node:worker_threads';

import { UnavailableError } from '../errors.ts';
import type { ImageCrop } from '../image/crop.ts';

import type { ExecutionProvider, WireTensor, WorkerReply, WorkerRequest } from './protocol.ts';

export type { ExecutionProvider, TensorData, WireTensor } from './protocol.ts';

export interface SessionOptions {
  executionProvider?: ExecutionProvider;
  /** onnxruntime intra-op threads; 0 lets onnxruntime choose (all cores). */
  intraOpThreads?: number;
  /** Module the worker thread runs (speaks shared/runtime/protocol.ts); default ./ort-worker.ts. */
  workerModule?: URL;
}

export class SessionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SessionError';
  }
}

/** The inference worker is gone; the session can never run again. */
export class WorkerExitedError extends UnavailableError {
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'WorkerExitedError';
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
  private death: WorkerExitedError | null = null;
  private readonly deathListeners: Array<(err: WorkerExitedError) => void> = [];
  private readonly exited: Promise<void>;

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
    // An uncaught error ends the worker ('exit' follows); its message is the better reason.
    let reason = '';
    worker.on('error', (err) => {
      reason = `: ${err.message}`;
    });
    this.exited = new Promise<void>((resolve) => {
      worker.once('exit', (code) => {
        if (!this.closed) this.die(new WorkerExitedError(`inference worker exited (code ${code})${reason}`));
        this.failAll(new SessionError('session is closed'));
        resolve();
      });
    });
  }

  /** True once the worker has exited without being closed: nothing will ever run again. */
  get dead(): boolean {
    return this.death !== null;
  }

  /** Calls `fn` when the worker exits without being closed (at once if it already has). */
  onDead(fn: (err: WorkerExitedError) => void): void {
    if (this.death) fn(this.death);
    else this.deathListeners.push(fn);
  }

  static async create(modelPath: string, opts: SessionOptions = {}): Promise<WorkerSession> {
    const executionProvider = opts.executionProvider ?? 'cpu';
    const worker = new Worker(new URL('./ts-worker.mjs', import.meta.url), {
      workerData: {
        modelPath,
        executionProvider,
        intraOpThreads: opts.intraOpThreads ?? 0,
        __module: (opts.workerModule ?? new URL('./ort-worker.ts', import.meta.url)).href,
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
  run(
    feeds: Record<string, WireTensor>,
    opts: { crop?: { output: string; margins: ImageCrop }; png?: { output: string } } = {},
  ): Promise<RunResult> {
    if (this.death) return Promise.reject(this.death);
    if (this.closed) return Promise.reject(new SessionError('session is closed'));
    const id = this.nextId++;
    const transfer = Object.values(feeds).map((t) => t.data.buffer as ArrayBuffer);
    const msg: WorkerRequest = { kind: 'run', id, feeds, crop: opts.crop, png: opts.png };
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage(msg, transfer);
    });
  }

  /** Releases the model and ends the worker; resolves at once when the worker is already gone. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      if (!this.death) this.worker.postMessage({ kind: 'close' });
      await this.exited;
    })();
    return this.closed;
  }

  private die(err: WorkerExitedError): void {
    this.death = err;
    this.failAll(err);
    for (const fn of this.deathListeners.splice(0)) fn(err);
  }

  private failAll(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }
}
