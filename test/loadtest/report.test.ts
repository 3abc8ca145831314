// What the load-test reports say, from a report built here: an interrupted run is reported as
// interrupted (not as an SLO miss), scrape errors appear in the console summary and the HTML,
// SLO bounds carry units and comparisons, redelivered work prints as numbers, errors are drawn in red, and
// chart ticks are round values with units.
import { describe, expect, it } from 'vitest';
import { duration, inUnit, objectiveText, redeliveredText } from '../../loadtest/format.ts';
import { niceTicks, renderHtml, SERIES_COLORS } from '../../loadtest/html.ts';
import type { ServerFigures } from '../../loadtest/prom.ts';
import type { RequestResult } from '../../loadtest/protocol.ts';
import { textSummary } from '../../loadtest/report.ts';
import type { PhaseReport, Report, SloObjective } from '../../loadtest/runner.ts';
import { ghzSummary, latencyBins, timeSeries } from '../../loadtest/stats.ts';

const ORIGIN = 1_700_000_000_000;

const objectives = (): SloObjective[] => [
  { objective: 'latency p99', comparison: '<=', bound: 2000, unit: 'ms', actual: 1500, met: true, attainment: 1 },
  { objective: 'error rate', comparison: '<=', bound: 0.01, unit: 'fraction', actual: 0, met: true },
  { objective: 'images/s', comparison: '>=', bound: 2, unit: 'images/s', actual: 1.5, met: false },
];

function server(over: Partial<ServerFigures> = {}): ServerFigures {
  return {
    endpoints: ['scheduler'],
    scrapeErrors: [],
    requests: 10,
    requestsByOutcome: { OK: 10 },
    rejectedByReason: {},
    images: 10,
    stepsDispatched: 100,
    stepsPerSecond: 10,
    samplingGflops: 1,
    samplingTflopsPerSecond: 0.001,
    gflopsPerImage: 0.1,
    denoiserMeanBatchRows: 2,
    denoiserForwardMs: { mean: 1, p99: 2 },
    denoiserQueueWaitMs: { mean: 1, p99: 2 },
    denoiserBusyReplicas: 0.5,
    decodeMs: { mean: 1, p50: 1, p99: 2 },
    decodeMeanBatch: 1,
    redelivered: { denoiser: 0, decoder: 0 },
    ...over,
  };
}

function phase(name: string, startOffsetMs: number, over: Partial<PhaseReport> = {}): PhaseReport {
  const start = ORIGIN + startOffsetMs;
  const results: RequestResult[] = Array.from({ length: 20 }, (_, i) => ({
    intended: start + i * 500,
    sent: start + i * 500,
    end: start + i * 500 + 700 + i * 40,
    code: i % 7 === 3 ? 'UNAVAILABLE' : 'OK',
    images: 1,
    mix: 0,
  }));
  const end = start + 12_000;
  return {
    name,
    loop: 'closed',
    offered: { concurrency: 2 },
    ...ghzSummary(results, end - start, new Date(start)),
    startOffsetMs,
    wallMs: end - start,
    ok: 17,
    errors: 3,
    errorRate: 0.15,
    images: 20,
    imagesPerSecond: 1.5,
    latencyMs: { p50: 1000, p99: 1500 },
    timeToAcceptedMs: null,
    timeToFirstStepMs: null,
    sendLagMs: null,
    slo: { met: false, objectives: objectives() },
    interrupted: false,
    cancelledByStop: 0,
    server: server(),
    tool: { cpuMs: 1, cpuPercentOfOneCore: 1, workerEventLoopUtilization: [0.1] },
    timeseries: timeSeries(results, ORIGIN, start, end, 1000),
    latencyHistogram: latencyBins(results),
    ...over,
  };
}

function report(phases: PhaseReport[], outcome: Report['outcome']): Report {
  return {
    tool: 'ditpipe loadtest',
    campaign: { name: 'unit' },
    target: '127.0.0.1:50051',
    workers: 2,
    outcome,
    interrupted: outcome === 'interrupted',
    sloMet: outcome === 'interrupted' ? null : outcome === 'met',
    ...ghzSummary([], 1, new Date(ORIGIN)),
    warmup: null,
    images: 40,
    errors: 6,
    phases,
    models: [],
    tool_cpu: { cpuMs: 1, wallMs: 1, cpuPercentOfOneCore: 1 },
  };
}

describe('figures with units', () => {
  it('writes bounds with their comparison and unit, redelivered work as numbers', () => {
    expect(objectives().map(objectiveText)).toEqual(['latency p99 ≤ 2000 ms', 'error rate ≤ 1%', 'images/s ≥ 2 images/s']);
    expect(inUnit(0.005, 'fraction')).toBe('0.5%');
    expect(redeliveredText({ denoiser: 0, decoder: 0 })).toBe('0');
    expect(redeliveredText({ denoiser: 3, decoder: 1 })).toBe('4 (denoiser 3, decoder 1)');
    expect([850, 1250, 15_000, 150_000].map(duration)).toEqual(['850 ms', '1.25 s', '15 s', '2.5 min']);
  });

  it('chooses round ticks that start at or below the data', () => {
    expect(niceTicks(0.5, 82, 8)).toEqual([0, 20, 40, 60, 80, 100]);
    expect(niceTicks(812, 15_800, 8)).toEqual([0, 2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000]);
    expect(niceTicks(0, 12.2, 5)).toEqual([0, 2.5, 5, 7.5, 10, 12.5]);
  });
});

describe('console summary', () => {
  it('reports an interrupted run as interrupted, its SLOs not judged, the cancelled requests apart', () => {
    const r = report(
      [
        phase('first', 0, { slo: { met: true, objectives: objectives().slice(0, 2) } }),
        phase('second', 13_000, { interrupted: true, cancelledByStop: 3, slo: { met: null, objectives: objectives() } }),
      ],
      'interrupted',
    );
    const text = textSummary(r);
    expect(text).toContain('second (interrupted):');
    expect(text).toContain('3 request(s) in flight cancelled by the stop: counted nowhere (not server errors)');
    expect(text).toContain('SLO images/s ≥ 2 images/s: actual 1.5 images/s → not judged (interrupted)');
    expect(text).toContain('SLO latency p99 ≤ 2000 ms: actual 1500 ms → met');
    expect(text).not.toContain('MISSED');
    expect(text.split('\n').pop()).toBe('run interrupted: SLOs not judged');
  });

  it('shows scrape errors and redelivered work', () => {
    const r = report(
      [
        phase('p', 0, {
          server: server({
            scrapeErrors: ['denoiser-0 http://127.0.0.1:9465/metrics: fetch failed (ECONNREFUSED)'],
            redelivered: { denoiser: 2, decoder: 0 },
          }),
        }),
      ],
      'missed',
    );
    const text = textSummary(r);
    expect(text).toContain('    metrics scrape failed: denoiser-0 http://127.0.0.1:9465/metrics: fetch failed (ECONNREFUSED)');
    expect(text).toContain('redelivered 2 (denoiser 2)');
    expect(text).toContain('SLO images/s ≥ 2 images/s: actual 1.5 images/s → MISSED');
    expect(text.split('\n').pop()).toBe('SLO MISSED');
  });
});

describe('HTML report', () => {
  it('says interrupted, shows scrape errors, bounds with units and redelivered work as numbers', () => {
    const html = renderHtml(
      report(
        [
          phase('first', 0, { server: server({ scrapeErrors: ['nope http://127.0.0.1:1/metrics: fetch failed (ECONNREFUSED)'] }) }),
          phase('second', 13_000, {
            interrupted: true,
            cancelledByStop: 2,
            slo: { met: null, objectives: objectives() },
            server: server({ endpoints: [], scrapeErrors: ['all http://127.0.0.1:2/metrics: HTTP 404'] }),
          }),
        ],
        'interrupted',
      ),
    );
    expect(html).toContain('<span class="unjudged">interrupted — SLOs not judged</span>');
    expect(html).not.toMatch(/SLO missed/);
    expect(html).toContain('<li>nope http://127.0.0.1:1/metrics: fetch failed (ECONNREFUSED)</li>');
    expect(html).toContain('no endpoint answered: no server figures');
    expect(html).toContain('<td>≤ 2000 ms</td><td>1500 ms</td>');
    expect(html).toContain('<td>≥ 2 images/s</td><td>1.5 images/s</td>');
    expect(html).toContain('<td class="unjudged">not judged</td>');
    expect(html).toContain('2 request(s) in flight were cancelled by the stop');
    expect(html).toContain('redelivered 0</p>');
    expect(html).not.toContain('redelivered {');
    // The second phase had no endpoint answering: no server line of zeros for it.
    expect(html.split('data-phase="second"')[1]).not.toContain('Server:');
  });

  it('draws errors in red and no other series in red; ticks are round values with units', () => {
    const html = renderHtml(report([phase('p', 0)], 'missed'));
    const strokes = [...html.matchAll(/stroke="(#[0-9a-f]{6})"[^>]*data-series="([^"]+)"/g)].map((m) => [m[2], m[1]]);
    expect(strokes).toEqual([
      ['p50', SERIES_COLORS.p50],
      ['p99', SERIES_COLORS.p99],
      ['ok requests/s', SERIES_COLORS.ok],
      ['images/s', SERIES_COLORS.images],
      ['errors/s', SERIES_COLORS.errors],
    ]);
    expect(SERIES_COLORS.errors).toBe('#d62728');
    expect(strokes.filter(([, c]) => c === SERIES_COLORS.errors)).toHaveLength(1);
    const ticks = (chart: string): string[] =>
      [
        ...html
          .split(`data-chart="${chart}"`)[1]
          .split('</svg>')[0]
          .matchAll(/<text class="tick"[^>]*>([^<]*)<\/text>/g),
      ].map((m) => m[1]);
    const latency = ticks('latency-over-time');
    expect(latency).toContain('0');
    expect(latency.some((t) => /^\d+(\.\d+)? s$/.test(t))).toBe(true); // y in seconds, x in seconds
    expect(latency.every((t) => t === '0' || /^\d+(\.\d+)? (ms|s|min)$/.test(t))).toBe(true);
    const hist = ticks('latency-histogram-0');
    expect(hist.every((t) => t.length <= 7)).toBe(true);
  });
});
