// torch.save zip checkpoints (PyTorch ≥ 1.6): <top>/data.pkl + <top>/data/<key>, read lazily per tensor.
import { bytesToF32, bytesToI64 } from './decode.ts';
import { isTensorRef, unpickle, type PyValue, type TensorRef } from './pickle.ts';
import { DTYPE_SIZE, MissingTensorError, numelOf, WeightsError, type TensorInfo, type WeightFile } from './types.ts';
import { ZipReader } from './zip.ts';

export interface TorchOpenOptions {
  /** Which half of a training checkpoint {"model", "ema"} to load; default: "ema" when present (as DiT's sample.py). */
  prefer?: 'ema' | 'model';
}

/** Largest data.pkl read: it holds names, shapes and storage keys (a DiT-XL/2's is about 60 KB). */
const MAX_PICKLE_BYTES = 64 * 1024 * 1024;

interface Resolved {
  ref: TensorRef;
  entry: string; // zip entry of the storage
  contiguous: boolean;
}

function rowMajorStrides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

function isContiguous(shape: readonly number[], stride: readonly number[]): boolean {
  const want = rowMajorStrides(shape);
  // Strides of size-1 (and empty) dims never affect addressing.
  return numelOf(shape) === 0 || shape.every((d, i) => d === 1 || stride[i] === want[i]);
}

export class TorchCheckpoint implements WeightFile {
  readonly format = 'torch' as const;
  /** Key of the checkpoint dict the tensors came from ('ema', 'model', 'state_dict'), or null for a bare state_dict. */
  readonly selected: string | null;
  private readonly zip: ZipReader;
  private readonly tensors = new Map<string, Resolved>();

  constructor(
    readonly path: string,
    opts: TorchOpenOptions = {},
  ) {
    this.zip = new ZipReader(path);
    try {
      const pkls = [...this.zip.entries.keys()].filter((n) => /^([^/]+\/)?data\.pkl$/.test(n));
      if (pkls.length !== 1)
        throw new WeightsError(`${path}: not a torch.save zip checkpoint (expected one <name>/data.pkl entry, found ${pkls.length})`);
      const prefix = pkls[0].slice(0, -'data.pkl'.length);
      const bo = this.zip.entry(`${prefix}byteorder`);
      if (bo) {
        const order = new TextDecoder().decode(this.zip.readEntry(bo.name, 64)).trim();
        if (order !== 'little') throw new WeightsError(`${path}: byteorder '${order}' is not supported (only little-endian checkpoints)`);
      }
      const root = unpickle(this.zip.readEntry(pkls[0], MAX_PICKLE_BYTES), path);
      const { dict, selected } = selectStateDict(root, opts.prefer, path);
      this.selected = selected;
      flatten(dict, path, (name, ref) => this.tensors.set(name, this.resolve(name, ref, prefix)));
      if (this.tensors.size === 0) throw new WeightsError(`${path}: checkpoint holds no tensors`);
    } catch (e) {
      this.zip.close();
      throw e;
    }
  }

  // Checks at open time that every tensor's elements lie inside its storage entry, so reads cannot fail later on bounds.
  private resolve(name: string, ref: TensorRef, prefix: string): Resolved {
    const where = `${this.path}: tensor '${name}'`;
    const entry = `${prefix}data/${ref.storage.key}`;
    const ze = this.zip.entry(entry);
    if (!ze)
      throw new WeightsError(`${where}: storage '${ref.storage.key}' (zip entry ${entry}) is missing: truncated or corrupt checkpoint`);
    const es = DTYPE_SIZE[ref.storage.dtype];
    if (ze.size < ref.storage.numel * es)
      throw new WeightsError(`${where}: storage '${ref.storage.key}' has ${ze.size} bytes, needs ${ref.storage.numel * es}`);
    if (ref.shape.some((d) => d < 0) || ref.stride.some((s) => s < 0) || ref.offset < 0)
      throw new WeightsError(`${where}: negative size, stride or offset`);
    if (numelOf(ref.shape) > 0) {
      let last = ref.offset;
      for (let i = 0; i < ref.shape.length; i++) last += (ref.shape[i] - 1) * ref.stride[i];
      if (last >= ref.storage.numel)
        throw new WeightsError(
          `${where}: view (offset ${ref.offset}, shape [${ref.shape.join(', ')}], stride [${ref.stride.join(', ')}]) reaches element ${last} of a ${ref.storage.numel}-element storage`,
        );
    }
    return { ref, entry, contiguous: isContiguous(ref.shape, ref.stride) };
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.get(name);
    return { name, dtype: t.ref.storage.dtype, shape: [...t.ref.shape] };
  }

  /** Raw little-endian bytes of the tensor in row-major order (views gathered). */
  readBytes(name: string): Uint8Array {
    const { ref, entry, contiguous } = this.get(name);
    const es = DTYPE_SIZE[ref.storage.dtype];
    const n = numelOf(ref.shape);
    if (n === 0) return new Uint8Array(0);
    if (contiguous) return this.zip.readRange(entry, ref.offset * es, n * es);
    // Read the span the view touches once, then gather element by element.
    let span = 1;
    for (let i = 0; i < ref.shape.length; i++) span += (ref.shape[i] - 1) * ref.stride[i];
    const src = this.zip.readRange(entry, ref.offset * es, span * es);
    const out = new Uint8Array(new ArrayBuffer(n * es));
    const nd = ref.shape.length;
    const idx = new Array<number>(nd).fill(0);
    let srcEl = 0;
    for (let k = 0; k < n; k++) {
      out.set(src.subarray(srcEl * es, srcEl * es + es), k * es);
      for (let d = nd - 1; d >= 0; d--) {
        idx[d]++;
        srcEl += ref.stride[d];
        if (idx[d] < ref.shape[d]) break;
        srcEl -= ref.stride[d] * ref.shape[d];
        idx[d] = 0;
      }
    }
    return out;
  }

  readF32(name: string): Float32Array {
    return bytesToF32(this.readBytes(name), this.get(name).ref.storage.dtype, name);
  }

  readI64(name: string): BigInt64Array {
    return bytesToI64(this.readBytes(name), this.get(name).ref.storage.dtype, name);
  }

  close(): void {
    this.zip.close();
  }

  private get(name: string): Resolved {
    const t = this.tensors.get(name);
    if (!t) throw new MissingTensorError(name, this.path);
    return t;
  }
}

/** Deepest dict nesting walked; a state_dict nests a handful of levels. */
const MAX_DEPTH = 64;

/**
 * Whether a value holds tensors. The pickle memo lets one object appear many times (and a dict
 * contain itself), so each dict is looked at once, its answer remembered: cost linear in the file.
 */
function hasTensors(v: PyValue, seen: Map<Map<PyValue, PyValue>, boolean>, path: string, depth = 0): boolean {
  if (isTensorRef(v)) return true;
  if (!(v instanceof Map)) return false;
  const known = seen.get(v);
  if (known !== undefined) return known;
  if (depth > MAX_DEPTH) throw new WeightsError(`${path}: dicts nested more than ${MAX_DEPTH} deep: not a checkpoint of weights`);
  seen.set(v, false); // a dict that contains itself adds no tensors through that path
  let found = false;
  for (const x of v.values()) {
    if (hasTensors(x, seen, path, depth + 1)) {
      found = true;
      break;
    }
  }
  seen.set(v, found);
  return found;
}

function selectStateDict(
  root: PyValue,
  prefer: 'ema' | 'model' | undefined,
  path: string,
): { dict: Map<PyValue, PyValue>; selected: string | null } {
  if (!(root instanceof Map)) throw new WeightsError(`${path}: checkpoint top level is not a dict (state_dict or {"model", "ema"})`);
  const seen = new Map<Map<PyValue, PyValue>, boolean>();
  const pick = (k: string): Map<PyValue, PyValue> | undefined => {
    const v = root.get(k);
    return v instanceof Map && hasTensors(v, seen, path) ? v : undefined;
  };
  const order = prefer === 'model' ? ['model', 'ema', 'state_dict'] : ['ema', 'model', 'state_dict'];
  // A bare state_dict has tensors at its top level; a training checkpoint nests them.
  const topHasTensors = [...root.values()].some(isTensorRef);
  if (!topHasTensors) {
    for (const k of order) {
      const d = pick(k);
      if (d) return { dict: d, selected: k };
    }
  }
  return { dict: root, selected: null };
}

/**
 * Tensor names of a (nested) state_dict. A dict is walked once: one reached again through the
 * memo would multiply the names (2^depth for a chain of dicts each holding the next twice), and
 * one inside itself would never end, so both are refused, naming the file and where.
 */
function flatten(root: Map<PyValue, PyValue>, path: string, add: (name: string, ref: TensorRef) => void): void {
  const placed = new Map<Map<PyValue, PyValue>, string>();
  const walk = (d: Map<PyValue, PyValue>, prefix: string, depth: number): void => {
    if (depth > MAX_DEPTH)
      throw new WeightsError(`${path}: dicts nested more than ${MAX_DEPTH} deep at '${prefix.slice(0, 200)}': not a checkpoint of weights`);
    placed.set(d, prefix);
    for (const [k, v] of d) {
      if (typeof k !== 'string') continue;
      if (isTensorRef(v)) add(prefix + k, v);
      else if (v instanceof Map) {
        const at = placed.get(v);
        const here = `${prefix}${k}`;
        if (at !== undefined) {
          const cycle = here.startsWith(at) || at === '';
          throw new WeightsError(
            cycle
              ? `${path}: the dict at '${at.replace(/\.$/, '') || '(top level)'}' contains itself (through '${here.slice(0, 200)}'): a cycle, not a state_dict`
              : `${path}: one dict appears both at '${at.replace(/\.$/, '')}' and at '${here.slice(0, 200)}' (shared through the pickle memo): a state_dict nests each dict once`,
          );
        }
        walk(v, `${here}.`, depth + 1);
      }
    }
  };
  walk(root, '', 0);
}

export function openTorchCheckpoint(path: string, opts?: TorchOpenOptions): TorchCheckpoint {
  return new TorchCheckpoint(path, opts);
}
