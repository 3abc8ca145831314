import { describe, expect, it } from 'vitest';
import { unpickle, type PyValue } from '../../shared/weights/pickle.ts';
import { UnsafePickleError, WeightsError } from '../../shared/weights/types.ts';

// Tiny pickle assembler: strings become raw opcode text/bytes, numbers single bytes.
function pk(...parts: (string | number | number[])[]): Uint8Array {
  const out: number[] = [];
  for (const p of parts) {
    if (typeof p === 'number') out.push(p);
    else if (Array.isArray(p)) out.push(...p);
    else for (const b of Buffer.from(p, 'latin1')) out.push(b);
  }
  return new Uint8Array(out);
}
const u32 = (n: number) => [n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >>> 24) & 0xff];
const uni = (s: string) => ['X', u32(Buffer.byteLength(s)), s] as const;
const PROTO2 = [0x80, 2];
const STOP = '.';

function run(...parts: (string | number | number[])[]): PyValue {
  return unpickle(pk(...parts), 'test.pkl');
}

describe('restricted unpickler: data opcodes', () => {
  it('dicts, lists, tuples, ints, floats, strings, bools, None, memo', () => {
    const v = run(
      PROTO2,
      '}', // EMPTY_DICT
      'q',
      0, // BINPUT 0
      '(', // MARK
      ...uni('a'),
      'K',
      7, // BININT1
      ...uni('b'),
      'M',
      [0x34, 0x12], // BININT2
      ...uni('c'),
      'J',
      u32(-5 >>> 0), // BININT
      ...uni('d'),
      'G',
      [0x3f, 0xf8, 0, 0, 0, 0, 0, 0], // BINFLOAT 1.5
      ...uni('e'),
      ']',
      '(',
      'N',
      0x88,
      0x89,
      'e', // EMPTY_LIST MARK None True False APPENDS
      ...uni('f'),
      0x8a,
      9,
      [0, 0, 0, 0, 0, 0, 0, 0, 1], // LONG1 2**64
      ...uni('g'),
      0x8a,
      1,
      [0xff], // LONG1 -1
      ...uni('h'),
      'U',
      3,
      'abc', // SHORT_BINSTRING
      ...uni('i'),
      'I01\n', // INT True (protocol 0)
      ...uni('j'),
      'I42\n',
      ...uni('k'),
      'h',
      0, // BINGET 0 (the dict itself)
      'u', // SETITEMS
      STOP,
    );
    expect(v).toBeInstanceOf(Map);
    const m = v as Map<PyValue, PyValue>;
    expect(m.get('a')).toBe(7);
    expect(m.get('b')).toBe(0x1234);
    expect(m.get('c')).toBe(-5);
    expect(m.get('d')).toBe(1.5);
    expect(m.get('e')).toEqual([null, true, false]);
    expect(m.get('f')).toBe(2n ** 64n);
    expect(m.get('g')).toBe(-1);
    expect(m.get('h')).toBe('abc');
    expect(m.get('i')).toBe(true);
    expect(m.get('j')).toBe(42);
    expect(m.get('k')).toBe(m);
  });

  it('DICT, LIST, TUPLE1-3, POP, DUP, SETITEM, APPEND', () => {
    const v = run(
      PROTO2,
      '(',
      ...uni('x'),
      'K',
      1,
      'K',
      2,
      0x86,
      'd',
      ...uni('y'),
      '(',
      'K',
      3,
      'l',
      'K',
      4,
      'a',
      's',
      'K',
      9,
      '0',
      '2',
      '0',
      STOP,
    );
    const m = v as Map<PyValue, PyValue>;
    expect(m.get('x')).toEqual([1, 2]);
    expect(m.get('y')).toEqual([3, 4]);
  });

  it('STACK_GLOBAL / MEMOIZE / FRAME (protocol 4) with an allowed global', () => {
    const v = run(
      [0x80, 4],
      0x95,
      [5, 0, 0, 0, 0, 0, 0, 0],
      0x8c,
      11,
      'collections',
      0x94,
      0x8c,
      11,
      'OrderedDict',
      0x94,
      0x93,
      0x94,
      ')',
      'R',
      STOP,
    );
    expect(v).toEqual(new Map());
  });
});

describe('restricted unpickler: refusals', () => {
  it('GLOBAL outside the allow-list names it and never resolves it', () => {
    const p = pk(PROTO2, 'cos\nsystem\n', ...uni('echo hi'), 0x85, 'R', STOP);
    expect(() => unpickle(p, 'x.pkl')).toThrow(UnsafePickleError);
    expect(() => unpickle(p, 'x.pkl')).toThrow(/refusing pickle global 'os\.system'/);
  });
  it('STACK_GLOBAL outside the allow-list', () => {
    expect(() => run([0x80, 4], 0x8c, 8, 'builtins', 0x8c, 4, 'exec', 0x93, STOP)).toThrow(/refusing pickle global 'builtins\.exec'/);
  });
  it('other dangerous globals close to the allowed ones', () => {
    expect(() => run(PROTO2, 'ctorch.storage\n_load_from_bytes\n', STOP)).toThrow(UnsafePickleError);
    expect(() => run(PROTO2, 'ctorch\nload\n', STOP)).toThrow(/torch\.load/);
    expect(() => run(PROTO2, 'ccollections\ndefaultdict\n', STOP)).toThrow(/collections\.defaultdict/);
  });
  it('INST / OBJ / EXT / NEWOBJ_EX opcodes', () => {
    expect(() => run(PROTO2, '(', 'ios\nsystem\n', STOP)).toThrow(UnsafePickleError);
    expect(() => run(PROTO2, '(', 'o', STOP)).toThrow(/refusing pickle opcode 0x6f/);
    expect(() => run(PROTO2, 0x82, 1, STOP)).toThrow(UnsafePickleError);
    expect(() => run(PROTO2, 0x92, STOP)).toThrow(UnsafePickleError);
  });
  it('NEWOBJ of anything but argparse.Namespace', () => {
    expect(() => run(PROTO2, 'ccollections\nOrderedDict\n', ')', 0x81, STOP)).toThrow(
      /refusing to instantiate global 'collections\.OrderedDict'/,
    );
  });
  it('REDUCE of an allowed non-callable (storage class, tensor type)', () => {
    expect(() => run(PROTO2, 'ctorch\nFloatStorage\n', 'K', 3, 0x85, 'R', STOP)).toThrow(/calls global 'torch\.FloatStorage'/);
    expect(() => run(PROTO2, 'ctorch\nTensor\n', ')', 'R', STOP)).toThrow(UnsafePickleError);
  });
  it('REDUCE of a non-global', () => {
    expect(() => run(PROTO2, ')', ')', 'R', STOP)).toThrow(/calls a non-global/);
  });
  it('BUILD on a plain value', () => {
    expect(() => run(PROTO2, 'K', 1, '}', 'b', STOP)).toThrow(/refusing BUILD on number/);
  });
  it('persistent ids other than storages', () => {
    expect(() => run(PROTO2, ...uni('module'), 0x85, 'Q', STOP)).toThrow(/persistent id .* refused/);
    expect(() =>
      run(PROTO2, '(', ...uni('storage'), 'ctorch\nFloatStorage\n', ...uni('../../etc/passwd'), ...uni('cpu'), 'K', 1, 't', 'Q', STOP),
    ).toThrow(/storage key .* not a plain name/);
  });
});

describe('restricted unpickler: malformed input', () => {
  it('truncated', () => {
    expect(() => run(PROTO2, 'X', u32(100), 'ab')).toThrow(/truncated pickle/);
    expect(() => run(PROTO2, '}')).toThrow(/truncated pickle/);
  });
  it('unknown opcode', () => {
    expect(() => run(PROTO2, 0xff)).toThrow(/unsupported pickle opcode 0xff/);
  });
  it('stack underflow, bad memo, odd SETITEMS', () => {
    expect(() => run(PROTO2, 'R')).toThrow(WeightsError);
    expect(() => run(PROTO2, 'h', 3, STOP)).toThrow(/memo key 3 not found/);
    expect(() => run(PROTO2, '}', '(', 'K', 1, 'u', STOP)).toThrow(/odd number of dict items/);
  });
  it('tensor rebuild with bad arguments names the problem', () => {
    const storage = ['(', ...uni('storage'), 'ctorch\nFloatStorage\n', ...uni('0'), ...uni('cpu'), 'K', 4, 't', 'Q'] as const;
    const good = run(
      PROTO2,
      'ctorch._utils\n_rebuild_tensor_v2\n',
      '(',
      ...storage,
      'K',
      0,
      'K',
      2,
      'K',
      2,
      0x86,
      'K',
      2,
      'K',
      1,
      0x86,
      0x89,
      'ccollections\nOrderedDict\n',
      ')',
      'R',
      't',
      'R',
      STOP,
    );
    expect(good).toMatchObject({ kind: 'tensor', offset: 0, shape: [2, 2], stride: [2, 1], storage: { key: '0', dtype: 'F32', numel: 4 } });
    expect(() => run(PROTO2, 'ctorch._utils\n_rebuild_tensor_v2\n', '(', 'K', 1, 'K', 0, ')', ')', 't', 'R', STOP)).toThrow(
      /first argument must be a storage/,
    );
    expect(() => run(PROTO2, 'ctorch._utils\n_rebuild_tensor_v2\n', '(', ...storage, 'K', 0, 'K', 2, 0x85, ')', 't', 'R', STOP)).toThrow(
      /size has 1 dims but stride has 0/,
    );
  });
  it('_rebuild_from_type_v2 with Parameter type unwraps; other types refused', () => {
    const storage = ['(', ...uni('storage'), 'ctorch\nHalfStorage\n', ...uni('3'), ...uni('cpu'), 'K', 2, 't', 'Q'] as const;
    const inner = ['(', ...storage, 'K', 0, 'K', 2, 0x85, 'K', 1, 0x85, 't'] as const;
    const v = run(
      PROTO2,
      'ctorch._tensor\n_rebuild_from_type_v2\n',
      '(',
      'ctorch._utils\n_rebuild_tensor\n',
      'ctorch.nn.parameter\nParameter\n',
      ...inner,
      '}',
      't',
      'R',
      STOP,
    );
    expect(v).toMatchObject({ kind: 'tensor', shape: [2], storage: { dtype: 'F16', key: '3' } });
    expect(() =>
      run(
        PROTO2,
        'ctorch._tensor\n_rebuild_from_type_v2\n',
        '(',
        'ctorch._utils\n_rebuild_tensor\n',
        'ccollections\nOrderedDict\n',
        ...inner,
        '}',
        't',
        'R',
        STOP,
      ),
    ).toThrow(UnsafePickleError);
  });
});
