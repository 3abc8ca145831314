// Classifier-free guidance over a [cond; uncond] model output, as the original `forward_with_cfg`.
import { DiffusionInputError } from './errors.ts';

export interface GuidanceOptions {
  /** Samples N; the input holds 2N rows (N conditional, then N unconditional), or N when scale is 1. */
  readonly rows: number;
  /** Channels per model output row (C, or 2C with learned sigma). */
  readonly outChannels: number;
  /** Latent channels C (the model's in_channels). */
  readonly inChannels: number;
  /** H·W. */
  readonly plane: number;
  readonly scale: number;
  /**
   * 3 (default): guide output channels 0..2, exactly the original's `model_out[:, :3]` slice (its
   * published FID numbers depend on it; the 4th latent channel comes from the conditional pass).
   * 'all': guide all `inChannels` latent channels. Remaining channels (variance) come from the
   * conditional rows.
   */
  readonly channels?: 3 | 'all';
}

/** Number of leading output channels that get guided. */
export function guidedChannels(opts: Pick<GuidanceOptions, 'outChannels' | 'inChannels' | 'channels'>): number {
  const mode = opts.channels ?? 3;
  if (mode === 'all') return opts.inChannels;
  if (mode === 3) return Math.min(3, opts.outChannels);
  throw new DiffusionInputError('guidanceChannels', `must be 3 or 'all', got ${String(mode)}`);
}

/** Channels of a DiT's output: C (eps), or 2C when it learns sigma (eps, then the variance values). */
export function modelOutChannels(inChannels: number, learnSigma: boolean): number {
  return learnSigma ? 2 * inChannels : inChannels;
}

/** One request's rows of a guided model input: N latents at one timestep each, with their labels. */
export interface GuidedRowsSource {
  /** [N, C, H, W]. */
  readonly x: Float32Array;
  readonly t: ArrayLike<bigint>;
  readonly y: ArrayLike<number>;
  readonly n: number;
}

/**
 * Writes `src` as model input rows at row `at` of x/t/y: the N conditional rows, then (scale ≠ 1)
 * the same N latents and timesteps again with the null label `nullLabel` (the unconditional rows),
 * the [cond; uncond] layout combineGuidance reads. Returns the rows written (guidanceRows).
 */
export function packGuidedRows(
  dst: { readonly x: Float32Array; readonly t: BigInt64Array; readonly y: BigInt64Array },
  at: number,
  src: GuidedRowsSource,
  scale: number,
  nullLabel: number,
): number {
  const rowSize = src.x.length / src.n;
  const copies = guidanceRows(1, scale);
  let r = at;
  for (let k = 0; k < copies; k++) {
    dst.x.set(src.x, r * rowSize);
    for (let i = 0; i < src.n; i++) {
      dst.t[r + i] = src.t[i];
      dst.y[r + i] = BigInt(k === 0 ? src.y[i] : nullLabel);
    }
    r += src.n;
  }
  return r - at;
}

/** How many model rows a step of N samples needs: 2N with guidance, N at scale 1. */
export function guidanceRows(rows: number, scale: number): number {
  return scale === 1 ? rows : 2 * rows;
}

/**
 * guided = uncond + scale·(cond − uncond) on the guided channels, each operation rounded to float32
 * as torch does; other channels copied from the conditional rows. Returns `dst` (allocated when
 * omitted) holding N rows [outChannels, H, W]. At scale 1 the input may hold only the N conditional rows.
 */
export function combineGuidance(modelOut: Float32Array, opts: GuidanceOptions, dst?: Float32Array): Float32Array {
  const { rows, outChannels, inChannels, plane, scale } = opts;
  if (!Number.isInteger(rows) || rows < 1) throw new DiffusionInputError('rows', `must be a positive integer, got ${rows}`);
  if (!Number.isFinite(scale)) throw new DiffusionInputError('cfgScale', `must be finite, got ${scale}`);
  if (outChannels !== inChannels && outChannels !== 2 * inChannels) {
    throw new DiffusionInputError('outChannels', `is ${outChannels}; expected ${inChannels} or ${2 * inChannels}`);
  }
  const rowSize = outChannels * plane;
  const half = rows * rowSize;
  const out = dst ?? new Float32Array(half);
  if (out.length !== half) throw new DiffusionInputError('dst', `has ${out.length} elements; expected ${half}`);
  if (scale === 1 && (modelOut.length === half || modelOut.length === 2 * half)) {
    if (out !== modelOut) out.set(modelOut.subarray(0, half));
    return out;
  }
  if (modelOut.length !== 2 * half) {
    throw new DiffusionInputError(
      'modelOutput',
      `has ${modelOut.length} elements; expected ${2 * half} = 2×${rows} rows × [${outChannels}, ${plane}] (cond then uncond)`,
    );
  }
  const guided = guidedChannels(opts) * plane;
  const s = Math.fround(scale);
  for (let r = 0; r < rows; r++) {
    const co = r * rowSize;
    const uo = half + co;
    for (let i = 0; i < guided; i++) {
      const u = modelOut[uo + i];
      out[co + i] = u + Math.fround(s * Math.fround(modelOut[co + i] - u));
    }
    if (out !== modelOut) out.set(modelOut.subarray(co + guided, co + rowSize), co + guided);
  }
  return out;
}
