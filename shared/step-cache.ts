// A request's step-cache settings (GenerateRequest.step_cache): named presets, and the check of
// what a client wrote, resolved into the explicit policy the denoisers receive. The denoiser holds
// the cache state and decides each step (services/denoiser); see docs/step-cache.md. The CLI and the
// scheduler share the preset names from here.
import { InvalidArgumentError } from './errors.ts';
import { StepCachePolicy, type StepCacheOptions } from './gen/ditpipe/v1/common.ts';

/** A resolved setting: a policy and its parameters, no preset. */
export type StepCacheSettings = Omit<StepCacheOptions, 'preset'> & { preset: '' };

function settings(s: Partial<StepCacheSettings> & { policy: StepCachePolicy }): StepCacheSettings {
  return { preset: '', interval: 0, threshold: 0, warmupSteps: 0, maxCachedSteps: 0, ...s };
}

/**
 * The named presets. Chosen from the Fashion-MNIST measurements of BENCHMARKS.md §8 (quality
 * against the uncached run and against fewer steps at the same compute).
 */
export const STEP_CACHE_PRESETS: Readonly<Record<string, StepCacheSettings>> = Object.freeze({
  /** FORA n=2: every other step full. */
  'interval-2': settings({ policy: StepCachePolicy.STEP_CACHE_POLICY_INTERVAL, interval: 2, warmupSteps: 2 }),
  /** FORA n=3: one full step in three. */
  'interval-3': settings({ policy: StepCachePolicy.STEP_CACHE_POLICY_INTERVAL, interval: 3, warmupSteps: 2 }),
  /** FBCache-like: cached while the first block's residual changes by less than 10 %, at most 2 in a row. */
  adaptive: settings({ policy: StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE, threshold: 0.1, warmupSteps: 2, maxCachedSteps: 2 }),
});

export const STEP_CACHE_PRESET_NAMES = Object.keys(STEP_CACHE_PRESETS);

/** Most steps a sampling loop runs, and so the most any step-cache count can usefully be. */
export const MAX_STEPS = 1000;

function checkRange(field: string, v: number, lo: number, hi: number): void {
  if (!(Number.isInteger(v) && v >= lo && v <= hi)) {
    throw new InvalidArgumentError(`step_cache.${field} must be an integer within ${lo}..${hi}, got ${v}`, {
      field: `step_cache.${field}`,
    });
  }
}

/**
 * The settings a request asked for, resolved and checked; null for none (unset, or neither a
 * preset nor a policy). Errors name the field (`step_cache.<field>`).
 */
export function resolveStepCache(opts: StepCacheOptions | undefined): StepCacheSettings | null {
  if (!opts) return null;
  const { preset, policy, interval, threshold, warmupSteps, maxCachedSteps } = opts;
  if (preset !== '') {
    const found = Object.hasOwn(STEP_CACHE_PRESETS, preset) ? STEP_CACHE_PRESETS[preset] : undefined;
    if (!found) {
      throw new InvalidArgumentError(
        `step_cache.preset: unknown preset "${preset.slice(0, 64)}" (known: ${STEP_CACHE_PRESET_NAMES.join(', ')})`,
        { field: 'step_cache.preset' },
      );
    }
    const extra = (
      [
        ['policy', policy !== StepCachePolicy.STEP_CACHE_POLICY_UNSPECIFIED],
        ['interval', interval !== 0],
        ['threshold', threshold !== 0],
        ['warmup_steps', warmupSteps !== 0],
        ['max_cached_steps', maxCachedSteps !== 0],
      ] as const
    ).find(([, set]) => set);
    if (extra) {
      throw new InvalidArgumentError(`step_cache.${extra[0]}: a preset sets it; name a preset or set a policy, not both`, {
        field: `step_cache.${extra[0]}`,
      });
    }
    return found;
  }
  checkRange('warmup_steps', warmupSteps, 0, MAX_STEPS);
  if (policy === StepCachePolicy.STEP_CACHE_POLICY_UNSPECIFIED) {
    if (interval !== 0 || threshold !== 0 || maxCachedSteps !== 0 || warmupSteps !== 0) {
      throw new InvalidArgumentError('step_cache.policy: set a policy (or a preset) for these settings to apply', {
        field: 'step_cache.policy',
      });
    }
    return null;
  }
  // A client's setting the policy does not read is a mistake worth saying (the denoiser ignores them).
  const unread =
    policy === StepCachePolicy.STEP_CACHE_POLICY_INTERVAL
      ? (
          [
            ['threshold', threshold],
            ['max_cached_steps', maxCachedSteps],
          ] as const
        ).find(([, v]) => v !== 0)
      : policy === StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE && interval !== 0
        ? (['interval', interval] as const)
        : undefined;
  if (unread) {
    const reader = policy === StepCachePolicy.STEP_CACHE_POLICY_INTERVAL ? 'adaptive' : 'interval';
    throw new InvalidArgumentError(`step_cache.${unread[0]}: only the ${reader} policy reads it`, { field: `step_cache.${unread[0]}` });
  }
  return policySettings(opts);
}

/**
 * The settings of an explicit policy (INTERVAL or ADAPTIVE), checked and normalised: the fields the
 * policy does not read are 0, so two equal policies compare equal. Errors name the field
 * (`step_cache.<field>`). The scheduler checks a client's request with it, and the denoiser
 * each step it receives.
 */
export function policySettings(opts: StepCacheOptions): StepCacheSettings {
  const { policy, interval, threshold, warmupSteps, maxCachedSteps } = opts;
  if (policy !== StepCachePolicy.STEP_CACHE_POLICY_INTERVAL && policy !== StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE) {
    throw new InvalidArgumentError(`step_cache.policy: unknown value ${String(policy)}`, { field: 'step_cache.policy' });
  }
  checkRange('warmup_steps', warmupSteps, 0, MAX_STEPS);
  checkRange('max_cached_steps', maxCachedSteps, 0, MAX_STEPS);
  if (policy === StepCachePolicy.STEP_CACHE_POLICY_INTERVAL) {
    checkRange('interval', interval, 1, MAX_STEPS);
    return settings({ policy, interval, warmupSteps });
  }
  if (!(Number.isFinite(threshold) && threshold > 0 && threshold <= 10)) {
    throw new InvalidArgumentError(`step_cache.threshold must be finite, > 0 and ≤ 10, got ${threshold}`, {
      field: 'step_cache.threshold',
    });
  }
  return settings({ policy, threshold, warmupSteps, maxCachedSteps });
}

/** A short, stable description for logs and the repeat cache key, e.g. "interval:2:w2" or "adaptive:0.1:w2:m2". */
export function describeStepCache(s: StepCacheSettings | null): string {
  if (!s) return 'none';
  if (s.policy === StepCachePolicy.STEP_CACHE_POLICY_INTERVAL) return `interval:${s.interval}:w${s.warmupSteps}`;
  return `adaptive:${s.threshold}:w${s.warmupSteps}:m${s.maxCachedSteps}`;
}
