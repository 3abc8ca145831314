// Reads what an ONNX file says it is — IR version, opsets, graph inputs and outputs, node and
// initializer counts — walking the protobuf framing of the whole file by position (tensor bytes
// are skipped, not read), so a random, truncated or empty file is refused with the offset where it
// stops making sense, at a cost of a few reads per node and weight, whatever the model's size.
//
//   const g = inspectOnnx('models/dit/model.onnx');   // throws OnnxFormatError
//   g.inputs  // [{ name: 'x', dtype: 'float32', shape: ['B', 4, 32, 32] }, ...]
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';

export class OnnxFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'OnnxFormatError';
  }
}

export interface OnnxValueInfo {
  name: string;
  dtype: string;
  shape: Array<number | string>;
}

export interface OnnxSummary {
  irVersion: number;
  opsets: Array<{ domain: string; version: number }>;
  inputs: OnnxValueInfo[];
  outputs: OnnxValueInfo[];
  nodes: number;
  initializers: number;
  /** Initializers whose data lives in another file (external data). */
  externalInitializers: number;
  /** The files external data lives in, as the initializers name them (relative to the model). */
  externalLocations: string[];
}

/** TensorProto.DataType → the dtype names model.json uses. */
const ELEM_TYPES: Record<number, string> = {
  1: 'float32',
  2: 'uint8',
  3: 'int8',
  5: 'int16',
  6: 'int32',
  7: 'int64',
  9: 'bool',
  10: 'float16',
  11: 'float64',
  16: 'bfloat16',
};

const WIRE_VARINT = 0;
const WIRE_I64 = 1;
const WIRE_LEN = 2;
const WIRE_I32 = 5;

/** Positioned reads of a file through a small window, so skipping a weight costs nothing. */
class FileReader {
  private buf = Buffer.alloc(0);
  private bufStart = 0;

  constructor(
    private readonly fd: number,
    readonly size: number,
    readonly path: string,
  ) {}

  fail(pos: number, what: string): never {
    throw new OnnxFormatError(`${this.path}: not a valid ONNX model: ${what} at byte ${pos} of ${this.size}`);
  }

  byte(pos: number): number {
    if (pos >= this.size) this.fail(pos, 'unexpected end of file (truncated?)');
    if (pos < this.bufStart || pos >= this.bufStart + this.buf.length) {
      const len = Math.min(64 * 1024, this.size - pos);
      this.buf = Buffer.alloc(len);
      readSync(this.fd, this.buf, 0, len, pos);
      this.bufStart = pos;
    }
    return this.buf[pos - this.bufStart];
  }

  bytes(pos: number, len: number): Buffer {
    if (pos + len > this.size) this.fail(pos, `a field of ${len} bytes runs past the end of the file (truncated?)`);
    const out = Buffer.alloc(len);
    if (len > 0) readSync(this.fd, out, 0, len, pos);
    return out;
  }

  /** A varint at pos: [value, next position]. Values past 2^53 are kept approximately (sizes never are). */
  varint(pos: number): [number, number] {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      const b = this.byte(pos + i);
      v += (b & 0x7f) * mul;
      mul *= 128;
      if ((b & 0x80) === 0) return [v, pos + i + 1];
    }
    return this.fail(pos, 'a varint longer than 10 bytes');
  }
}

interface Field {
  field: number;
  wire: number;
  /** Varint value, or the length of a length-delimited field. */
  value: number;
  /** Where a length-delimited field's bytes start. */
  start: number;
  end: number;
}

/** The fields of the message in [pos, end), each checked to lie inside it. */
function* fields(r: FileReader, pos: number, end: number): Generator<Field> {
  let p = pos;
  while (p < end) {
    const at = p;
    const [tag, afterTag] = r.varint(p);
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    if (field === 0) r.fail(at, 'field number 0');
    let f: Field;
    if (wire === WIRE_VARINT) {
      const [v, next] = r.varint(afterTag);
      f = { field, wire, value: v, start: afterTag, end: next };
    } else if (wire === WIRE_I64) f = { field, wire, value: 0, start: afterTag, end: afterTag + 8 };
    else if (wire === WIRE_I32) f = { field, wire, value: 0, start: afterTag, end: afterTag + 4 };
    else if (wire === WIRE_LEN) {
      const [len, start] = r.varint(afterTag);
      f = { field, wire, value: len, start, end: start + len };
    } else return r.fail(at, `wire type ${wire} (field ${field})`);
    if (f.end > end) r.fail(at, `field ${field} (${f.end - f.start} bytes) runs past the end of its message (truncated?)`);
    p = f.end;
    yield f;
  }
}

const text = (r: FileReader, f: Field): string => r.bytes(f.start, f.value).toString('utf8');

function need(r: FileReader, f: Field, wire: number, what: string): void {
  if (f.wire !== wire) r.fail(f.start, `${what} has wire type ${f.wire}`);
}

function valueInfo(r: FileReader, f: Field): OnnxValueInfo {
  const out: OnnxValueInfo = { name: '', dtype: 'unknown', shape: [] };
  for (const g of fields(r, f.start, f.end)) {
    if (g.field === 1 && g.wire === WIRE_LEN) out.name = text(r, g);
    else if (g.field === 2 && g.wire === WIRE_LEN) {
      for (const t of fields(r, g.start, g.end)) {
        if (t.field !== 1 || t.wire !== WIRE_LEN) continue; // tensor_type
        for (const tt of fields(r, t.start, t.end)) {
          if (tt.field === 1 && tt.wire === WIRE_VARINT) out.dtype = ELEM_TYPES[tt.value] ?? `type ${tt.value}`;
          else if (tt.field === 2 && tt.wire === WIRE_LEN) {
            for (const d of fields(r, tt.start, tt.end)) {
              if (d.field !== 1 || d.wire !== WIRE_LEN) continue;
              let dim: number | string = '?';
              for (const dv of fields(r, d.start, d.end)) {
                if (dv.field === 1 && dv.wire === WIRE_VARINT) dim = dv.value;
                else if (dv.field === 2 && dv.wire === WIRE_LEN) dim = text(r, dv);
              }
              out.shape.push(dim);
            }
          }
        }
      }
    }
  }
  if (!out.name) r.fail(f.start, 'a graph input or output without a name');
  return out;
}

/** Parses the file's framing throughout; throws OnnxFormatError naming the file and offset. */
export function inspectOnnx(path: string): OnnxSummary {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    throw new OnnxFormatError(`${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
  }
  try {
    const size = fstatSync(fd).size;
    const r = new FileReader(fd, size, path);
    if (size === 0) r.fail(0, 'the file is empty');
    const out: OnnxSummary = {
      irVersion: 0,
      opsets: [],
      inputs: [],
      outputs: [],
      nodes: 0,
      initializers: 0,
      externalInitializers: 0,
      externalLocations: [],
    };
    const locations = new Set<string>();
    let graphs = 0;
    for (const f of fields(r, 0, size)) {
      if (f.field === 1) {
        need(r, f, WIRE_VARINT, 'ir_version');
        out.irVersion = f.value;
      } else if (f.field === 8) {
        need(r, f, WIRE_LEN, 'opset_import');
        const o = { domain: '', version: 0 };
        for (const g of fields(r, f.start, f.end)) {
          if (g.field === 1 && g.wire === WIRE_LEN) o.domain = text(r, g);
          else if (g.field === 2 && g.wire === WIRE_VARINT) o.version = g.value;
        }
        out.opsets.push(o);
      } else if (f.field === 7) {
        need(r, f, WIRE_LEN, 'graph');
        graphs++;
        for (const g of fields(r, f.start, f.end)) {
          if (g.field === 1) {
            need(r, g, WIRE_LEN, 'node');
            for (const _ of fields(r, g.start, g.end)); // framing of every node
            out.nodes++;
          } else if (g.field === 5) {
            need(r, g, WIRE_LEN, 'initializer');
            for (const t of fields(r, g.start, g.end)) {
              if (t.field === 14 && t.wire === WIRE_VARINT && t.value === 1) out.externalInitializers++;
              else if (t.field === 13 && t.wire === WIRE_LEN) {
                let key = '';
                let value = '';
                for (const kv of fields(r, t.start, t.end)) {
                  if (kv.field === 1 && kv.wire === WIRE_LEN) key = text(r, kv);
                  else if (kv.field === 2 && kv.wire === WIRE_LEN) value = text(r, kv);
                }
                if (key === 'location') locations.add(value);
              }
            }
            out.initializers++;
          } else if (g.field === 11) {
            need(r, g, WIRE_LEN, 'input');
            out.inputs.push(valueInfo(r, g));
          } else if (g.field === 12) {
            need(r, g, WIRE_LEN, 'output');
            out.outputs.push(valueInfo(r, g));
          }
        }
      }
    }
    if (out.irVersion < 3) r.fail(0, `no usable ir_version (got ${out.irVersion})`);
    if (graphs !== 1) r.fail(0, `${graphs} graphs (expected one)`);
    if (out.opsets.length === 0) r.fail(0, 'no opset_import');
    // ONNX lists initializers among the inputs in old IR versions; the real inputs are the others.
    if (out.outputs.length === 0) r.fail(0, 'a graph without outputs');
    out.externalLocations = [...locations];
    return out;
  } finally {
    closeSync(fd);
  }
}
