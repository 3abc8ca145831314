// Common types and errors for the weight readers (safetensors and torch.save zip).

export type WeightDType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

/** Bytes per element for every dtype the readers understand. */
export const DTYPE_SIZE: Readonly<Record<WeightDType, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

export function isWeightDType(s: string): s is WeightDType {
  return Object.prototype.hasOwnProperty.call(DTYPE_SIZE, s);
}

export function isFloatDType(d: WeightDType): boolean {
  return d === 'F64' || d === 'F32' || d === 'F16' || d === 'BF16';
}

export interface TensorInfo {
  name: string;
  dtype: WeightDType;
  shape: number[];
}

export interface WeightFile {
  readonly path: string;
  readonly format: 'safetensors' | 'torch';
  /** All tensor names, in file order. */
  names(): string[];
  has(name: string): boolean;
  /** Throws MissingTensorError naming the tensor and the file. */
  info(name: string): TensorInfo;
  /** Float dtypes converted to float32; reads only this tensor's bytes from disk. */
  readF32(name: string): Float32Array;
  /** For I64 tensors (I32/I16/I8/U8 are widened). */
  readI64(name: string): BigInt64Array;
  close(): void;
}

/** Base class: corrupt, truncated or unsupported weight files. */
export class WeightsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

export class MissingTensorError extends WeightsError {
  constructor(
    readonly tensor: string,
    readonly file: string,
  ) {
    super(`missing tensor '${tensor}' in ${file}`);
  }
}

export class ShapeMismatchError extends WeightsError {
  constructor(
    readonly tensor: string,
    readonly expected: readonly number[],
    readonly actual: readonly number[],
    file?: string,
  ) {
    super(
      `shape mismatch for tensor '${tensor}'${file ? ` in ${file}` : ''}: expected [${expected.join(', ')}], got [${actual.join(', ')}]`,
    );
  }
}

/** A pickle asked for something outside the allow-list; nothing was executed. */
export class UnsafePickleError extends WeightsError {}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Throws ShapeMismatchError (naming tensor and both shapes) unless `name` has exactly `shape`. */
export function expectShape(file: WeightFile, name: string, shape: readonly number[]): TensorInfo {
  const info = file.info(name);
  const same = info.shape.length === shape.length && info.shape.every((d, i) => d === shape[i]);
  if (!same) throw new ShapeMismatchError(name, shape, info.shape, file.path);
  return info;
}
