// Proto `Tensor` ⇄ typed arrays. Wire data is little-endian; this code assumes a little-endian host
// (x86-64, arm64), which every platform onnxruntime-node ships for is.
import { InvalidArgumentError } from './errors.ts';
import { DType, type Tensor } from './gen/ditpipe/v1/tensor.ts';

export function f32Tensor(shape: readonly number[], data: Float32Array): Tensor {
  return { shape: [...shape], dtype: DType.DTYPE_FLOAT32, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** Checks a float32 tensor's dtype, shape and byte count; `field` names it in errors. */
function checkF32(
  t: Tensor | undefined,
  field: string,
  expect: readonly (number | null)[],
): { tensor: Tensor; shape: number[]; n: number } {
  if (!t) throw new InvalidArgumentError(`${field} is required`, { field });
  if (t.dtype !== DType.DTYPE_FLOAT32) {
    throw new InvalidArgumentError(`${field}.dtype must be DTYPE_FLOAT32, got ${DType[t.dtype] ?? t.dtype}`, { field: `${field}.dtype` });
  }
  const shape = t.shape;
  const want = `[${expect.map((d) => (d === null ? '*' : d)).join(', ')}]`;
  if (shape.length !== expect.length || shape.some((d, i) => !Number.isInteger(d) || d < 1 || (expect[i] !== null && d !== expect[i]))) {
    throw new InvalidArgumentError(`${field}.shape must be ${want}, got [${shape.join(', ')}]`, { field: `${field}.shape` });
  }
  const n = shape.reduce((p, q) => p * q, 1);
  if (t.data.byteLength !== n * 4) {
    throw new InvalidArgumentError(`${field}.data has ${t.data.byteLength} bytes; shape [${shape.join(', ')}] needs ${n * 4}`, {
      field: `${field}.data`,
    });
  }
  return { tensor: t, shape, n };
}

/** Checks a float32 tensor like readF32Tensor and copies its values into `dst` at element `offset` (one copy, no allocation). */
export function copyF32TensorInto(
  t: Tensor | undefined,
  field: string,
  expect: readonly (number | null)[],
  dst: Float32Array,
  offset: number,
): void {
  const { tensor, n } = checkF32(t, field, expect);
  if (offset + n > dst.length) throw new InvalidArgumentError(`${field} has ${n} values; only ${dst.length - offset} fit`, { field });
  new Uint8Array(dst.buffer, dst.byteOffset + offset * 4, n * 4).set(tensor.data);
}

/**
 * Reads a float32 tensor from a request; `field` names it in errors. `expect` pins dimensions
 * (null = any positive size). Returns a Float32Array that owns its memory (copied when unaligned).
 */
export function readF32Tensor(
  t: Tensor | undefined,
  field: string,
  expect: readonly (number | null)[],
): { shape: number[]; data: Float32Array } {
  const { tensor, shape, n } = checkF32(t, field, expect);
  const data = new Float32Array(n);
  new Uint8Array(data.buffer).set(tensor.data);
  return { shape, data };
}
