// The sampler registry is the one list of samplers: the proto enum, the scheduler's defaults and
// checks, both CLIs, the HTTP API, the load-test schema and the README follow it, and every
// registered sampler runs through a real (in-process) pipeline.
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { command as generateCommand } from '../../cli/generate.ts';
import { command as sampleCommand } from '../../cli/sample.ts';
import { validateCampaign } from '../../loadtest/campaign.ts';
import { drawRequest } from '../../loadtest/worker.ts';
import { compileSchedulerConfig } from '../../services/scheduler/config.ts';
import { parseImagesRequest, toGenerateRequest } from '../../services/scheduler/http/openai.ts';
import { DEFAULT_SAMPLER, SAMPLER_NAMES, SAMPLERS } from '../../shared/diffusion/index.ts';
import { OutputFormat, SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { kindOfSampler, samplerOfKind } from '../../shared/sampler-kinds.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

const ROOT = resolve(import.meta.dirname, '../..');

describe('sampler registry', () => {
  it('agrees with the proto enum both ways', () => {
    const kinds = Object.entries(SamplerKind as unknown as Record<string, number | string>).filter(
      (e): e is [string, number] => typeof e[1] === 'number' && e[1] > 0,
    );
    expect(kinds.map(([name]) => name).sort()).toEqual(SAMPLERS.map((s) => s.protoKind).sort());
    for (const s of SAMPLERS) expect(samplerOfKind(kindOfSampler(s.name))?.name).toBe(s.name);
    expect(samplerOfKind(SamplerKind.SAMPLER_KIND_UNSPECIFIED)?.name).toBe(DEFAULT_SAMPLER);
    expect(samplerOfKind(99 as SamplerKind)).toBeUndefined();
    expect(SAMPLER_NAMES).toContain('euler-a');
  });

  it("gives the scheduler its default steps, and a partial defaultSteps keeps the others' defaults", () => {
    const c = compileSchedulerConfig({ models: ['m'] });
    expect(c.defaultSteps).toEqual(Object.fromEntries(SAMPLERS.map((s) => [s.name, s.defaultSteps])));
    expect(compileSchedulerConfig({ models: ['m'], defaultSteps: { ddim: 7 } }).defaultSteps).toMatchObject({
      ddim: 7,
      ddpm: 250,
      'euler-a': 30,
    });
  });

  it('gives both CLIs their --sampler choices', () => {
    for (const cmd of [generateCommand, sampleCommand]) {
      const opt = cmd.options.find((o) => o.long === '--sampler');
      expect(opt?.argChoices, cmd.name()).toEqual([...SAMPLER_NAMES]);
      expect(opt?.defaultValue, cmd.name()).toBe(DEFAULT_SAMPLER);
    }
  });

  it('gives the HTTP API and the load-test schema their sampler names', () => {
    const config = compileSchedulerConfig({ models: [DIT_NAME] });
    for (const s of SAMPLERS) {
      const { request } = toGenerateRequest(parseImagesRequest({ prompt: '1', ditpipe: { sampler: s.name } }), config);
      expect(request.sampler, s.name).toBe(kindOfSampler(s.name));
      const c = validateCampaign({
        name: 'x',
        target: { address: '127.0.0.1:1' },
        mix: [{ model: 'm', sampler: s.name }],
        phases: [{ rate: 1, requests: 1 }],
      });
      expect(drawRequest(c.mix, { m: 10 }, () => 0.5).req.sampler, s.name).toBe(kindOfSampler(s.name));
    }
  });

  it('is what the README lists for the HTTP API', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const row = readme.split('\n').find((l) => l.startsWith('  | `sampler` |'));
    expect(row).toBeDefined();
    expect([...row!.matchAll(/`"([a-z-]+)"`/g)].map((m) => m[1])).toEqual([...SAMPLER_NAMES]);
  });
});

describe('every registered sampler through the pipeline', () => {
  let p: Pipeline;
  beforeAll(async () => {
    p = await startPipeline({ transport: { kind: 'inproc' } });
  });
  afterAll(async () => {
    await p?.stop();
  });

  it.each(SAMPLERS.map((s) => s.name))('%s: finite latents, the same for the same seed', async (name) => {
    const req = {
      model: DIT_NAME,
      classLabels: [{ index: 2 }, { index: 5 }],
      numSteps: 6,
      sampler: kindOfSampler(name),
      seed: 77n,
      outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
    };
    const a = await p.api.generate(req);
    const b = await p.api.generate(req);
    expect(a.images).toHaveLength(2);
    for (let i = 0; i < 2; i++) {
      const la = a.images[i].latent!.data;
      expect(Buffer.from(la).equals(Buffer.from(b.images[i].latent!.data))).toBe(true);
      const f = new Float32Array(la.buffer.slice(la.byteOffset, la.byteOffset + la.byteLength));
      expect(f.length).toBeGreaterThan(0);
      expect(f.every(Number.isFinite)).toBe(true);
    }
  });
});
