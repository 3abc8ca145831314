// Load-test campaigns against the real pipeline (tiny golden DiT/VAE, real nats-server, real gRPC):
// the report's counts equal the scheduler's own counters, an impossible SLO fails the CLI run, and
// the HTML report renders in headless Chromium without console errors.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { freePorts } from '../../cli/ports.ts';
import { validateCampaign, type CampaignInput } from '../../loadtest/campaign.ts';
import { writeReport } from '../../loadtest/report.ts';
import { runCampaign, type Report } from '../../loadtest/runner.ts';
import { serveMetrics } from '../../shared/metrics.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { assertNoNatsServersRunning, startNatsServer, type NatsServerHandle } from '../helpers/nats.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

const ROOT = join(import.meta.dirname, '../..');

function sumOf(text: string, name: string, filter: (line: string) => boolean = () => true): number {
  return text
    .split('\n')
    .filter((l) => l.startsWith(name) && (l[name.length] === ' ' || l[name.length] === '{') && filter(l))
    .reduce((s, l) => s + Number(l.split(' ').pop()), 0);
}

function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [join(ROOT, 'bin/ditpipe.js'), ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 90_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe('loadtest against the real pipeline over NATS', () => {
  let nats: NatsServerHandle;
  let p: Pipeline;
  let metrics: Awaited<ReturnType<typeof serveMetrics>>;
  let dir: string;
  let report: Report;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ditpipe-loadtest-'));
    nats = await startNatsServer();
    // Images per request capped at 2 so the mix's 3-image entry is refused: errors the server counts too.
    p = await startPipeline({ transport: { kind: 'nats', url: nats.url }, scheduler: { maxImagesPerRequest: 2, maxSamplesInFlight: 16 } });
    metrics = await serveMetrics([p.schedulerMetrics.registry, ...p.denoiserMetrics.map((m) => m.registry)], 0, '127.0.0.1');
  });
  afterAll(async () => {
    await metrics?.close();
    await p?.stop();
    await nats?.stop();
    assertNoNatsServersRunning();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const campaign = (over: Partial<CampaignInput> = {}): CampaignInput => ({
    name: 'tiny',
    seed: 7,
    target: { address: p.address, timeout: '60s' },
    workers: 2,
    warmup: { requests: 1 },
    mix: [
      { weight: 3, model: DIT_NAME, steps: 3, sampler: 'ddim', cfg: 4, images: { min: 1, max: 2 }, classes: [3, 'seven'] },
      { weight: 1, model: DIT_NAME, steps: 2, sampler: 'ddpm', cfg: 1, images: 1, classes: { 1: 1, two: 2 }, output: 'latent' },
      { weight: 1, model: DIT_NAME, steps: 2, images: 3 },
    ],
    phases: [
      { name: 'open', rate: 6, arrivals: 'uniform', requests: 6, duration: '20s' },
      { name: 'closed', concurrency: 2, requests: 5, duration: '20s' },
    ],
    metrics: [{ name: 'pipeline', url: `http://127.0.0.1:${metrics.port}/metrics` }],
    ...over,
  });

  it('reports request, image and error counts equal to the server-side counters', async () => {
    const text0 = await p.schedulerMetrics.registry.metrics();
    report = await runCampaign(validateCampaign(campaign()), { status: null });
    const text1 = await p.schedulerMetrics.registry.metrics();
    const d = (name: string, f?: (l: string) => boolean): number => sumOf(text1, name, f) - sumOf(text0, name, f);

    expect(report.phases.map((x) => x.count)).toEqual([6, 5]);
    expect(report.warmup?.count).toBe(1);
    const clientRequests = report.count + report.warmup!.count;
    const clientErrors = report.errors + report.warmup!.errors;
    const clientImages = report.images + report.warmup!.images;
    expect(clientRequests).toBe(d('ditpipe_request_seconds_count') + d('ditpipe_requests_rejected_total'));
    expect(clientImages).toBe(d('ditpipe_images_total'));
    expect(clientErrors).toBe(
      d('ditpipe_requests_rejected_total') + d('ditpipe_request_seconds_count', (l) => !l.includes('outcome="OK"')),
    );
    expect(report.errors).toBeGreaterThan(0); // the 3-image entry was drawn and refused
    expect(Object.keys(report.statusCodeDistribution).sort()).toContain('OK');
    expect(
      report.statusCodeDistribution.OK +
        (report.statusCodeDistribution.InvalidArgument ?? 0) +
        (report.statusCodeDistribution.ResourceExhausted ?? 0),
    ).toBe(report.count);

    for (const ph of report.phases) {
      // Scraped before/after each phase: the server saw exactly this phase's requests.
      expect(ph.server!.requests).toBe(ph.count);
      expect(ph.server!.images).toBe(ph.images);
      expect(ph.server!.requestsByOutcome.OK ?? 0).toBe(ph.ok);
      expect(ph.server!.samplingGflops).toBeGreaterThan(0);
      expect(ph.server!.gflopsPerImage).toBeGreaterThan(0);
      expect(ph.server!.denoiserMeanBatchRows).toBeGreaterThanOrEqual(1);
      expect(ph.images).toBeGreaterThan(0);
      expect(ph.timeToAcceptedMs!.p50).toBeLessThanOrEqual(ph.timeToFirstStepMs!.p50);
      expect(ph.timeToFirstStepMs!.p99).toBeLessThanOrEqual(ph.latencyMs!.p99 + 1);
      expect(ph.latencyDistribution.map((x) => x.percentage)).toEqual([10, 25, 50, 75, 90, 95, 99, 99.9]);
      expect(ph.histogram.reduce((s, b) => s + b.count, 0)).toBe(ph.count);
      expect(ph.tool.workerEventLoopUtilization).toHaveLength(2);
    }
    expect(report.phases[0].loop).toBe('open');
    expect(report.phases[1].loop).toBe('closed');
    expect(report.tool_cpu.cpuMs).toBeGreaterThan(0);
    expect(report.fastest).toBeLessThanOrEqual(report.average);
    expect(report.average).toBeLessThanOrEqual(report.slowest);
  });

  it('writes a self-contained HTML report that renders in headless Chromium without console errors', async () => {
    const chromium = '/usr/bin/chromium';
    expect(existsSync(chromium), 'headless Chromium (Debian package chromium) is needed for this test').toBe(true);
    const html = join(dir, 'report.html');
    writeReport(report, { html, json: join(dir, 'report.json') });
    const text = readFileSync(html, 'utf8');
    expect(text).not.toMatch(/(src|href)\s*=\s*["']?(https?:)?\/\//i);
    const { chromium: pw } = await import('playwright-core');
    const browser = await pw.launch({
      executablePath: chromium,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    try {
      const page = await browser.newPage();
      const problems: string[] = [];
      const requests: string[] = [];
      page.on('console', (m) => m.type() === 'error' && problems.push(m.text()));
      page.on('pageerror', (e) => problems.push(e.message));
      page.on('request', (r) => !r.url().startsWith('file:') && requests.push(r.url()));
      await page.goto(`file://${html}`);
      const charts = await page.$$eval('svg.chart', (els) =>
        els.map((e) => ({
          id: e.getAttribute('data-chart'),
          paths: e.querySelectorAll('path.series').length,
          bars: e.querySelectorAll('rect.bar').length,
          w: e.getBoundingClientRect().width,
        })),
      );
      expect(problems).toEqual([]);
      expect(requests).toEqual([]);
      const byId = new Map(charts.map((c) => [c.id, c]));
      expect(byId.get('latency-over-time')?.paths).toBe(2);
      expect(byId.get('throughput-over-time')?.paths).toBe(3);
      for (let i = 0; i < report.phases.length; i++) expect(byId.get(`latency-histogram-${i}`)?.bars).toBeGreaterThan(0);
      expect(charts.every((c) => c.w > 100)).toBe(true);
      // Readable: no tick, legend or phase label overlaps another text in its chart.
      const overlaps = await page.$$eval('svg.chart', (els) =>
        els.flatMap((svg) => {
          const boxes = [...svg.querySelectorAll('text')].map((t) => ({ text: t.textContent ?? '', r: t.getBoundingClientRect() }));
          const hits: string[] = [];
          for (let i = 0; i < boxes.length; i++)
            for (let j = i + 1; j < boxes.length; j++) {
              const a = boxes[i].r;
              const b = boxes[j].r;
              if (a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5)
                hits.push(`${svg.getAttribute('data-chart')}: "${boxes[i].text}" × "${boxes[j].text}"`);
            }
          return hits;
        }),
      );
      expect(overlaps).toEqual([]);
    } finally {
      await browser.close();
    }
  });

  it('reports an impossible SLO as missed and the CLI exits non-zero', async () => {
    const file = join(dir, 'impossible.yaml');
    const c = campaign({
      name: 'impossible',
      warmup: undefined,
      phases: [{ name: 'only', concurrency: 1, requests: 2, duration: '20s' }],
      mix: [{ model: DIT_NAME, steps: 2, cfg: 1 }],
      slo: { latency: { p50: '1ms' }, errorRate: 0 },
    });
    writeFileSync(file, stringify(c));
    const json = join(dir, 'impossible.json');
    const r = await runCli(['loadtest', 'run', file, '--json', json, '--html', join(dir, 'impossible.html'), '--no-status']);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stdout).toContain('SLO MISSED');
    const rep = JSON.parse(readFileSync(json, 'utf8')) as Report;
    expect(rep.sloMet).toBe(false);
    const objectives = rep.phases[0].slo.objectives;
    expect(objectives.find((o) => o.objective === 'latency p50')).toMatchObject({ bound: 1, met: false, attainment: 0 });
    expect(objectives.find((o) => o.objective === 'error rate')).toMatchObject({ bound: 0, actual: 0, met: true });
    expect(rep.count).toBe(2);
  });

  it('reports Ctrl-C as an interrupted run (exit 130): cancelled requests are not server errors, SLOs not judged; scrape errors are shown', async () => {
    const file = join(dir, 'interrupt.yaml');
    const [closed] = await freePorts(1); // nothing listens there
    const c = campaign({
      name: 'interrupt',
      warmup: undefined,
      phases: [{ name: 'long', concurrency: 2, requests: 100_000, duration: '60s' }],
      mix: [{ model: DIT_NAME, steps: 20, cfg: 4 }],
      slo: { latency: { p50: '1ms' }, errorRate: 0 },
      metrics: [
        { name: 'pipeline', url: `http://127.0.0.1:${metrics.port}/metrics` },
        { name: 'nowhere', url: `http://127.0.0.1:${closed}/metrics` },
      ],
    });
    writeFileSync(file, stringify(c));
    const json = join(dir, 'interrupt.json');
    const html = join(dir, 'interrupt.html');
    const child = spawn(process.execPath, [join(ROOT, 'bin/ditpipe.js'), 'loadtest', 'run', file, '--json', json, '--html', html], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      // The status line (every 5 s off a terminal) shows requests done: the phase is under way.
      await expect.poll(() => stderr, { timeout: 60_000, interval: 200 }).toMatch(/\[1\/1 long\].*done [1-9]/);
    } finally {
      child.kill('SIGINT');
    }
    expect(await exited, stderr).toBe(130);
    expect(stdout).toContain('long (interrupted):');
    expect(stdout).toContain('run interrupted: SLOs not judged');
    expect(stdout).not.toContain('MISSED');
    expect(stdout).toContain(`metrics scrape failed: nowhere http://127.0.0.1:${closed}/metrics: fetch failed (ECONNREFUSED)`);
    const rep = JSON.parse(readFileSync(json, 'utf8')) as Report;
    expect(rep).toMatchObject({ outcome: 'interrupted', interrupted: true, sloMet: null });
    const ph = rep.phases[0];
    expect(ph).toMatchObject({ interrupted: true, errors: 0, slo: { met: null } });
    expect(ph.cancelledByStop).toBeGreaterThanOrEqual(1);
    expect(Object.keys(ph.statusCodeDistribution)).toEqual(['OK']);
    expect(ph.server?.endpoints).toEqual(['pipeline']);
    const page = readFileSync(html, 'utf8');
    expect(page).toContain('interrupted — SLOs not judged');
    expect(page).toContain(`nowhere http://127.0.0.1:${closed}/metrics: fetch failed (ECONNREFUSED)`);
  });
});
