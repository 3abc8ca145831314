// Service flags take their --help defaults from the config schemas and pass on only what the user
// set, so compile*Config is the one place defaults are filled.
import { Command, Option } from 'commander';
import { describe, expect, it } from 'vitest';
import { repeatCacheOption } from '../../cli/common.ts';
import { userSet } from '../../cli/config-flags.ts';
import { compileSchedulerConfig, schedulerConfigDefault } from '../../services/scheduler/config.ts';
import { helpSpec } from '../helpers/cli-help.ts';

function cmd(): Command {
  return new Command('x')
    .exitOverride()
    .addOption(
      new Option('--max-images <n>').env('TEST_MAX_IMAGES').default(schedulerConfigDefault('maxImagesPerRequest')).argParser(Number),
    );
}

describe('service flags and config defaults', () => {
  it('userSet is undefined for a flag left at its --help default, the value when given on the command line or in the environment', () => {
    const a = cmd().parse([], { from: 'user' });
    expect(a.opts().maxImages).toBe(64);
    expect(userSet(a, a.opts(), 'maxImages')).toBeUndefined();
    const b = cmd().parse(['--max-images', '7'], { from: 'user' });
    expect(userSet(b, b.opts(), 'maxImages')).toBe(7);
    process.env.TEST_MAX_IMAGES = '9';
    try {
      const c = cmd().parse([], { from: 'user' });
      expect(userSet(c, c.opts(), 'maxImages')).toBe(9);
    } finally {
      delete process.env.TEST_MAX_IMAGES;
    }
  });

  it("ditpipe scheduler --help shows the schema's defaults, which compileSchedulerConfig fills in", async () => {
    const spec = await helpSpec(['scheduler']);
    const full = compileSchedulerConfig({ models: ['m'] });
    expect(spec.options.get('--max-samples-in-flight')?.default).toBe(String(full.maxSamplesInFlight));
    expect(spec.options.get('--max-images-per-request')?.default).toBe(String(full.maxImagesPerRequest));
    expect(spec.options.get('--step-timeout')?.default).toBe(String(full.stepTimeoutMs));
    expect(spec.options.get('--default-cfg')?.default).toBe(String(full.defaultCfgScale));
    expect(spec.options.get('--repeat-cache-mib')).toMatchObject({ default: String(full.repeatCacheMiB), env: 'DITPIPE_REPEAT_CACHE_MIB' });
    expect(() => schedulerConfigDefault('models')).toThrow(/no default/);
  });

  it('--repeat-cache-mib is on the scheduler and the all-in-one start, takes fractions and 0 (off), refuses the rest naming the flag', async () => {
    expect((await helpSpec(['start'])).options.get('--repeat-cache-mib')).toMatchObject({
      default: String(schedulerConfigDefault('repeatCacheMiB')),
      env: 'DITPIPE_REPEAT_CACHE_MIB',
    });
    const parse = (...args: string[]): Command =>
      new Command('x').exitOverride().addOption(repeatCacheOption()).parse(args, { from: 'user' });
    expect(parse('--repeat-cache-mib', '0').opts().repeatCacheMib).toBe(0);
    expect(parse('--repeat-cache-mib', '0.5').opts().repeatCacheMib).toBe(0.5);
    for (const bad of ['-1', 'lots', '1e9']) {
      expect(() => parse('--repeat-cache-mib', bad), bad).toThrow(/--repeat-cache-mib must be a number within 0\.\.1048576/);
    }
    expect(compileSchedulerConfig({ models: ['m'], repeatCacheMiB: 0 }).repeatCacheMiB).toBe(0);
    expect(() => compileSchedulerConfig({ models: ['m'], repeatCacheMiB: -1 })).toThrow(/repeatCacheMiB/);
  });
});
