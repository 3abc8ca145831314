// The denoiser's per-request step cache: for each cache key (one request's group of samples) the
// block-stack residual of its last full step, which a cached step adds back instead of running
// the blocks (docs/step-cache.md). Also the policy rules that decide, per step, full or cached.
// The state is an optimisation this replica may lose at any time (evicted, expired, restarted):
// a step that finds none is computed in full, so nothing is ever wrong, only slower.
import { LRUCache } from 'lru-cache';
import { StepCachePolicy, type StepCacheOptions } from '../../shared/gen/ditpipe/v1/common.ts';
import { InvalidArgumentError } from '../../shared/errors.ts';
import type { DenoiserMetrics } from '../../shared/metrics.ts';
import { MAX_STEPS, policySettings, type StepCacheSettings } from '../../shared/step-cache.ts';

/** Bytes counted per state besides its arrays: the key, the entry and the cache's bookkeeping. */
export const STATE_OVERHEAD_BYTES = 256;

/** A state not touched for this long is dropped (its request was abandoned or went elsewhere). */
export const STATE_IDLE_TTL_MS = 60_000;

/** What a step of a request with a policy carries besides its rows. */
export interface CacheStep {
  policy: StepCacheSettings;
  key: string;
  stepIndex: number;
  numSteps: number;
  /** Everything a state's numbers depend on besides the inputs; a state only serves its own signature. */
  signature: string;
}

/** One key's state after its last full step. */
export interface CacheState {
  signature: string;
  /** Block-stack residual hN − h1 of the last full step, rows × N × D (guidance rows included). */
  residual: Float32Array;
  /** ADAPTIVE: the first block's residual r1 of the last full step (what later steps compare with). */
  r1: Float32Array | null;
  lastFull: number;
  cachedInARow: number;
}

/**
 * Checks a DenoiseRequest's step-cache fields; null when no policy is set (the fields are then
 * ignored). The policy's settings are checked as the scheduler checks a client's (policySettings);
 * errors name the field.
 */
export function validateStepCache(
  opts: StepCacheOptions | undefined,
  req: { cacheKey: string; numSteps: number; stepIndex: number },
  signatureParts: { rows: number; scale: number; channels: string },
): CacheStep | null {
  if (!opts) return null;
  if (opts.preset !== '') {
    throw new InvalidArgumentError(
      `step_cache.preset "${opts.preset}" reached the denoiser: the scheduler resolves presets into a policy`,
      {
        field: 'step_cache.preset',
      },
    );
  }
  if (opts.policy === StepCachePolicy.STEP_CACHE_POLICY_UNSPECIFIED) return null;
  const policy = policySettings(opts);
  const bad = (field: string, msg: string): never => {
    throw new InvalidArgumentError(`${field} ${msg}`, { field });
  };
  if (req.cacheKey.length < 1 || req.cacheKey.length > 256) bad('cache_key', `must have 1..256 characters, got ${req.cacheKey.length}`);
  if (req.numSteps < 1 || req.numSteps > MAX_STEPS) bad('num_steps', `must be within 1..${MAX_STEPS}, got ${req.numSteps}`);
  if (req.stepIndex >= req.numSteps) bad('step_index', `must be below num_steps (${req.numSteps}), got ${req.stepIndex}`);
  const signature = JSON.stringify([
    signatureParts.rows,
    signatureParts.scale,
    signatureParts.channels,
    policy.policy,
    policy.interval,
    policy.threshold,
    policy.warmupSteps,
    policy.maxCachedSteps,
    req.numSteps,
  ]);
  return { policy, key: req.cacheKey, stepIndex: req.stepIndex, numSteps: req.numSteps, signature };
}

/** Σ|a − b| / Σ|b|, accumulated in float64 (Infinity when b is all zeros). */
export function relativeL1(a: Float32Array, b: Float32Array): number {
  let diff = 0;
  let ref = 0;
  for (let i = 0; i < b.length; i++) {
    diff += Math.abs(a[i] - b[i]);
    ref += Math.abs(b[i]);
  }
  return ref > 0 ? diff / ref : Number.POSITIVE_INFINITY;
}

/**
 * Whether a step runs cached (head then skip) given the state its key holds (undefined: none that
 * matches) and, for ADAPTIVE, the step's own r1 from the head pass.
 */
export function decideCached(step: CacheStep, state: CacheState | undefined, r1: Float32Array): boolean {
  const { policy: p, stepIndex } = step;
  if (!state || stepIndex < p.warmupSteps || stepIndex === step.numSteps - 1) return false;
  // A step at or before the last full one is a repeat (a redelivery) or out of order: no rule applies.
  if (stepIndex <= state.lastFull) return false;
  if (p.policy === StepCachePolicy.STEP_CACHE_POLICY_INTERVAL) return stepIndex - state.lastFull < p.interval;
  if (p.maxCachedSteps !== 0 && state.cachedInARow >= p.maxCachedSteps) return false;
  return state.r1 !== null && relativeL1(r1, state.r1) < p.threshold;
}

function stateBytes(s: CacheState, key: string): number {
  return s.residual.byteLength + (s.r1?.byteLength ?? 0) + 2 * key.length + STATE_OVERHEAD_BYTES;
}

/** States by cache key within a byte budget (least recently used out first) and an idle TTL. */
export class StepCacheStore {
  private readonly lru: LRUCache<string, CacheState>;
  private readonly labels: { model: string };

  constructor(
    readonly maxBytes: number,
    private readonly metrics: DenoiserMetrics,
    model: string,
    ttlMs = STATE_IDLE_TTL_MS,
  ) {
    this.labels = { model };
    this.lru = new LRUCache<string, CacheState>({
      maxSize: maxBytes,
      sizeCalculation: stateBytes,
      ttl: ttlMs,
      // Idle, not absolute: every step of a request refreshes its state.
      updateAgeOnGet: true,
      ttlAutopurge: true,
      dispose: (_v, _k, reason) => {
        if (reason === 'evict' || reason === 'expire') metrics.stepCacheEvictions.inc(this.labels);
        // An expiry happens on a timer, outside any step: the sizes are settled after dispose returns.
        if (reason === 'expire') queueMicrotask(() => this.report());
      },
    });
    this.report();
  }

  /** The key's state if it matches `signature`; a state that does not is dropped. */
  lookup(key: string, signature: string): CacheState | undefined {
    const s = this.lru.get(key);
    if (s && s.signature !== signature) {
      this.lru.delete(key);
      this.report();
      return undefined;
    }
    return s;
  }

  /** Keeps a state (in arrays of its own); one larger than the whole budget is not kept. False if not kept. */
  store(key: string, state: CacheState): boolean {
    if (stateBytes(state, key) > this.maxBytes) this.lru.delete(key);
    else this.lru.set(key, state);
    this.report();
    return this.lru.has(key);
  }

  /** Frees a key's state after its last step (not an eviction). */
  delete(key: string): void {
    this.lru.delete(key);
    this.report();
  }

  has(key: string): boolean {
    return this.lru.has(key);
  }

  get bytes(): number {
    return this.lru.calculatedSize;
  }

  get entries(): number {
    return this.lru.size;
  }

  /** Drops every state (at close: stops the TTL timers). */
  clear(): void {
    this.lru.clear();
    this.report();
  }

  private report(): void {
    this.metrics.stepCacheBytes.set(this.labels, this.lru.calculatedSize);
    this.metrics.stepCacheEntries.set(this.labels, this.lru.size);
  }
}
