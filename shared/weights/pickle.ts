// Restricted unpickler for torch.save's data.pkl. It interprets only the opcodes torch writes and
// resolves globals against a fixed allow-list into inert JS values; nothing is ever executed, and
// any other global is refused by name before it is used.
import { UnsafePickleError, WeightsError, type WeightDType } from './types.ts';

export interface PyGlobal {
  readonly kind: 'global';
  readonly module: string;
  readonly name: string;
}

export interface StorageRef {
  readonly kind: 'storage';
  readonly key: string;
  readonly dtype: WeightDType;
  readonly numel: number;
  readonly location: string;
}

export interface TensorRef {
  readonly kind: 'tensor';
  readonly storage: StorageRef;
  readonly offset: number;
  readonly shape: number[];
  readonly stride: number[];
}

/** An attribute bag (argparse.Namespace in training checkpoints); kept as data, never constructed. */
export interface PyRecord {
  readonly kind: 'record';
  readonly cls: string;
  state: unknown;
}

export type PyValue =
  null | boolean | number | bigint | string | Uint8Array | PyValue[] | Map<PyValue, PyValue> | PyGlobal | StorageRef | TensorRef | PyRecord;

const STORAGE_DTYPES: Readonly<Record<string, WeightDType>> = {
  FloatStorage: 'F32',
  HalfStorage: 'F16',
  BFloat16Storage: 'BF16',
  DoubleStorage: 'F64',
  LongStorage: 'I64',
  IntStorage: 'I32',
  ShortStorage: 'I16',
  CharStorage: 'I8',
  ByteStorage: 'U8',
  BoolStorage: 'BOOL',
};

// Every global a torch.save checkpoint of weights needs; anything else is refused.
const ALLOWED_GLOBALS = new Set<string>([
  'collections OrderedDict',
  'torch._utils _rebuild_tensor',
  'torch._utils _rebuild_tensor_v2',
  'torch._utils _rebuild_parameter',
  'torch._utils _rebuild_parameter_with_state',
  'torch._tensor _rebuild_from_type_v2',
  'torch Tensor',
  'torch.nn.parameter Parameter',
  'argparse Namespace',
  ...Object.keys(STORAGE_DTYPES).map((s) => `torch ${s}`),
]);

const MARK = Symbol('mark');
type StackItem = PyValue | typeof MARK;

function isGlobal(v: unknown, qual?: string): v is PyGlobal {
  return (
    typeof v === 'object' &&
    v !== null &&
    (v as { kind?: unknown }).kind === 'global' &&
    (qual === undefined || `${(v as PyGlobal).module} ${(v as PyGlobal).name}` === qual)
  );
}

export function isTensorRef(v: unknown): v is TensorRef {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Map) && (v as { kind?: unknown }).kind === 'tensor';
}

function isStorageRef(v: unknown): v is StorageRef {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Map) && (v as { kind?: unknown }).kind === 'storage';
}

function qualName(g: PyGlobal): string {
  return `${g.module}.${g.name}`;
}

function describe(v: StackItem): string {
  if (v === MARK) return 'mark';
  if (v === null) return 'None';
  if (Array.isArray(v)) return 'tuple/list';
  if (v instanceof Map) return 'dict';
  if (v instanceof Uint8Array) return 'bytes';
  if (typeof v === 'object') return v.kind === 'global' ? `global '${qualName(v)}'` : v.kind;
  return typeof v;
}

function toInt(v: PyValue, what: string): number {
  if (typeof v === 'number' && Number.isSafeInteger(v)) return v;
  if (typeof v === 'bigint' && v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
  throw new WeightsError(`${what}: expected an integer, got ${describe(v)}`);
}

function intList(v: PyValue, what: string): number[] {
  if (!Array.isArray(v)) throw new WeightsError(`${what}: expected a tuple of integers, got ${describe(v)}`);
  return v.map((x, i) => toInt(x, `${what}[${i}]`));
}

/** Applies an allow-listed callable to its arguments, producing inert data. */
function callGlobal(fn: PyValue, args: PyValue): PyValue {
  if (!isGlobal(fn)) throw new UnsafePickleError(`pickle calls a non-global (${describe(fn)}); refused`);
  const q = `${fn.module} ${fn.name}`;
  if (!Array.isArray(args)) throw new WeightsError(`pickle call of '${qualName(fn)}' without an argument tuple`);
  switch (q) {
    case 'collections OrderedDict': {
      const m = new Map<PyValue, PyValue>();
      if (args.length > 0) {
        const items = args[0];
        if (!Array.isArray(items)) throw new WeightsError(`OrderedDict argument must be a list of pairs`);
        for (const kv of items) {
          if (!Array.isArray(kv) || kv.length !== 2) throw new WeightsError(`OrderedDict argument must be a list of pairs`);
          m.set(kv[0], kv[1]);
        }
      }
      return m;
    }
    case 'torch._utils _rebuild_tensor':
    case 'torch._utils _rebuild_tensor_v2': {
      const [storage, offset, size, stride] = args;
      if (!isStorageRef(storage)) throw new WeightsError(`${fn.name}: first argument must be a storage, got ${describe(storage)}`);
      const shape = intList(size, `${fn.name} size`);
      const strides = intList(stride, `${fn.name} stride`);
      if (shape.length !== strides.length)
        throw new WeightsError(`${fn.name}: size has ${shape.length} dims but stride has ${strides.length}`);
      return { kind: 'tensor', storage, offset: toInt(offset, `${fn.name} storage_offset`), shape, stride: strides };
    }
    case 'torch._utils _rebuild_parameter':
    case 'torch._utils _rebuild_parameter_with_state': {
      if (!isTensorRef(args[0])) throw new WeightsError(`${fn.name}: first argument must be a tensor, got ${describe(args[0])}`);
      return args[0];
    }
    case 'torch._tensor _rebuild_from_type_v2': {
      const [func, newType, inner] = args;
      if (!isGlobal(newType, 'torch Tensor') && !isGlobal(newType, 'torch.nn.parameter Parameter')) {
        throw new UnsafePickleError(`_rebuild_from_type_v2 with tensor type ${describe(newType)} refused`);
      }
      return callGlobal(func, inner);
    }
    default:
      throw new UnsafePickleError(`pickle calls global '${qualName(fn)}', which is not a tensor/dict rebuild function; refused`);
  }
}

function persistentLoad(pid: PyValue): StorageRef {
  if (!Array.isArray(pid) || pid.length !== 5 || pid[0] !== 'storage') {
    throw new UnsafePickleError(`persistent id ${describe(pid)} is not ('storage', type, key, location, numel); refused`);
  }
  const [, type, key, location, numel] = pid;
  if (!isGlobal(type) || type.module !== 'torch' || !(type.name in STORAGE_DTYPES))
    throw new WeightsError(`storage type ${describe(type)} is not supported`);
  if (typeof key !== 'string' || !/^[A-Za-z0-9_.-]+$/.test(key)) throw new WeightsError(`storage key ${describe(key)} is not a plain name`);
  if (typeof location !== 'string') throw new WeightsError(`storage '${key}' location must be a string`);
  return { kind: 'storage', key, dtype: STORAGE_DTYPES[type.name], numel: toInt(numel, `storage '${key}' numel`), location };
}

/** Interprets a pickle (protocols 0–5 subset) into inert values; throws UnsafePickleError on disallowed globals. */
export function unpickle(data: Uint8Array, where: string): PyValue {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  const latin1 = new TextDecoder('latin1');
  const stack: StackItem[] = [];
  const memo = new Map<number, PyValue>();
  let pos = 0;

  const fail = (msg: string): never => {
    throw new WeightsError(`${where}: ${msg} (pickle offset ${pos})`);
  };
  const need = (n: number): void => {
    if (pos + n > data.byteLength) fail('truncated pickle');
  };
  const u8 = (): number => (need(1), data[pos++]);
  const u16 = (): number => (need(2), (pos += 2), dv.getUint16(pos - 2, true));
  const u32 = (): number => (need(4), (pos += 4), dv.getUint32(pos - 4, true));
  const i32 = (): number => (need(4), (pos += 4), dv.getInt32(pos - 4, true));
  const u64 = (): number => {
    need(8);
    const v = dv.getBigUint64(pos, true);
    pos += 8;
    if (v > BigInt(data.byteLength)) fail('length past end of pickle');
    return Number(v);
  };
  const bytes = (n: number): Uint8Array => (need(n), (pos += n), data.subarray(pos - n, pos));
  const line = (): string => {
    const end = data.indexOf(0x0a, pos);
    if (end < 0) fail('truncated pickle (missing newline)');
    const s = latin1.decode(data.subarray(pos, end));
    pos = end + 1;
    return s;
  };
  const pop = (): PyValue => {
    const v = stack.pop();
    if (v === undefined) fail('stack underflow');
    if (v === MARK) fail('unexpected mark');
    return v as PyValue;
  };
  const top = (): PyValue => {
    const v = stack[stack.length - 1];
    if (v === undefined || v === MARK) fail('stack underflow');
    return v as PyValue;
  };
  const popMark = (): PyValue[] => {
    const k = stack.lastIndexOf(MARK);
    if (k < 0) fail('missing mark');
    const items = stack.splice(k);
    return items.slice(1) as PyValue[];
  };
  const global = (module: string, name: string): PyGlobal => {
    const q = `${module} ${name}`;
    if (!ALLOWED_GLOBALS.has(q))
      throw new UnsafePickleError(
        `${where}: refusing pickle global '${module}.${name}' (only tensor rebuild functions, storages and OrderedDict are allowed); nothing was executed`,
      );
    return { kind: 'global', module, name };
  };
  const decodeLong = (b: Uint8Array): number | bigint => {
    if (b.length === 0) return 0;
    let v = 0n;
    for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
    if (b[b.length - 1] & 0x80) v -= 1n << BigInt(8 * b.length);
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  };
  const setItems = (dict: PyValue, items: PyValue[]): void => {
    if (!(dict instanceof Map)) fail(`SETITEM(S) on ${describe(dict)}`);
    if (items.length % 2) fail('odd number of dict items');
    for (let i = 0; i < items.length; i += 2) (dict as Map<PyValue, PyValue>).set(items[i], items[i + 1]);
  };
  const appendItems = (list: PyValue, items: PyValue[]): void => {
    if (!Array.isArray(list)) fail(`APPEND(S) on ${describe(list)}`);
    (list as PyValue[]).push(...items);
  };

  for (;;) {
    const opPos = pos;
    const op = u8();
    switch (op) {
      case 0x80: // PROTO
        if (u8() > 5) fail('unsupported pickle protocol');
        break;
      case 0x95: // FRAME
        u64();
        break;
      case 0x2e: {
        // STOP
        const v = pop();
        if (stack.length) fail('stack not empty at STOP');
        return v;
      }
      case 0x28: // MARK
        stack.push(MARK);
        break;
      case 0x30: // POP
        if (stack.pop() === undefined) fail('stack underflow');
        break;
      case 0x31: // POP_MARK
        popMark();
        break;
      case 0x32: // DUP
        stack.push(top());
        break;
      case 0x71: // BINPUT
        memo.set(u8(), top());
        break;
      case 0x72: // LONG_BINPUT
        memo.set(u32(), top());
        break;
      case 0x94: // MEMOIZE
        memo.set(memo.size, top());
        break;
      case 0x70: // PUT
        memo.set(Number.parseInt(line(), 10), top());
        break;
      case 0x68: // BINGET
      case 0x6a: // LONG_BINGET
      case 0x67: {
        // GET
        const k = op === 0x68 ? u8() : op === 0x6a ? u32() : Number.parseInt(line(), 10);
        if (!memo.has(k)) fail(`memo key ${k} not found`);
        stack.push(memo.get(k) as PyValue);
        break;
      }
      case 0x7d: // EMPTY_DICT
        stack.push(new Map());
        break;
      case 0x5d: // EMPTY_LIST
        stack.push([]);
        break;
      case 0x29: // EMPTY_TUPLE
        stack.push([]);
        break;
      case 0x74: // TUPLE
      case 0x6c: // LIST
        stack.push(popMark());
        break;
      case 0x64: {
        // DICT
        const d = new Map<PyValue, PyValue>();
        setItems(d, popMark());
        stack.push(d);
        break;
      }
      case 0x85: // TUPLE1
        stack.push([pop()]);
        break;
      case 0x86: {
        // TUPLE2
        const b = pop();
        stack.push([pop(), b]);
        break;
      }
      case 0x87: {
        // TUPLE3
        const c = pop();
        const b = pop();
        stack.push([pop(), b, c]);
        break;
      }
      case 0x61: {
        // APPEND
        const v = pop();
        appendItems(top(), [v]);
        break;
      }
      case 0x65: {
        // APPENDS
        const items = popMark();
        appendItems(top(), items);
        break;
      }
      case 0x73: {
        // SETITEM
        const v = pop();
        const k = pop();
        setItems(top(), [k, v]);
        break;
      }
      case 0x75: {
        // SETITEMS
        const items = popMark();
        setItems(top(), items);
        break;
      }
      case 0x4a: // BININT
        stack.push(i32());
        break;
      case 0x4b: // BININT1
        stack.push(u8());
        break;
      case 0x4d: // BININT2
        stack.push(u16());
        break;
      case 0x8a: // LONG1
        stack.push(decodeLong(bytes(u8())));
        break;
      case 0x8b: {
        // LONG4
        const n = i32();
        if (n < 0) fail('negative LONG4 length');
        stack.push(decodeLong(bytes(n)));
        break;
      }
      case 0x49: {
        // INT (protocol 0; also encodes True/False as 01/00)
        const s = line();
        if (s === '01') stack.push(true);
        else if (s === '00') stack.push(false);
        else {
          const n = Number.parseInt(s, 10);
          if (!Number.isFinite(n)) fail(`bad INT '${s}'`);
          stack.push(n);
        }
        break;
      }
      case 0x47: // BINFLOAT (big-endian)
        need(8);
        stack.push(dv.getFloat64(pos, false));
        pos += 8;
        break;
      case 0x4e: // NONE
        stack.push(null);
        break;
      case 0x88: // NEWTRUE
        stack.push(true);
        break;
      case 0x89: // NEWFALSE
        stack.push(false);
        break;
      case 0x58: // BINUNICODE
      case 0x8c: // SHORT_BINUNICODE
      case 0x8d: {
        // BINUNICODE8
        const n = op === 0x58 ? u32() : op === 0x8c ? u8() : u64();
        try {
          stack.push(utf8.decode(bytes(n)));
        } catch (e) {
          if (e instanceof WeightsError) throw e;
          fail('invalid UTF-8 in string');
        }
        break;
      }
      case 0x55: // SHORT_BINSTRING
      case 0x54: {
        // BINSTRING (py2 str; latin-1 as Python 3 does with encoding='latin1')
        const n = op === 0x55 ? u8() : i32();
        if (n < 0) fail('negative string length');
        stack.push(latin1.decode(bytes(n)));
        break;
      }
      case 0x43: // SHORT_BINBYTES
      case 0x42: // BINBYTES
      case 0x8e: {
        // BINBYTES8
        const n = op === 0x43 ? u8() : op === 0x42 ? u32() : u64();
        stack.push(bytes(n).slice());
        break;
      }
      case 0x63: {
        // GLOBAL
        const module = line();
        const name = line();
        stack.push(global(module, name));
        break;
      }
      case 0x93: {
        // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== 'string' || typeof name !== 'string') fail('STACK_GLOBAL needs two strings');
        stack.push(global(module as string, name as string));
        break;
      }
      case 0x52: {
        // REDUCE
        const args = pop();
        const fn = pop();
        try {
          stack.push(callGlobal(fn, args));
        } catch (e) {
          if (e instanceof WeightsError) e.message = `${where}: ${e.message}`;
          throw e;
        }
        break;
      }
      case 0x81: {
        // NEWOBJ: only attribute bags (argparse.Namespace) are instantiated, as plain records.
        const args = pop();
        const cls = pop();
        if (!isGlobal(cls, 'argparse Namespace')) throw new UnsafePickleError(`${where}: refusing to instantiate ${describe(cls)}`);
        if (!Array.isArray(args) || args.length) fail('Namespace with constructor arguments');
        stack.push({ kind: 'record', cls: 'argparse.Namespace', state: null });
        break;
      }
      case 0x62: {
        // BUILD: state for an OrderedDict (state_dict._metadata, ignored) or a record.
        const state = pop();
        const obj = top();
        if (obj instanceof Map) break;
        if (typeof obj === 'object' && obj !== null && !Array.isArray(obj) && !(obj instanceof Uint8Array) && obj.kind === 'record') {
          obj.state = state;
          break;
        }
        if (isTensorRef(obj)) break; // tensor subclass state from _rebuild_from_type_v2; weights do not depend on it
        throw new UnsafePickleError(`${where}: refusing BUILD on ${describe(obj)}`);
      }
      case 0x51: // BINPERSID
        stack.push(persistentLoad(pop()));
        break;
      case 0x50: // PERSID (text)
        fail('text persistent ids are not used by torch.save');
        break;
      case 0x69: // INST
      case 0x6f: // OBJ
      case 0x82: // EXT1
      case 0x83: // EXT2
      case 0x84: // EXT4
      case 0x92: // NEWOBJ_EX
        throw new UnsafePickleError(`${where}: refusing pickle opcode 0x${op.toString(16)} (object construction) at offset ${opPos}`);
      default:
        pos = opPos;
        fail(`unsupported pickle opcode 0x${op.toString(16)}`);
    }
  }
}
