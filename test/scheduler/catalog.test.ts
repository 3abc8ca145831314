// The scheduler's model catalog logs what it swallows: a background refresh that failed (the
// request still gets the cached description) and a decoder that does not answer yet.
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { Catalog } from '../../services/scheduler/catalog.ts';
import { compileSchedulerConfig } from '../../services/scheduler/config.ts';
import { DecoderDefinition } from '../../shared/gen/ditpipe/v1/decoder.ts';
import { DenoiserDefinition, DenoiserInfo, DenoiseResponse } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { createLogger } from '../../shared/log.ts';
import { InProcBus } from '../../shared/transport/inproc.ts';

describe('catalog', () => {
  it('logs a failed background refresh and a missing decoder, and still answers from the cache', async () => {
    let text = '';
    const log = createLogger('catalog-test', {
      format: 'json',
      stream: new Writable({ write: (c: Buffer, _e, cb) => ((text += c.toString()), cb()) }),
    });
    const bus = new InProcBus();
    const replica = bus.connect('denoiser');
    const scheduler = bus.connect('scheduler');
    const server = await replica.serve(
      DenoiserDefinition,
      {
        denoise: () => DenoiseResponse.create({ batchRows: 1 }),
        info: () => DenoiserInfo.create({ model: 'm', vae: 'v', classNames: ['a'] }),
      },
      { scope: 'm' },
    );
    const config = compileSchedulerConfig({ models: ['m'], modelInfoTtlMs: 0, stepTimeoutMs: 200, decodeTimeoutMs: 200 });
    const catalog = new Catalog(scheduler, config, { denoiser: DenoiserDefinition, decoder: DecoderDefinition }, { log });
    try {
      const first = await catalog.get('m');
      expect(first.decoder).toBeNull();
      expect(text).toMatch(/no decoder answers for VAE \\"v\\" yet/);
      await server.stop(0);
      // Expired (TTL 0): answered from the cache while the refresh fails in the background.
      expect(await catalog.get('m')).toBe(first);
      await expect.poll(() => text, { timeout: 5_000, interval: 20 }).toMatch(/refreshing its description failed/);
      const line = text
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { level: number; model?: string; msg: string })
        .find((l) => /refreshing/.test(l.msg));
      expect(line).toMatchObject({ level: 40, model: 'm' });
    } finally {
      await scheduler.close({ graceMs: 0 });
      await replica.close({ graceMs: 0 });
    }
  });
});
