// Philox4x32-10 (Salmon et al., SC'11) and the normal transform specified in docs/noise.md.
import { readFileSync } from 'node:fs';
import { DiffusionInputError } from './errors.ts';

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;
const TWO_POW_M32 = 2 ** -32;

/**
 * One Philox4x32-10 block: counter (c0..c3) and key (k0, k1) as uint32, result written to out[0..3].
 * mulhi trick: lo = imul(a, M) is exact; a·M as a double is off by at most 2^11, so
 * (a·M − lo)·2^-32 lies within 2^-21 of the high word and rounds to it exactly.
 */
export function philox4x32(c0: number, c1: number, c2: number, c3: number, k0: number, k1: number, out: Uint32Array, outOffset = 0): void {
  let x0 = c0 >>> 0;
  let x1 = c1 >>> 0;
  let x2 = c2 >>> 0;
  let x3 = c3 >>> 0;
  let key0 = k0 >>> 0;
  let key1 = k1 >>> 0;
  for (let r = 0; r < 10; r++) {
    const lo0 = Math.imul(x0, M0) >>> 0;
    const hi0 = ((x0 * M0 - lo0) * TWO_POW_M32 + 0.5) >>> 0;
    const lo1 = Math.imul(x2, M1) >>> 0;
    const hi1 = ((x2 * M1 - lo1) * TWO_POW_M32 + 0.5) >>> 0;
    x0 = (hi1 ^ x1 ^ key0) >>> 0;
    x1 = lo1;
    x2 = (hi0 ^ x3 ^ key1) >>> 0;
    x3 = lo0;
    key0 = (key0 + W0) >>> 0;
    key1 = (key1 + W1) >>> 0;
  }
  out[outOffset] = x0;
  out[outOffset + 1] = x1;
  out[outOffset + 2] = x2;
  out[outOffset + 3] = x3;
}

/** Noise streams: the counter word c3 keeps the starting latent and the per-step noise apart. */
export const STREAM_INITIAL = 0;
export const STREAM_STEP = 1;

/** Splits a uint64 seed into the Philox key words (k0 = low 32 bits, k1 = high 32 bits). */
export function seedKey(seed: bigint): [number, number] {
  if (typeof seed !== 'bigint' || seed < 0n || seed >= 1n << 64n) {
    throw new DiffusionInputError('seed', `must be an unsigned 64-bit integer, got ${String(seed)}`);
  }
  return [Number(seed & 0xffffffffn), Number(seed >> 32n)];
}

// Acklam's rational approximation of the inverse normal CDF (relative error < 1.15e-9, far below
// float32 resolution). The central region, where 95% of draws land, needs only + − × ÷, so it is
// bit-reproducible in any IEEE-754 double arithmetic; the tails add one log and one sqrt.
const A0 = -3.969683028665376e1;
const A1 = 2.209460984245205e2;
const A2 = -2.759285104469687e2;
const A3 = 1.38357751867269e2;
const A4 = -3.066479806614716e1;
const A5 = 2.506628277459239;
const B0 = -5.447609879822406e1;
const B1 = 1.615858368580409e2;
const B2 = -1.556989798598866e2;
const B3 = 6.680131188771972e1;
const B4 = -1.328068155288572e1;
const C0 = -7.784894002430293e-3;
const C1 = -3.223964580411365e-1;
const C2 = -2.400758277161838;
const C3 = -2.549732539343734;
const C4 = 4.374664141464968;
const C5 = 2.938163982698783;
const D0 = 7.784695709041462e-3;
const D1 = 3.224671290700398e-1;
const D2 = 2.445134137142996;
const D3 = 3.754408661907416;
const P_LOW = 0.02425;
const P_HIGH = 1 - P_LOW;

function tailRational(q: number): number {
  return (((((C0 * q + C1) * q + C2) * q + C3) * q + C4) * q + C5) / ((((D0 * q + D1) * q + D2) * q + D3) * q + 1);
}

function centralRational(q: number, r: number): number {
  return ((((((A0 * r + A1) * r + A2) * r + A3) * r + A4) * r + A5) * q) / (((((B0 * r + B1) * r + B2) * r + B3) * r + B4) * r + 1);
}

/** Standard normal from one uint32 word w: Φ⁻¹(p) with p = (w + 0.5)·2⁻³², in float64. */
export function normalFromWord(w: number): number {
  const p = ((w >>> 0) + 0.5) * TWO_POW_M32;
  if (p < P_LOW) return tailRational(Math.sqrt(-2 * Math.log(p)));
  // 1 − p is exact: (2^32 − w − 0.5)·2^-32.
  if (p > P_HIGH) return -tailRational(Math.sqrt(-2 * Math.log(1 - p)));
  const q = p - 0.5;
  return centralRational(q, q * q);
}

// The bulk fill runs in WebAssembly SIMD (noise.wat): Philox words four blocks at a time and the
// central rational two doubles at a time, bit-identical to philox4x32 and normalFromWord above.
const wasm = new WebAssembly.Instance(new WebAssembly.Module(readFileSync(new URL('./noise.wasm', import.meta.url))), {}).exports as {
  memory: WebAssembly.Memory;
  philox(k0: number, k1: number, c1: number, c2: number, c3: number, blocks: number, dst: number): void;
  normals(src: number, dst: number, n: number, tails: number, lowMax: number, highMin: number): number;
};

/** The largest word whose p falls below P_LOW and the smallest above P_HIGH, as normalFromWord decides. */
function tailBounds(): [number, number] {
  const side = (w: number): number => {
    const p = (w + 0.5) * TWO_POW_M32;
    return p < P_LOW ? -1 : p > P_HIGH ? 1 : 0;
  };
  let lowMax = Math.floor(P_LOW * 2 ** 32) + 2;
  while (side(lowMax) !== -1) lowMax--;
  let highMin = Math.floor(P_HIGH * 2 ** 32) - 2;
  while (side(highMin) !== 1) highMin++;
  return [lowMax, highMin];
}
const [LOW_MAX, HIGH_MIN] = tailBounds();

/** Views of the whole wasm memory, made again only when it grows (growing replaces the buffer). */
function memoryViews(): { words: Uint32Array; floats: Float32Array; ints: Int32Array } {
  const b = wasm.memory.buffer;
  return { words: new Uint32Array(b), floats: new Float32Array(b), ints: new Int32Array(b) };
}
let views = memoryViews();

/**
 * Fills out[offset .. offset+length) with standard normals (float32) of one noise stream.
 * Element e (counted from offset) is normalFromWord(word e mod 4 of the Philox4x32-10 block with
 * counter (floor(e/4), step, sampleIndex, stream) and key (k0, k1)). See docs/noise.md.
 */
export function fillNormal(
  out: Float32Array,
  offset: number,
  length: number,
  key: readonly [number, number],
  sampleIndex: number,
  step: number,
  stream: number,
): void {
  if (!(Number.isInteger(offset) && Number.isInteger(length) && offset >= 0 && length >= 0 && offset + length <= out.length)) {
    throw new DiffusionInputError('length', `range [${offset}, ${offset + length}) does not fit an array of ${out.length}`);
  }
  // Wasm memory: words, then float32 normals, then tail indices; 16 bytes per block each, with
  // the block count rounded up to the 4 the SIMD loops take at a time.
  const blocks = (length + 3) >>> 2;
  const region = ((blocks + 3) & ~3) * 16;
  if (3 * region > wasm.memory.buffer.byteLength) {
    wasm.memory.grow(Math.ceil((3 * region - wasm.memory.buffer.byteLength) / 65536));
    views = memoryViews();
  }
  wasm.philox(key[0] | 0, key[1] | 0, step | 0, sampleIndex | 0, stream | 0, blocks, 0);
  const nt = wasm.normals(0, region, length, 2 * region, LOW_MAX | 0, HIGH_MIN | 0);
  // Copied element by element: a subarray view per call would allocate on every step.
  const { words, floats, ints } = views;
  const normals = region >>> 2;
  for (let e = 0; e < length; e++) out[offset + e] = floats[normals + e];
  // The tails (about 5% of words) need log and sqrt, which WebAssembly lacks: computed here.
  const tails = (2 * region) >>> 2;
  for (let j = 0; j < nt; j++) {
    const e = ints[tails + j];
    if (e < length) out[offset + e] = normalFromWord(words[e]);
  }
}
