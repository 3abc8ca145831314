// The step-cache settings a request may ask for: presets, explicit policies, and errors that name
// the field (shared/step-cache.ts; the gRPC and HTTP APIs both go through it).
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../../shared/errors.ts';
import { StepCacheOptions, StepCachePolicy } from '../../shared/gen/ditpipe/v1/common.ts';
import { describeStepCache, resolveStepCache, STEP_CACHE_PRESETS, STEP_CACHE_PRESET_NAMES } from '../../shared/step-cache.ts';
import { httpParam } from '../../services/scheduler/http/errors.ts';

const opts = (o: Parameters<typeof StepCacheOptions.fromPartial>[0]): StepCacheOptions => StepCacheOptions.fromPartial(o);

function fieldOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgumentError);
    return (err as InvalidArgumentError).field;
  }
  throw new Error('expected an INVALID_ARGUMENT');
}

describe('resolveStepCache', () => {
  it('is null when unset or empty: default requests keep the original numerics', () => {
    expect(resolveStepCache(undefined)).toBeNull();
    expect(resolveStepCache(opts({}))).toBeNull();
    expect(describeStepCache(null)).toBe('none');
  });

  it('resolves every preset to an explicit policy with no preset name left', () => {
    expect(STEP_CACHE_PRESET_NAMES.length).toBeGreaterThanOrEqual(3);
    for (const name of STEP_CACHE_PRESET_NAMES) {
      const s = resolveStepCache(opts({ preset: name }))!;
      expect(s).toEqual(STEP_CACHE_PRESETS[name]);
      expect(s.preset).toBe('');
      expect(s.policy).not.toBe(StepCachePolicy.STEP_CACHE_POLICY_UNSPECIFIED);
    }
    const kinds = new Set(STEP_CACHE_PRESET_NAMES.map((n) => STEP_CACHE_PRESETS[n].policy));
    expect(kinds).toEqual(new Set([StepCachePolicy.STEP_CACHE_POLICY_INTERVAL, StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE]));
  });

  it('takes explicit interval and adaptive policies', () => {
    expect(resolveStepCache(opts({ policy: StepCachePolicy.STEP_CACHE_POLICY_INTERVAL, interval: 4, warmupSteps: 3 }))).toEqual({
      preset: '',
      policy: StepCachePolicy.STEP_CACHE_POLICY_INTERVAL,
      interval: 4,
      threshold: 0,
      warmupSteps: 3,
      maxCachedSteps: 0,
    });
    const a = resolveStepCache(opts({ policy: StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE, threshold: 0.05, maxCachedSteps: 3 }))!;
    expect(describeStepCache(a)).toBe('adaptive:0.05:w0:m3');
  });

  it('names the field of every bad setting', () => {
    const I = StepCachePolicy.STEP_CACHE_POLICY_INTERVAL;
    const A = StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE;
    const cases: Array<[Parameters<typeof opts>[0], string]> = [
      [{ preset: 'turbo' }, 'step_cache.preset'],
      [{ preset: 'interval-2', interval: 5 }, 'step_cache.interval'],
      [{ preset: 'interval-2', policy: I }, 'step_cache.policy'],
      [{ interval: 2 }, 'step_cache.policy'],
      [{ policy: 7 as StepCachePolicy }, 'step_cache.policy'],
      [{ policy: I }, 'step_cache.interval'],
      [{ policy: I, interval: 1001 }, 'step_cache.interval'],
      [{ policy: I, interval: 2, threshold: 0.1 }, 'step_cache.threshold'],
      [{ policy: I, interval: 2, warmupSteps: 5000 }, 'step_cache.warmup_steps'],
      [{ policy: A }, 'step_cache.threshold'],
      [{ policy: A, threshold: Number.NaN }, 'step_cache.threshold'],
      [{ policy: A, threshold: 11 }, 'step_cache.threshold'],
      [{ policy: A, threshold: 0.1, interval: 2 }, 'step_cache.interval'],
      [{ policy: A, threshold: 0.1, maxCachedSteps: 2000 }, 'step_cache.max_cached_steps'],
    ];
    for (const [o, field] of cases)
      expect(
        fieldOf(() => resolveStepCache(opts(o))),
        JSON.stringify(o),
      ).toBe(field);
  });

  it('HTTP spells the fields inside the ditpipe object', () => {
    expect(httpParam('step_cache.threshold')).toBe('ditpipe.step_cache.threshold');
    expect(httpParam('step_cache')).toBe('ditpipe.step_cache');
  });
});
