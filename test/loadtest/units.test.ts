// Campaign validation (every bad field named), the remote-target guard, and the pure parts of
// the tool: Prometheus parsing and histogram quantiles, arrival schedules, splitting, ghz codes.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CampaignError, isLoopback, parseDuration, remoteHosts, validateCampaign } from '../../loadtest/campaign.ts';
import { histogramQuantile, parsePrometheusText, serverFigures, type Scrape } from '../../loadtest/prom.ts';
import { LoadtestError, runCampaign, split } from '../../loadtest/runner.ts';
import { ghzCode, ghzSummary } from '../../loadtest/stats.ts';
import { arrivalTime, drawRequest } from '../../loadtest/worker.ts';
import { prng } from '../../shared/prng.ts';
import { CachePolicy } from '../../shared/gen/ditpipe/v1/sampler.ts';

const ROOT = join(import.meta.dirname, '../..');
const good = (): Record<string, unknown> => ({
  name: 'x',
  target: { address: '127.0.0.1:50051' },
  mix: [{ model: 'm', steps: 10 }],
  phases: [
    { rate: 2, duration: '10s' },
    { concurrency: 2, requests: 5 },
  ],
});

function errorOf(input: unknown): CampaignError {
  try {
    validateCampaign(input);
  } catch (err) {
    if (err instanceof CampaignError) return err;
    throw err;
  }
  throw new Error('expected the campaign to be rejected');
}

describe('campaign validation', () => {
  it('accepts a good campaign and fills defaults', () => {
    const c = validateCampaign(good());
    expect(c.phases.map((p) => p.name)).toEqual(['phase-1', 'phase-2']);
    expect(c.phases[0].duration).toBe(10_000);
    expect(c.target.timeout).toBe(60_000);
    expect(c.maxPhaseDuration).toBe(600_000);
    expect(c.phases[0].arrivals).toBe('poisson');
    expect(c.mix[0]).toMatchObject({ weight: 1, sampler: 'ddpm', images: 1, output: 'png' });
  });

  type Doc = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
  const cases: Array<[string, (c: Doc) => void, string, RegExp]> = [
    ['zero rate', (c) => (c.phases[1] = { rate: 0, requests: 3 }), 'phases[1].rate', /must be > 0/],
    ['negative concurrency', (c) => (c.phases[1].concurrency = -1), 'phases[1].concurrency', /must be >= 1/],
    ['both loops', (c) => (c.phases[0].concurrency = 3), 'phases[0].concurrency', /not both/],
    ['no loop', (c) => (c.phases[0] = { duration: '1s' }), 'phases[0]', /rate .*or concurrency/],
    ['no bound', (c) => (c.phases[0] = { rate: 1 }), 'phases[0]', /duration, requests or both/],
    [
      'ramp without duration',
      (c) => (c.phases[1] = { rate: { from: 1, to: 5 }, requests: 4 }),
      'phases[1].rate',
      /needs the phase duration/,
    ],
    ['bad duration', (c) => (c.phases[0].duration = '10 parsecs'), 'phases[0].duration', /expected a duration/],
    ['typo', (c) => (c.phases[0].rat = 1), 'phases[0].rat', /unknown field "rat"/],
    ['missing model', (c) => delete c.mix[0].model, 'mix[0].model', /required/],
    ['steps out of range', (c) => (c.mix[0].steps = 5000), 'mix[0].steps', /<= 1000/],
    ['cfg below 1', (c) => (c.mix[0].cfg = 0.5), 'mix[0].cfg', />= 1/],
    ['bad sampler', (c) => (c.mix[0].sampler = 'euler'), 'mix[0].sampler', /ddpm/],
    ['image range', (c) => (c.mix[0].images = { min: 3, max: 2 }), 'mix[0].images.max', /max must be >= min/],
    ['empty mix', (c) => (c.mix = []), 'mix', /at least one/],
    ['bad address', (c) => (c.target.address = 'localhost'), 'target.address', /host:port/],
    ['bad percentile', (c) => (c.slo = { latency: { median: '1s' } }), 'slo.latency.median', /percentile keys/],
    ['error rate above 1', (c) => (c.slo = { errorRate: 2 }), 'slo.errorRate', /<= 1/],
    ['bad metrics url', (c) => (c.metrics = [{ name: 's', url: 'ftp://x/metrics' }]), 'metrics[0].url', /http/],
    ['duplicate phase names', (c) => ((c.phases[0].name = 'a'), (c.phases[1].name = 'a')), 'phases[1].name', /used by an earlier phase/],
  ];
  it.each(cases)('rejects %s', (_, mutate, field, msg) => {
    const c = good() as Doc;
    mutate(c);
    const err = errorOf(c);
    const issue = err.issues.find((i) => i.field === field);
    expect(issue, err.message).toBeDefined();
    expect(issue!.message).toMatch(msg);
    expect(err.message).toContain(`${field}: `);
  });

  it('reads durations with units or as seconds', () => {
    expect([
      parseDuration('250ms'),
      parseDuration('1.5s'),
      parseDuration('2m'),
      parseDuration('1h'),
      parseDuration(3),
      parseDuration('3 weeks'),
    ]).toEqual([250, 1500, 120_000, 3_600_000, 3000, null]);
  });
});

describe('the CLI with a bad campaign file', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ditpipe-lt-bad-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const run = (file: string): Promise<{ code: number | null; stderr: string }> =>
    new Promise((resolve) => {
      const child = spawn(process.execPath, [join(ROOT, 'bin/ditpipe.js'), 'loadtest', 'run', file, '--no-status'], {
        cwd: ROOT,
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('close', (code) => resolve({ code, stderr }));
    });

  it('exits 1 naming the field', async () => {
    const file = join(dir, 'bad.yaml');
    writeFileSync(
      file,
      'name: bad\ntarget: { address: "127.0.0.1:1" }\nmix: [{ model: m }]\nphases:\n  - { rate: 2, duration: 1s }\n  - { rate: 0, requests: 3 }\n',
    );
    const r = await run(file);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('phases[1].rate: must be > 0');
  });

  it('exits 1 on a file that is not YAML', async () => {
    const file = join(dir, 'broken.yaml');
    writeFileSync(file, 'name: [unclosed\n');
    const r = await run(file);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not valid YAML/);
  });
});

describe('targets', () => {
  it('knows loopback', () => {
    expect(['127.0.0.1', '127.8.9.10', '::1', '[::1]', 'localhost', 'LOCALHOST'].every(isLoopback)).toBe(true);
    expect(['10.0.0.1', '128.0.0.1', 'example.com', '::2', '0.0.0.0'].some(isLoopback)).toBe(false);
  });

  it('lists remote hosts unless the campaign allows them', () => {
    const c = validateCampaign({
      ...good(),
      target: { address: 'gpu-1.internal:50051' },
      metrics: [
        { name: 'a', url: 'http://10.1.2.3:9464/metrics' },
        { name: 'b', url: 'http://[::1]:9464/metrics' },
      ],
    });
    expect(remoteHosts(c)).toEqual(['gpu-1.internal', '10.1.2.3']);
    c.target.allowHosts = ['gpu-1.internal', '10.1.2.3'];
    expect(remoteHosts(c)).toEqual([]);
  });

  it('refuses a remote target without --allow-remote before sending anything', async () => {
    const c = validateCampaign({ ...good(), target: { address: '192.0.2.1:50051' } });
    await expect(runCampaign(c, { status: null })).rejects.toThrow(LoadtestError);
    await expect(runCampaign(c, { status: null })).rejects.toThrow(/192\.0\.2\.1.*--allow-remote/);
  });
});

describe('Prometheus text', () => {
  const text = [
    '# HELP ditpipe_images_total Images.',
    '# TYPE ditpipe_images_total counter',
    'ditpipe_images_total{model="a"} 5',
    'ditpipe_images_total{model="b",note="x\\"y, z"} 2',
    'ditpipe_request_seconds_bucket{le="0.1",outcome="OK"} 1',
    'ditpipe_request_seconds_bucket{le="1",outcome="OK"} 3',
    'ditpipe_request_seconds_bucket{le="+Inf",outcome="OK"} 4',
    'ditpipe_request_seconds_count{outcome="OK"} 4 1700000000000',
    'up 1',
  ].join('\n');

  it('parses samples, labels with escapes, +Inf and timestamps', () => {
    const s = parsePrometheusText(text);
    expect(s).toHaveLength(7);
    expect(s[1].labels).toEqual({ model: 'b', note: 'x"y, z' });
    expect(s[4].labels.le).toBe('+Inf');
    expect(s[5].value).toBe(4);
    expect(() => parsePrometheusText('good 1\nbad{ 2')).toThrow(/line 2/);
  });

  it('computes quantiles like histogram_quantile', () => {
    const b = [
      { le: 0.1, count: 1 },
      { le: 1, count: 3 },
      { le: Infinity, count: 4 },
    ];
    expect(histogramQuantile(0.5, b)).toBeCloseTo(0.1 + 0.9 * 0.5, 10);
    expect(histogramQuantile(0.25, b)).toBeCloseTo(0.1, 10);
    expect(histogramQuantile(0.99, b)).toBe(1);
    expect(histogramQuantile(0.5, [])).toBeNull();
  });

  it('turns two scrapes into phase figures (counter resets count from zero)', () => {
    const at = (t: string): Scrape => ({ endpoint: 'e', url: 'u', at: 0, samples: parsePrometheusText(t) });
    const before = at(
      'ditpipe_images_total 10\nditpipe_sampling_gflops_total 100\nditpipe_request_seconds_count{outcome="OK"} 5\nditpipe_requests_rejected_total{reason="invalid_argument"} 1\nditpipe_denoiser_redelivered_steps_total{model="m"} 7\nditpipe_decoder_redelivered_decodes_total{model="v"} 1',
    );
    const after = at(
      'ditpipe_images_total 14\nditpipe_sampling_gflops_total 300\nditpipe_request_seconds_count{outcome="OK"} 8\nditpipe_requests_rejected_total{reason="invalid_argument"} 2\nditpipe_denoiser_redelivered_steps_total{model="m"} 2\nditpipe_decoder_redelivered_decodes_total{model="v"} 4',
    );
    const f = serverFigures([before], [after], 2);
    expect(f.images).toBe(4);
    expect(f.requests).toBe(4);
    expect(f.samplingTflopsPerSecond).toBeCloseTo(0.1, 12);
    expect(f.gflopsPerImage).toBe(50);
    // A counter that went down was reset (a restarted replica): it counts from zero.
    expect(f.redelivered).toEqual({ denoiser: 2, decoder: 3 });
  });
});

describe('arrivals and the mix', () => {
  it('places uniform arrivals of a constant and a ramped rate', () => {
    expect([0, 1, 2, 3].map((u) => arrivalTime(u, 4, 4, 10_000))).toEqual([0, 250, 500, 750]);
    // Ramp 0 → 10/s over 10 s: Λ(t) = t²/2, so the 50th arrival is at t = 10 s.
    expect(arrivalTime(50, 0, 10, 10_000)).toBeCloseTo(10_000, 6);
    expect(arrivalTime(8, 0, 10, 10_000)).toBeCloseTo(4_000, 6);
    // Ramp down 10 → 0: total intensity 50; beyond it no arrival exists.
    expect(arrivalTime(60, 10, 0, 10_000)).toBe(Infinity);
  });

  it('splits counts in proportion, summing exactly', () => {
    expect(split(10, [1, 1, 1])).toEqual([4, 3, 3]);
    expect(split(5, [3, 0, 1])).toEqual([4, 0, 1]);
    expect(split(0, [1, 1])).toEqual([0, 0]);
  });

  it('draws requests by weight with reproducible classes', () => {
    const mix = validateCampaign({
      ...good(),
      mix: [
        { model: 'm', weight: 3, images: 2, classes: [1, 'Sandal'] },
        { model: 'm', weight: 1, classes: { 7: 1 }, cfg: 2, output: 'latent' },
      ],
    }).mix;
    const rand = prng(5);
    const counts = [0, 0];
    for (let i = 0; i < 4000; i++) counts[drawRequest(mix, { m: 10 }, rand).mix]++;
    expect(counts[0] / 4000).toBeGreaterThan(0.7);
    expect(counts[0] / 4000).toBeLessThan(0.8);
    const a = Array.from({ length: 5 }, (_, i) => drawRequest(mix, { m: 10 }, prng(i)).req);
    const b = Array.from({ length: 5 }, (_, i) => drawRequest(mix, { m: 10 }, prng(i)).req);
    expect(a).toEqual(b);
    const r = drawRequest([mix[1]], { m: 10 }, rand).req;
    expect(r).toMatchObject({ classLabels: [{ index: 7 }], cfgScale: 2, outputFormat: 2, cachePolicy: CachePolicy.CACHE_POLICY_BYPASS });
    const labels = new Set(Array.from({ length: 50 }, () => JSON.stringify(drawRequest([mix[0]], { m: 10 }, rand).req.classLabels![0])));
    expect(labels).toEqual(new Set(['{"index":1}', '{"name":"Sandal"}']));
  });

  it('writes ghz code names and summary units', () => {
    expect(['OK', 'RESOURCE_EXHAUSTED', 'CANCELLED', 'DEADLINE_EXCEEDED'].map(ghzCode)).toEqual([
      'OK',
      'ResourceExhausted',
      'Canceled',
      'DeadlineExceeded',
    ]);
    const r = (lat: number, code = 'OK') => ({
      intended: 0,
      sent: 0,
      end: lat,
      code,
      images: 1,
      mix: 0,
      error: code === 'OK' ? undefined : 'boom',
    });
    const s = ghzSummary([r(10), r(20), r(30, 'UNAVAILABLE')], 1000, new Date(0));
    expect(s).toMatchObject({
      count: 3,
      total: 1e9,
      average: 20e6,
      fastest: 10e6,
      slowest: 30e6,
      rps: 3,
      statusCodeDistribution: { OK: 2, Unavailable: 1 },
      errorDistribution: { 'rpc error: code = Unavailable desc = boom': 1 },
    });
    expect(s.histogram).toHaveLength(10);
    expect(s.histogram[9]).toMatchObject({ mark: 0.03, count: 1 });
  });
});

describe('shipped campaigns', () => {
  it.each(['smoke.yaml', 'scale-sim.yaml'])('%s is valid and loopback-only', async (f) => {
    const { loadCampaign } = await import('../../loadtest/campaign.ts');
    const c = loadCampaign(join(ROOT, 'loadtest/campaigns', f));
    expect(remoteHosts(c)).toEqual([]);
    expect(c.phases.length).toBeGreaterThan(0);
  });
});
