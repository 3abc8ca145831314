// Prometheus text exposition: a small parser (samples only; HELP/TYPE lines are skipped), scraping
// with a timeout, and the server-side figures of a phase computed from two scrapes.
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$/;
const LABEL = /\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?/y;

function parseValue(v: string): number {
  if (v === '+Inf' || v === 'Inf') return Infinity;
  if (v === '-Inf') return -Infinity;
  return Number(v);
}

/** Samples of a text-format exposition; a malformed line throws with its line number. */
export function parsePrometheusText(text: string): Sample[] {
  const out: Sample[] = [];
  const lines = text.split('\n');
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n].trim();
    if (!line || line.startsWith('#')) continue;
    const m = LINE.exec(line);
    if (!m) throw new Error(`metrics line ${n + 1}: cannot parse ${JSON.stringify(line.slice(0, 120))}`);
    const labels: Record<string, string> = {};
    if (m[2]) {
      LABEL.lastIndex = 0;
      while (LABEL.lastIndex < m[2].length) {
        const start = LABEL.lastIndex;
        const l = LABEL.exec(m[2]);
        if (!l || LABEL.lastIndex === start) throw new Error(`metrics line ${n + 1}: bad labels ${JSON.stringify(m[2].slice(0, 120))}`);
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
      }
    }
    out.push({ name: m[1], labels, value: parseValue(m[3]) });
  }
  return out;
}

export interface Scrape {
  endpoint: string;
  url: string;
  at: number;
  samples: Sample[];
  error?: string;
}

/** Redirects followed at most, each checked by the caller's guard. */
const MAX_REDIRECTS = 5;

export interface ScrapeOptions {
  timeoutMs?: number;
  /**
   * Whether the load tester may contact this host (the same guard as for the campaign's own URLs).
   * A redirect to a host it refuses is not followed; default: every host.
   */
  allowHost?: (host: string) => boolean;
}

/**
 * GET the endpoint; failures are recorded in the scrape (a run does not stop for a metrics hiccup).
 * Redirects are followed by hand, each target passing `allowHost` first, so a metrics URL on
 * loopback cannot send the tool to an address it would refuse if given directly.
 */
export async function scrape(endpoint: string, url: string, opts: ScrapeOptions = {}): Promise<Scrape> {
  const at = Date.now();
  const signal = AbortSignal.timeout(opts.timeoutMs ?? 5_000);
  let target = url;
  try {
    for (let hop = 0; ; hop++) {
      const res = await fetch(target, { signal, redirect: 'manual' });
      if (res.status >= 300 && res.status < 400 && res.headers.get('location')) {
        await res.body?.cancel();
        const next = new URL(res.headers.get('location') as string, target);
        if (!/^https?:$/.test(next.protocol)) return { endpoint, url, at, samples: [], error: `redirect to ${next.protocol} refused` };
        const host = next.hostname.replace(/^\[|\]$/g, '');
        if (opts.allowHost && !opts.allowHost(host)) {
          return { endpoint, url, at, samples: [], error: `redirect to ${next.origin} refused: not loopback and not in target.allowHosts` };
        }
        if (hop >= MAX_REDIRECTS) return { endpoint, url, at, samples: [], error: `more than ${MAX_REDIRECTS} redirects` };
        target = next.href;
        continue;
      }
      if (!res.ok) return { endpoint, url, at, samples: [], error: `HTTP ${res.status}` };
      return { endpoint, url, at, samples: parsePrometheusText(await res.text()) };
    }
  } catch (err) {
    // fetch says only "fetch failed"; the cause says why (ECONNREFUSED: nothing listens there).
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const why = cause?.code ?? cause?.message;
    return { endpoint, url, at, samples: [], error: why ? `${(err as Error).message} (${why})` : (err as Error).message };
  }
}

type Filter = (labels: Record<string, string>) => boolean;

/** Sum of a metric over every scrape and series (optionally filtered). */
export function total(scrapes: Scrape[], name: string, filter?: Filter): number {
  let s = 0;
  for (const sc of scrapes) for (const x of sc.samples) if (x.name === name && (!filter || filter(x.labels))) s += x.value;
  return s;
}

/** Sums of a metric by the value of one label. */
export function totalBy(scrapes: Scrape[], name: string, label: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const sc of scrapes)
    for (const x of sc.samples) if (x.name === name) out[x.labels[label] ?? ''] = (out[x.labels[label] ?? ''] ?? 0) + x.value;
  return out;
}

/** Counter increase between two scrape sets; a counter that went down was reset, so its new value is the increase. */
function delta(before: Scrape[], after: Scrape[], name: string, filter?: Filter): number {
  let d = 0;
  for (const a of after) {
    const b = before.find((x) => x.endpoint === a.endpoint);
    const va = total([a], name, filter);
    const vb = b ? total([b], name, filter) : 0;
    d += va >= vb ? va - vb : va;
  }
  return d;
}

function deltaBy(before: Scrape[], after: Scrape[], name: string, label: string): Record<string, number> {
  const a = totalBy(after, name, label);
  const b = totalBy(before, name, label);
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(a)) {
    const d = v >= (b[k] ?? 0) ? v - (b[k] ?? 0) : v;
    if (d > 0) out[k] = d;
  }
  return out;
}

/** Quantile of a histogram from bucket increases, interpolated within a bucket as Prometheus' histogram_quantile does. */
export function histogramQuantile(q: number, buckets: Array<{ le: number; count: number }>): number | null {
  const bs = [...buckets].sort((x, y) => x.le - y.le);
  if (bs.length === 0) return null;
  const n = bs[bs.length - 1].count;
  if (n <= 0) return null;
  const rank = q * n;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of bs) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe;
      return prevLe + ((b.le - prevLe) * (rank - prevCount)) / Math.max(b.count - prevCount, 1e-12);
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

function histogramDelta(
  before: Scrape[],
  after: Scrape[],
  name: string,
): { count: number; sum: number; p50: number | null; p99: number | null; mean: number | null } {
  const les = new Set<string>();
  for (const a of after) for (const x of a.samples) if (x.name === `${name}_bucket`) les.add(x.labels.le);
  const buckets = [...les].map((le) => ({ le: parseValue(le), count: delta(before, after, `${name}_bucket`, (l) => l.le === le) }));
  const count = delta(before, after, `${name}_count`);
  const sum = delta(before, after, `${name}_sum`);
  return { count, sum, mean: count > 0 ? sum / count : null, p50: histogramQuantile(0.5, buckets), p99: histogramQuantile(0.99, buckets) };
}

export interface ServerFigures {
  /** Endpoints that answered both scrapes. */
  endpoints: string[];
  /** `<name> <url>: <why>` per endpoint that failed a scrape (once, even when both failed). */
  scrapeErrors: string[];
  /** Requests the scheduler finished (any outcome) plus those it refused. */
  requests: number;
  requestsByOutcome: Record<string, number>;
  rejectedByReason: Record<string, number>;
  images: number;
  stepsDispatched: number;
  stepsPerSecond: number;
  samplingGflops: number;
  /** Sampling compute achieved, Tflops/s in the DiT paper's multiply-accumulate convention. */
  samplingTflopsPerSecond: number;
  gflopsPerImage: number | null;
  denoiserMeanBatchRows: number | null;
  denoiserForwardMs: { mean: number | null; p99: number | null };
  denoiserQueueWaitMs: { mean: number | null; p99: number | null };
  /** Seconds of forward passes per second of wall time, summed over replicas: replicas kept busy by model compute. */
  denoiserBusyReplicas: number;
  decodeMs: { mean: number | null; p50: number | null; p99: number | null };
  decodeMeanBatch: number | null;
  /** Steps and decodes a replica took on a second or later delivery (another replica died, froze or overran). */
  redelivered: { denoiser: number; decoder: number };
}

const ms = (s: number | null): number | null => (s === null ? null : s * 1000);

export function serverFigures(before: Scrape[], after: Scrape[], seconds: number): ServerFigures {
  const ok = after.filter((a) => !a.error && before.some((b) => b.endpoint === a.endpoint && !b.error));
  const okBefore = before.filter((b) => ok.some((a) => a.endpoint === b.endpoint));
  const errors = [...new Set([...before, ...after].filter((s) => s.error).map((s) => `${s.endpoint} ${s.url}: ${s.error}`))];
  const requestsByOutcome = deltaBy(okBefore, ok, 'ditpipe_request_seconds_count', 'outcome');
  const rejectedByReason = deltaBy(okBefore, ok, 'ditpipe_requests_rejected_total', 'reason');
  const images = delta(okBefore, ok, 'ditpipe_images_total');
  const gflops = delta(okBefore, ok, 'ditpipe_sampling_gflops_total');
  const steps = delta(okBefore, ok, 'ditpipe_steps_dispatched_total');
  const perImage = histogramDelta(okBefore, ok, 'ditpipe_image_tflops');
  const rows = histogramDelta(okBefore, ok, 'ditpipe_denoiser_batch_rows');
  const fwd = histogramDelta(okBefore, ok, 'ditpipe_denoiser_forward_seconds');
  const queue = histogramDelta(okBefore, ok, 'ditpipe_denoiser_queue_wait_seconds');
  const decode = histogramDelta(okBefore, ok, 'ditpipe_decoder_decode_seconds');
  const decBatch = histogramDelta(okBefore, ok, 'ditpipe_decoder_batch_size');
  const sum = (r: Record<string, number>): number => Object.values(r).reduce((a, b) => a + b, 0);
  return {
    endpoints: ok.map((s) => s.endpoint),
    scrapeErrors: errors,
    requests: sum(requestsByOutcome) + sum(rejectedByReason),
    requestsByOutcome,
    rejectedByReason,
    images,
    stepsDispatched: steps,
    stepsPerSecond: seconds > 0 ? steps / seconds : 0,
    samplingGflops: gflops,
    samplingTflopsPerSecond: seconds > 0 ? gflops / 1000 / seconds : 0,
    gflopsPerImage: perImage.count > 0 ? (perImage.sum * 1000) / perImage.count : images > 0 && gflops > 0 ? gflops / images : null,
    denoiserMeanBatchRows: rows.mean,
    denoiserForwardMs: { mean: ms(fwd.mean), p99: ms(fwd.p99) },
    denoiserQueueWaitMs: { mean: ms(queue.mean), p99: ms(queue.p99) },
    denoiserBusyReplicas: seconds > 0 ? fwd.sum / seconds : 0,
    decodeMs: { mean: ms(decode.mean), p50: ms(decode.p50), p99: ms(decode.p99) },
    decodeMeanBatch: decBatch.mean,
    redelivered: {
      denoiser: delta(okBefore, ok, 'ditpipe_denoiser_redelivered_steps_total'),
      decoder: delta(okBefore, ok, 'ditpipe_decoder_redelivered_decodes_total'),
    },
  };
}
