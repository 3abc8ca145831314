// Serialises a Graph as an ONNX ModelProto (IR 8, opset 17). Initializers are loaded one at a time:
// above a size threshold they stream into an external data file next to the model, so building a
// multi-gigabyte model never holds all of its weights in memory at once. Another graph built from
// the same weights and written into the same folder can point at that file instead of copying it.
import { closeSync, openSync, writeSync, writeFileSync } from 'node:fs';
import { basename } from 'node:path';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { f32ToF16Bits } from '../weights/decode.ts';
import { type Graph, ONNX_DTYPE, type AttrValue, type Initializer, type Node, type Value } from './graph.ts';

export const IR_VERSION = 8;
export const OPSET = 17;

export interface WriteOptions {
  /** Store float weights as float16 (cast back to float32 inside the graph). Default float32. */
  weightDtype?: 'float32' | 'float16';
  /**
   * Named weights go to `<model>.data` when all weights are above this many bytes. Default 256 MiB
   * (protobuf caps at 2 GiB). Generated constants (shapes, axes, scalars) always stay in the model:
   * onnxruntime reads them during shape inference, before it loads external data.
   */
  externalDataThresholdBytes?: number;
  producerVersion?: string;
  docString?: string;
  /** Called after each initializer is written. */
  onProgress?: (done: number, total: number, name: string) => void;
  /**
   * Another model's external data, in the folder this model is written to: the named weights it
   * holds (same name, shape and stored dtype) are referenced there, not loaded or written again.
   */
  reuse?: ExternalData;
}

/** Where a written model's named weights lie in its external data file. */
export interface ExternalData {
  /** The data file, relative to the model's folder. */
  file: string;
  /** By initializer name. */
  tensors: ReadonlyMap<string, ExternalTensor>;
}

/** One weight in an external data file: its TensorProto's stored name, data type and dims, and its bytes' place. */
export interface ExternalTensor {
  storedName: string;
  dataType: number;
  dims: readonly number[];
  offset: number;
  length: number;
}

export interface WriteResult {
  /** Name of the external data file (relative to the model), or null when weights are embedded. */
  externalData: string | null;
  /** The named weights this model wrote to its external data file, for `reuse` (null when embedded). */
  external: ExternalData | null;
  /** Number of float weight parameters (the model's parameter count). */
  params: number;
  /** Bytes of weights this model stores itself (those found in `reuse` are not counted). */
  weightBytes: number;
}

const LEN = WireType.LengthDelimited;
const VARINT = WireType.Varint;

function encodeShape(w: BinaryWriter, shape: readonly (number | string)[]): void {
  w.tag(2, LEN).fork(); // TypeProto.Tensor.shape
  for (const d of shape) {
    w.tag(1, LEN).fork(); // TensorShapeProto.dim
    if (typeof d === 'number') w.tag(1, VARINT).int64(d);
    else w.tag(2, LEN).string(d);
    w.join();
  }
  w.join();
}

function encodeValueInfo(w: BinaryWriter, field: number, v: Value): void {
  w.tag(field, LEN).fork();
  w.tag(1, LEN).string(v.name);
  w.tag(2, LEN).fork(); // TypeProto
  w.tag(1, LEN).fork(); // tensor_type
  w.tag(1, VARINT).int32(ONNX_DTYPE[v.dtype]);
  encodeShape(w, v.shape);
  w.join().join().join();
}

function encodeAttr(w: BinaryWriter, name: string, value: AttrValue): void {
  w.tag(5, LEN).fork();
  w.tag(1, LEN).string(name);
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) throw new Error(`attribute ${name}: use { float } for non-integers`);
    w.tag(3, VARINT).int64(value).tag(20, VARINT).int32(2);
  } else if (typeof value === 'string') {
    w.tag(4, LEN).bytes(new TextEncoder().encode(value)).tag(20, VARINT).int32(3);
  } else if (Array.isArray(value)) {
    for (const x of value) w.tag(8, VARINT).int64(x);
    w.tag(20, VARINT).int32(7);
  } else if ('float' in value) {
    w.tag(2, WireType.Bit32).float(value.float).tag(20, VARINT).int32(1);
  } else {
    for (const x of value.floats) w.tag(7, WireType.Bit32).float(x);
    w.tag(20, VARINT).int32(6);
  }
  w.join();
}

function encodeNode(w: BinaryWriter, n: Node): void {
  w.tag(1, LEN).fork();
  for (const i of n.inputs) w.tag(1, LEN).string(i);
  for (const o of n.outputs) w.tag(2, LEN).string(o);
  w.tag(3, LEN).string(n.name).tag(4, LEN).string(n.opType);
  for (const [k, v] of Object.entries(n.attrs)) encodeAttr(w, k, v);
  w.join();
}

function toBytes(data: Float32Array | BigInt64Array | Uint16Array): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

function encodeExternalRef(w: BinaryWriter, location: string, offset: number, length: number): void {
  for (const [k, v] of [
    ['location', location],
    ['offset', String(offset)],
    ['length', String(length)],
  ]) {
    w.tag(13, LEN).fork().tag(1, LEN).string(k).tag(2, LEN).string(v).join();
  }
  w.tag(14, VARINT).int32(1); // data_location = EXTERNAL
}

export function writeOnnx(graph: Graph, path: string, opts: WriteOptions = {}): WriteResult {
  const f16 = opts.weightDtype === 'float16';
  const threshold = opts.externalDataThresholdBytes ?? 256 * 1024 * 1024;
  const stored = (init: Initializer): { half: boolean; name: string; dataType: number } => {
    const half = f16 && init.castable;
    return { half, name: half ? `${init.name}__f16` : init.name, dataType: half ? ONNX_DTYPE.float16 : ONNX_DTYPE[init.dtype] };
  };
  /** The copy in `opts.reuse` this graph points at, for each named weight found there. */
  const reused = new Map<Initializer, ExternalTensor>();
  let weightBytes = 0;
  let params = 0;
  let ownNamed = false;
  for (const init of graph.initializers) {
    const n = init.shape.reduce((p, q) => p * q, 1);
    if (init.param) params += n;
    const s = stored(init);
    const r = init.named ? opts.reuse?.tensors.get(init.name) : undefined;
    if (!r) {
      weightBytes += n * (init.dtype === 'int64' ? 8 : s.half ? 2 : 4);
      ownNamed ||= init.named;
      continue;
    }
    if (r.storedName !== s.name || r.dataType !== s.dataType || r.dims.join(',') !== init.shape.join(',')) {
      throw new Error(
        `initializer ${init.name}: ${opts.reuse!.file} holds it as ${r.storedName} (type ${r.dataType}, [${r.dims.join(',')}]), ` +
          `this graph needs ${s.name} (type ${s.dataType}, [${init.shape.join(',')}])`,
      );
    }
    reused.set(init, r);
  }
  const external = weightBytes > threshold && ownNamed; // no data file for constants alone
  const dataName = `${basename(path)}.data`;
  const dataFd = external ? openSync(`${path}.data`, 'w') : -1;
  const written = new Map<string, ExternalTensor>();
  let offset = 0;

  const w = new BinaryWriter();
  w.tag(1, VARINT).int64(IR_VERSION);
  w.tag(2, LEN).string('ditpipe');
  w.tag(3, LEN).string(opts.producerVersion ?? '0');
  if (opts.docString) w.tag(6, LEN).string(opts.docString);
  w.tag(8, LEN).fork().tag(1, LEN).string('').tag(2, VARINT).int64(OPSET).join();

  w.tag(7, LEN).fork(); // GraphProto
  w.tag(2, LEN).string(graph.name);
  // float16 storage: each weight `name` is stored as `name__f16` and cast back first thing.
  const castNodes: Node[] = [];
  try {
    let done = 0;
    for (const init of graph.initializers) {
      const s = stored(init);
      if (s.half) {
        castNodes.push({ opType: 'Cast', inputs: [s.name], outputs: [init.name], name: `${init.name}__cast`, attrs: { to: 1 } });
      }
      w.tag(5, LEN).fork(); // TensorProto
      for (const d of init.shape) w.tag(1, VARINT).int64(d);
      w.tag(2, VARINT).int32(s.dataType);
      w.tag(8, LEN).string(s.name);
      const r = reused.get(init);
      if (r) {
        encodeExternalRef(w, opts.reuse!.file, r.offset, r.length);
      } else {
        const loaded = init.load();
        const expected = init.shape.reduce((p, q) => p * q, 1);
        if (loaded.length !== expected) {
          throw new Error(`initializer ${init.name}: ${loaded.length} values for shape [${init.shape.join(',')}]`);
        }
        const bytes = toBytes(s.half ? f32ToF16Bits(loaded as Float32Array) : loaded);
        if (external && init.named) {
          writeSync(dataFd, bytes, 0, bytes.length, offset);
          encodeExternalRef(w, dataName, offset, bytes.length);
          written.set(init.name, { storedName: s.name, dataType: s.dataType, dims: init.shape, offset, length: bytes.length });
          offset += bytes.length;
        } else {
          w.tag(9, LEN).bytes(bytes);
        }
      }
      w.join();
      opts.onProgress?.(++done, graph.initializers.length, init.name);
    }
  } finally {
    if (dataFd >= 0) closeSync(dataFd);
  }
  for (const n of [...castNodes, ...graph.nodes]) encodeNode(w, n);
  for (const v of graph.inputs) encodeValueInfo(w, 11, v);
  for (const v of graph.outputs) encodeValueInfo(w, 12, v);
  w.join();
  writeFileSync(path, w.finish());
  return {
    externalData: external ? dataName : null,
    external: external ? { file: dataName, tensors: written } : null,
    params,
    weightBytes,
  };
}
