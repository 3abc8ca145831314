// A small ONNX graph builder: values carry dtype and shape (a symbolic batch dimension is a string),
// so every op helper infers its output shape and the graph can count its own multiply-accumulates.
// Weights are lazy: `load()` runs only when the writer streams that initializer to disk.

export type DType = 'float32' | 'float16' | 'int64' | 'int32' | 'bool';
export type Dim = number | string;

export interface Value {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly Dim[];
}

export type AttrValue = number | string | number[] | { float: number } | { floats: number[] };

export interface Node {
  opType: string;
  inputs: string[];
  outputs: string[];
  name: string;
  attrs: Record<string, AttrValue>;
}

export interface Initializer {
  name: string;
  dtype: 'float32' | 'int64';
  shape: number[];
  /** Produces the data when the writer gets to it; called exactly once. */
  load: () => Float32Array | BigInt64Array;
  /** Float weights may be stored as float16 (and cast back at load) when the writer is asked to. */
  castable: boolean;
  /** Counts towards the model's parameter count (false for constants and fixed buffers). */
  param: boolean;
  /**
   * Named by the model (`weight`), not generated: graphs built from the same weights hold the same
   * data under the same name, so one graph may use another's stored copy (WriteOptions.reuse).
   */
  named: boolean;
}

export class GraphError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GraphError';
  }
}

/**
 * Elements per batch item: a symbolic dim counts once, except for the numeric factors of a
 * flattened one ('64*B' counts 64), so MACs stay per batch item through a flatten.
 */
function numel(shape: readonly Dim[]): number {
  let n = 1;
  for (const d of shape) {
    if (typeof d === 'number') n *= d;
    else for (const part of d.split('*')) if (/^\d+$/.test(part)) n *= Number(part);
  }
  return n;
}

function broadcast(a: readonly Dim[], b: readonly Dim[], op: string): Dim[] {
  const n = Math.max(a.length, b.length);
  const out: Dim[] = [];
  for (let i = 0; i < n; i++) {
    const da = i < n - a.length ? 1 : a[i - (n - a.length)];
    const db = i < n - b.length ? 1 : b[i - (n - b.length)];
    if (da === db || db === 1) out.push(da);
    else if (da === 1) out.push(db);
    else throw new GraphError(`${op}: shapes [${a.join(',')}] and [${b.join(',')}] do not broadcast`);
  }
  return out;
}

export class Graph {
  readonly nodes: Node[] = [];
  readonly initializers: Initializer[] = [];
  readonly inputs: Value[] = [];
  readonly outputs: Value[] = [];
  /** Multiply-accumulates per batch item of MatMul/Gemm/Conv nodes, by node name. */
  readonly macs = new Map<string, number>();
  private counter = 0;
  private readonly names = new Set<string>();

  constructor(readonly name: string) {}

  private fresh(hint: string): string {
    let name = `${hint}_${this.counter++}`;
    while (this.names.has(name)) name = `${hint}_${this.counter++}`;
    this.names.add(name);
    return name;
  }

  private claim(name: string): string {
    if (this.names.has(name)) throw new GraphError(`duplicate value name "${name}"`);
    this.names.add(name);
    return name;
  }

  input(name: string, dtype: DType, shape: Dim[]): Value {
    const v = { name: this.claim(name), dtype, shape };
    this.inputs.push(v);
    return v;
  }

  /** Marks `v` as a graph output called `name` (through an Identity when the names differ). */
  output(v: Value, name: string): Value {
    const out = v.name === name ? v : this.op('Identity', [v], { name, dtype: v.dtype, shape: v.shape });
    this.outputs.push(out);
    return out;
  }

  /** A float weight; `param: false` for fixed tensors that a model's parameter count leaves out (e.g. DiT's pos_embed). */
  weight(name: string, shape: number[], load: () => Float32Array, opts: { param?: boolean } = {}): Value {
    this.initializers.push({
      name: this.claim(name),
      dtype: 'float32',
      shape,
      load,
      castable: true,
      param: opts.param ?? true,
      named: true,
    });
    return { name, dtype: 'float32', shape };
  }

  constFloat(values: ArrayLike<number>, shape: number[] = [values.length], hint = 'const'): Value {
    const name = this.fresh(hint);
    const data = Float32Array.from(values);
    this.initializers.push({ name, dtype: 'float32', shape, load: () => data, castable: false, param: false, named: false });
    return { name, dtype: 'float32', shape };
  }

  constInt64(values: ArrayLike<number>, shape: number[] = [values.length], hint = 'const'): Value {
    const name = this.fresh(hint);
    const data = BigInt64Array.from(Array.from(values, (x) => BigInt(x)));
    this.initializers.push({ name, dtype: 'int64', shape, load: () => data, castable: false, param: false, named: false });
    return { name, dtype: 'int64', shape };
  }

  /** Generic node with an explicitly given output; prefer the typed helpers below. */
  op(
    opType: string,
    inputs: (Value | null)[],
    out: { name?: string; dtype: DType; shape: readonly Dim[] },
    attrs: Record<string, AttrValue> = {},
  ): Value {
    const name = out.name ? this.claim(out.name) : this.fresh(opType.toLowerCase());
    this.nodes.push({
      opType,
      inputs: inputs.map((v) => (v ? v.name : '')),
      outputs: [name],
      name: `${name}_node`,
      attrs,
    });
    return { name, dtype: out.dtype, shape: out.shape };
  }

  // ---- elementwise -------------------------------------------------------------------------
  private binary(opType: string, a: Value, b: Value): Value {
    return this.op(opType, [a, b], { dtype: a.dtype, shape: broadcast(a.shape, b.shape, opType) });
  }
  add(a: Value, b: Value): Value {
    return this.binary('Add', a, b);
  }
  sub(a: Value, b: Value): Value {
    return this.binary('Sub', a, b);
  }
  mul(a: Value, b: Value): Value {
    return this.binary('Mul', a, b);
  }
  div(a: Value, b: Value): Value {
    return this.binary('Div', a, b);
  }
  pow(a: Value, b: Value): Value {
    return this.binary('Pow', a, b);
  }

  unary(opType: string, x: Value, attrs: Record<string, AttrValue> = {}): Value {
    return this.op(opType, [x], { dtype: x.dtype, shape: x.shape }, attrs);
  }
  sigmoid(x: Value): Value {
    return this.unary('Sigmoid', x);
  }
  tanh(x: Value): Value {
    return this.unary('Tanh', x);
  }
  silu(x: Value): Value {
    return this.mul(x, this.sigmoid(x));
  }
  softmax(x: Value, axis = -1): Value {
    return this.unary('Softmax', x, { axis });
  }

  cast(x: Value, to: DType): Value {
    return this.op('Cast', [x], { dtype: to, shape: x.shape }, { to: ONNX_DTYPE[to] });
  }

  // ---- linear algebra ----------------------------------------------------------------------
  matmul(a: Value, b: Value): Value {
    if (a.shape.length < 2 || b.shape.length < 2) throw new GraphError('matmul: operands must be at least 2-D');
    const [m, k] = a.shape.slice(-2);
    const [k2, n] = b.shape.slice(-2);
    if (typeof k === 'number' && typeof k2 === 'number' && k !== k2) {
      throw new GraphError(`matmul: inner dimensions differ ([${a.shape.join(',')}] x [${b.shape.join(',')}])`);
    }
    const batch = broadcast(a.shape.slice(0, -2), b.shape.slice(0, -2), 'MatMul');
    const out = this.op('MatMul', [a, b], { dtype: a.dtype, shape: [...batch, m, n] });
    this.macs.set(out.name, numel([...batch, m, n]) * (typeof k === 'number' ? k : 1));
    return out;
  }

  /**
   * A torch.nn.Linear weight ([out, in] in the checkpoint) stored transposed as [in, out], so the
   * graph multiplies with a plain MatMul and no runtime Transpose.
   */
  linearWeight(name: string, outFeatures: number, inFeatures: number, load: () => Float32Array): Value {
    return this.weight(name, [inFeatures, outFeatures], () => transpose2d(load(), outFeatures, inFeatures));
  }

  /**
   * x[..., in] · W + b with W from `linearWeight` ([in, out]). With a bias it is one Gemm (the bias
   * is added inside the GEMM, not in a separate pass over the output), on x flattened to 2-D when
   * it has more axes; the flatten and unflatten are Reshapes, which onnxruntime does without a copy.
   * onnxruntime fuses MatMul + Add into Gemm itself only when every dimension is static, and our
   * batch dimension never is.
   */
  linear(x: Value, weightT: Value, bias: Value | null): Value {
    const inner = x.shape.slice(1, -1);
    if (!bias || x.shape.length < 2 || !inner.every((d) => typeof d === 'number')) {
      const y = this.matmul(x, weightT);
      return bias ? this.add(y, bias) : y;
    }
    const [k, n] = weightT.shape as number[];
    if (weightT.shape.length !== 2 || x.shape[x.shape.length - 1] !== k || bias.shape.length !== 1 || bias.shape[0] !== n) {
      throw new GraphError(`linear: [${x.shape.join(',')}] x [${weightT.shape.join(',')}] + [${bias.shape.join(',')}] do not fit`);
    }
    const flat = x.shape.length === 2 ? x : this.reshape(x, [-1, k]);
    const y = this.op('Gemm', [flat, weightT, bias], { dtype: x.dtype, shape: [flat.shape[0], n] });
    this.macs.set(y.name, numel([...x.shape.slice(0, -1), n]) * k);
    if (x.shape.length === 2) return y;
    const shape = [...x.shape.slice(0, -1), n];
    return this.op('Reshape', [y, this.constInt64([-1, ...inner, n], [shape.length], 'shape')], { dtype: x.dtype, shape });
  }

  conv(x: Value, w: Value, b: Value | null, opts: { strides?: number[]; pads?: number[]; group?: number } = {}): Value {
    const [n, , h, wd] = x.shape;
    const [cout, cinPerGroup, kh, kw] = w.shape as number[];
    const strides = opts.strides ?? [1, 1];
    const pads = opts.pads ?? [0, 0, 0, 0];
    const dim = (size: Dim, k: number, s: number, p0: number, p1: number): Dim =>
      typeof size === 'number' ? Math.floor((size + p0 + p1 - k) / s) + 1 : size;
    const oh = dim(h, kh, strides[0], pads[0], pads[2]);
    const ow = dim(wd, kw, strides[1], pads[1], pads[3]);
    const attrs: Record<string, AttrValue> = { kernel_shape: [kh, kw], strides, pads };
    if (opts.group) attrs.group = opts.group;
    const out = this.op('Conv', b ? [x, w, b] : [x, w], { dtype: x.dtype, shape: [n, cout, oh, ow] }, attrs);
    this.macs.set(out.name, numel([cout, oh, ow]) * cinPerGroup * kh * kw);
    return out;
  }

  // ---- shape ops ---------------------------------------------------------------------------
  /** ONNX Reshape semantics: 0 copies the input dim, -1 is inferred (at most one). */
  reshape(x: Value, target: number[]): Value {
    const shape: Dim[] = target.map((d, i) => (d === 0 ? x.shape[i] : d));
    const minus = shape.indexOf(-1);
    if (minus >= 0) {
      // Dims copied through (0) cancel out. What is left of the input's static size, over the
      // target's other sizes, is the -1 dim, times any symbolic input dims left over ('64*B').
      const moved = x.shape.filter((_, i) => target[i] !== 0);
      const leftover = moved.filter((d): d is string => typeof d === 'string');
      const total = moved.filter((d): d is number => typeof d === 'number').reduce((p, q) => p * q, 1);
      const known = target.filter((d, i) => i !== minus && d !== 0).reduce((p, q) => p * q, 1);
      const factor = total / known;
      shape[minus] = leftover.length === 0 ? factor : [...(factor === 1 ? [] : [factor]), ...leftover].join('*');
    }
    return this.op('Reshape', [x, this.constInt64(target, [target.length], 'shape')], { dtype: x.dtype, shape });
  }

  transpose(x: Value, perm: number[]): Value {
    return this.op('Transpose', [x], { dtype: x.dtype, shape: perm.map((p) => x.shape[p]) }, { perm });
  }

  unsqueeze(x: Value, axes: number[]): Value {
    const shape = [...x.shape];
    for (const a of [...axes].sort((p, q) => p - q)) shape.splice(a < 0 ? shape.length + a + 1 : a, 0, 1);
    return this.op('Unsqueeze', [x, this.constInt64(axes, [axes.length], 'axes')], { dtype: x.dtype, shape });
  }

  concat(xs: Value[], axis: number): Value {
    const ax = axis < 0 ? xs[0].shape.length + axis : axis;
    const shape = [...xs[0].shape];
    const sizes = xs.map((v) => v.shape[ax]);
    shape[ax] = sizes.every((s) => typeof s === 'number') ? sizes.reduce((p, q) => p + q, 0) : sizes[0];
    return this.op('Concat', xs, { dtype: xs[0].dtype, shape }, { axis });
  }

  /** Static slice along one axis. */
  slice(x: Value, axis: number, start: number, end: number): Value {
    const ax = axis < 0 ? x.shape.length + axis : axis;
    const shape = [...x.shape];
    shape[ax] = end - start;
    return this.op(
      'Slice',
      [x, this.constInt64([start], [1], 'starts'), this.constInt64([end], [1], 'ends'), this.constInt64([ax], [1], 'slice_axes')],
      { dtype: x.dtype, shape },
    );
  }

  /** Splits `x` into equal chunks along `axis` (like torch.chunk with an even split). */
  chunk(x: Value, chunks: number, axis: number): Value[] {
    const ax = axis < 0 ? x.shape.length + axis : axis;
    const size = x.shape[ax];
    if (typeof size !== 'number' || size % chunks !== 0) {
      throw new GraphError(`chunk: dimension ${ax} of [${x.shape.join(',')}] does not split into ${chunks}`);
    }
    const step = size / chunks;
    return Array.from({ length: chunks }, (_, i) => this.slice(x, ax, i * step, (i + 1) * step));
  }

  /** LayerNormalization over the last axis without affine parameters (scale fixed at 1, no bias). */
  layerNorm(x: Value, epsilon: number): Value {
    const d = x.shape[x.shape.length - 1];
    if (typeof d !== 'number') throw new GraphError('layerNorm: last dimension must be static');
    const ones = this.constFloat(new Float32Array(d).fill(1), [d], 'ln_scale');
    return this.op('LayerNormalization', [x, ones], { dtype: x.dtype, shape: x.shape }, { axis: -1, epsilon: { float: epsilon } });
  }

  gather(table: Value, indices: Value, axis = 0): Value {
    const shape = [...table.shape.slice(0, axis), ...indices.shape, ...table.shape.slice(axis + 1)];
    return this.op('Gather', [table, indices], { dtype: table.dtype, shape }, { axis });
  }
}

function transpose2d(src: Float32Array, rows: number, cols: number): Float32Array {
  if (src.length !== rows * cols) throw new GraphError(`expected ${rows}x${cols} values, got ${src.length}`);
  const out = new Float32Array(src.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = src[r * cols + c];
  return out;
}

/** ONNX TensorProto.DataType numbers. */
export const ONNX_DTYPE: Record<DType, number> = { float32: 1, int32: 6, int64: 7, bool: 9, float16: 10 };
