// Messages between WorkerSession (main thread) and ort-worker (inference thread).
import type { ImageCrop } from '../image/crop.ts';

export type ExecutionProvider = 'cpu' | 'cuda';
export type TensorData = Float32Array | BigInt64Array | Int32Array;

export interface WireTensor {
  type: 'float32' | 'int64' | 'int32';
  dims: number[];
  data: TensorData;
}

export interface WorkerData {
  modelPath: string;
  executionProvider: ExecutionProvider;
  intraOpThreads: number;
  __module: string;
}

export type WorkerRequest =
  | { kind: 'run'; id: number; feeds: Record<string, WireTensor>; crop?: { output: string; margins: ImageCrop }; png?: { output: string } }
  | { kind: 'close' };

export type WorkerReply =
  | { kind: 'ready'; inputNames: string[]; outputNames: string[] }
  | { kind: 'failed'; message: string }
  | { kind: 'result'; id: number; outputs: Record<string, WireTensor>; ms: number; pngs?: Uint8Array[] }
  | { kind: 'error'; id: number; message: string };
