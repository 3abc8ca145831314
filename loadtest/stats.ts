// Aggregation of request results: HDR histograms (microsecond resolution, 3 significant digits)
// for percentiles, ghz-compatible summaries, and time series for the HTML report.
import hdr from 'hdr-histogram-js';
import type { RequestResult } from './protocol.ts';

type Histogram = ReturnType<typeof hdr.build>;

const newHistogram = (): Histogram =>
  hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: 3 });

/** Percentiles reported everywhere (ghz reports 10..99; p99.9 added for tails). */
export const PERCENTILES = [10, 25, 50, 75, 90, 95, 99, 99.9] as const;

export class Recorder {
  readonly results: RequestResult[] = [];
  private readonly all = newHistogram();
  private readonly ok = newHistogram();
  private readonly accepted = newHistogram();
  private readonly firstStep = newHistogram();
  private readonly sendLag = newHistogram();
  errors = 0;
  images = 0;

  add(r: RequestResult): void {
    this.results.push(r);
    const lat = Math.max(1, Math.round((r.end - r.intended) * 1000));
    this.all.recordValue(lat);
    if (r.code === 'OK') this.ok.recordValue(lat);
    else this.errors++;
    this.images += r.images;
    if (r.accepted !== undefined) this.accepted.recordValue(Math.max(1, Math.round(r.accepted * 1000)));
    if (r.firstStep !== undefined) this.firstStep.recordValue(Math.max(1, Math.round(r.firstStep * 1000)));
    if (r.code !== 'CLIENT_OVERLOAD') this.sendLag.recordValue(Math.max(1, Math.round((r.sent - r.intended) * 1000)));
  }

  get count(): number {
    return this.results.length;
  }

  /** Latency percentile in ms over all (or only successful) requests; null when none. */
  latencyMs(p: number, okOnly = false): number | null {
    const h = okOnly ? this.ok : this.all;
    return h.totalCount ? h.getValueAtPercentile(p) / 1000 : null;
  }

  /** Fraction of successful requests at or under `ms` (interpolation-free, from the raw results). */
  fractionOkWithin(ms: number, key: 'latency' | 'firstStep' = 'latency'): number | null {
    let n = 0;
    let within = 0;
    for (const r of this.results) {
      if (r.code !== 'OK') continue;
      n++;
      const v = key === 'latency' ? r.end - r.intended : r.firstStep;
      if (v !== undefined && v <= ms) within++;
    }
    return n ? within / n : null;
  }

  distribution(which: 'accepted' | 'firstStep' | 'sendLag' | 'ok'): Record<string, number> | null {
    const h = this[which];
    if (!h.totalCount) return null;
    const out: Record<string, number> = { mean: h.mean / 1000, max: h.maxValue / 1000 };
    for (const p of PERCENTILES) out[`p${p}`] = h.getValueAtPercentile(p) / 1000;
    return out;
  }

  /** Percentile of the time-to-first-step distribution in ms. */
  firstStepMs(p: number): number | null {
    return this.firstStep.totalCount ? this.firstStep.getValueAtPercentile(p) / 1000 : null;
  }

  destroy(): void {
    for (const h of [this.all, this.ok, this.accepted, this.firstStep, this.sendLag]) h.destroy();
  }
}

/** gRPC code name in the CamelCase ghz (Go's codes.Code.String) uses: RESOURCE_EXHAUSTED → ResourceExhausted. */
export function ghzCode(code: string): string {
  if (code === 'OK') return 'OK';
  if (code === 'CANCELLED') return 'Canceled';
  return code
    .toLowerCase()
    .split('_')
    .map((w) => w.charAt(0).toUpperCase() + w.slice(1))
    .join('');
}

export interface GhzSummary {
  date: string;
  count: number;
  /** Nanoseconds (Go time.Duration), as ghz writes them. */
  total: number;
  average: number;
  fastest: number;
  slowest: number;
  rps: number;
  latencyDistribution: Array<{ percentage: number; latency: number }>;
  /** Ten equal-width buckets between fastest and slowest; mark = bucket upper edge in seconds. */
  histogram: Array<{ mark: number; count: number; frequency: number }>;
  statusCodeDistribution: Record<string, number>;
  errorDistribution: Record<string, number>;
}

const MAX_DISTINCT_ERRORS = 50;

/** ghz-compatible summary of results spanning `totalMs` of wall time. */
export function ghzSummary(results: RequestResult[], totalMs: number, date: Date): GhzSummary {
  const lat = results.map((r) => r.end - r.intended).sort((a, b) => a - b);
  const ns = (ms: number): number => Math.round(ms * 1e6);
  const h = newHistogram();
  for (const v of lat) h.recordValue(Math.max(1, Math.round(v * 1000)));
  const status: Record<string, number> = {};
  const errors: Record<string, number> = {};
  for (const r of results) {
    const c = ghzCode(r.code);
    status[c] = (status[c] ?? 0) + 1;
    if (r.code !== 'OK') {
      let key = `rpc error: code = ${c} desc = ${r.error ?? ''}`;
      if (!(key in errors) && Object.keys(errors).length >= MAX_DISTINCT_ERRORS) key = `${c}: (other messages)`;
      errors[key] = (errors[key] ?? 0) + 1;
    }
  }
  const fastest = lat[0] ?? 0;
  const slowest = lat[lat.length - 1] ?? 0;
  const histogram: GhzSummary['histogram'] = [];
  if (lat.length) {
    const width = (slowest - fastest) / 10;
    const counts = new Array<number>(10).fill(0);
    for (const v of lat) counts[width > 0 ? Math.min(9, Math.floor((v - fastest) / width)) : 9]++;
    for (let i = 0; i < 10; i++)
      histogram.push({ mark: (fastest + width * (i + 1)) / 1000, count: counts[i], frequency: counts[i] / lat.length });
  }
  const summary: GhzSummary = {
    date: date.toISOString(),
    count: results.length,
    total: ns(totalMs),
    average: lat.length ? ns(lat.reduce((a, b) => a + b, 0) / lat.length) : 0,
    fastest: ns(fastest),
    slowest: ns(slowest),
    rps: totalMs > 0 ? results.length / (totalMs / 1000) : 0,
    latencyDistribution: lat.length ? PERCENTILES.map((p) => ({ percentage: p, latency: ns(h.getValueAtPercentile(p) / 1000) })) : [],
    histogram,
    statusCodeDistribution: status,
    errorDistribution: errors,
  };
  h.destroy();
  return summary;
}

export interface TimePoint {
  /** Seconds since the campaign's first phase started (bucket start). */
  t: number;
  /** Requests completed in the bucket, ok and failed. */
  ok: number;
  errors: number;
  images: number;
  /** Latency percentiles (ms) of successful requests that completed in the bucket. */
  p50: number | null;
  p99: number | null;
}

/** Results bucketed by completion time, `bucketMs` wide, from `originMs` to `endMs`. */
export function timeSeries(results: RequestResult[], originMs: number, fromMs: number, endMs: number, bucketMs: number): TimePoint[] {
  const n = Math.max(1, Math.ceil((endMs - fromMs) / bucketMs));
  const buckets = Array.from({ length: n }, () => ({ ok: 0, errors: 0, images: 0, lat: [] as number[] }));
  for (const r of results) {
    const i = Math.min(n - 1, Math.max(0, Math.floor((r.end - fromMs) / bucketMs)));
    const b = buckets[i];
    b.images += r.images;
    if (r.code === 'OK') {
      b.ok++;
      b.lat.push(r.end - r.intended);
    } else b.errors++;
  }
  const q = (xs: number[], p: number): number | null =>
    xs.length ? xs[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)] : null;
  return buckets.map((b, i) => {
    b.lat.sort((x, y) => x - y);
    return {
      t: (fromMs - originMs + i * bucketMs) / 1000,
      ok: b.ok,
      errors: b.errors,
      images: b.images,
      p50: q(b.lat, 50),
      p99: q(b.lat, 99),
    };
  });
}

/** Latency histogram (ms) for a chart: `bins` equal-width bins over [min, max] of successful requests. */
export function latencyBins(results: RequestResult[], bins = 30): Array<{ from: number; to: number; count: number }> {
  const lat = results.filter((r) => r.code === 'OK').map((r) => r.end - r.intended);
  if (!lat.length) return [];
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of lat) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  const w = hi > lo ? (hi - lo) / bins : 1;
  const counts = new Array<number>(bins).fill(0);
  for (const v of lat) counts[Math.min(bins - 1, Math.floor((v - lo) / w))]++;
  return counts.map((count, i) => ({ from: lo + i * w, to: lo + (i + 1) * w, count }));
}
