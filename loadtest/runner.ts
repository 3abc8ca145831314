// Runs a campaign: checks where it may send, resolves the mix against ListModels, starts the
// generator workers, runs warm-up and phases (scraping /metrics around each), shows a live status
// line, and returns the report. Every phase is bounded by its request count and by time.
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { readFileSync } from 'node:fs';
import { SamplerApi, type ClientTlsFiles } from '../shared/client.ts';
import type { ModelInfo } from '../shared/gen/ditpipe/v1/sampler.ts';
import { isLoopback, remoteHosts, type Campaign, type Phase, type SloSpec } from './campaign.ts';
import { scrape, serverFigures, type Scrape, type ServerFigures } from './prom.ts';
import type { FromWorker, PhasePlan, RequestResult, ToWorker, WorkerInit } from './protocol.ts';
import { ghzSummary, latencyBins, Recorder, timeSeries, type GhzSummary, type TimePoint } from './stats.ts';
import { StatusLine } from './status.ts';

const BOOTSTRAP = fileURLToPath(new URL('../shared/runtime/ts-worker.mjs', import.meta.url));
const WORKER_MODULE = new URL('./worker.ts', import.meta.url).href;

export class LoadtestError extends Error {}

const now = (): number => performance.timeOrigin + performance.now();

export interface SloObjective {
  objective: string;
  /** `actual` must be at most (`<=`) or at least (`>=`) the bound. */
  comparison: '<=' | '>=';
  bound: number;
  /** Of bound and actual: milliseconds, a fraction of requests (0..1), or images per second. */
  unit: 'ms' | 'fraction' | 'images/s';
  actual: number | null;
  met: boolean;
  /** Latency objectives: fraction of successful requests within the bound. */
  attainment?: number | null;
}

export interface PhaseReport extends GhzSummary {
  name: string;
  loop: 'open' | 'closed';
  offered: { rate?: number | { from: number; to: number }; arrivals?: string; concurrency?: number };
  /** Milliseconds since the campaign's first phase started. */
  startOffsetMs: number;
  wallMs: number;
  ok: number;
  errors: number;
  errorRate: number;
  images: number;
  imagesPerSecond: number;
  /** Successful-request latency (ms). */
  latencyMs: Record<string, number> | null;
  /** Intended send → `accepted` event: admission (ms). */
  timeToAcceptedMs: Record<string, number> | null;
  /** Intended send → first `progress` event: first reverse step answered (ms). */
  timeToFirstStepMs: Record<string, number> | null;
  /** Actual send − intended send (ms): how far the generator fell behind its schedule. */
  sendLagMs: Record<string, number> | null;
  /** Whether the phase met its SLOs; null when it was interrupted (not judged: it did not run to its bound). */
  slo: { met: boolean | null; objectives: SloObjective[] };
  /** The run was stopped (Ctrl-C) during this phase. */
  interrupted: boolean;
  /** Requests in flight that the stop cancelled: the tool's doing, so in no count, error or latency figure. */
  cancelledByStop: number;
  server: ServerFigures | null;
  tool: { cpuMs: number; cpuPercentOfOneCore: number; workerEventLoopUtilization: number[] };
  timeseries: TimePoint[];
  latencyHistogram: Array<{ from: number; to: number; count: number }>;
}

export interface Report extends GhzSummary {
  tool: 'ditpipe loadtest';
  campaign: { name: string; description?: string; file?: string };
  target: string;
  workers: number;
  /** 'interrupted' when the run was stopped (Ctrl-C) before its last phase ended: its SLOs are not judged. */
  outcome: 'met' | 'missed' | 'interrupted';
  interrupted: boolean;
  /** Every phase met its SLOs; null when the run was interrupted. */
  sloMet: boolean | null;
  warmup: { count: number; errors: number; images: number } | null;
  images: number;
  errors: number;
  phases: PhaseReport[];
  models: Array<{ name: string; gflops: number; replicas: number; decoderReplicas: number }>;
  tool_cpu: { cpuMs: number; wallMs: number; cpuPercentOfOneCore: number };
}

export interface RunOptions {
  allowRemote?: boolean;
  /** Bearer token for the target (overrides target.tokenFile). */
  token?: string;
  file?: string;
  /** Where the live status line goes; null for none. Default process.stderr. */
  status?: NodeJS.WritableStream | null;
  signal?: AbortSignal;
}

/** The campaign's TLS setting as client TLS files (false: plaintext). */
export function clientTls(tls: false | { ca?: string; cert?: string; key?: string }): false | ClientTlsFiles {
  return tls === false ? false : { caFile: tls.ca, certFile: tls.cert, keyFile: tls.key };
}

/** The bearer token: given, or read from target.tokenFile (never written into the report). */
function resolveToken(c: Campaign, given: string | undefined): string | undefined {
  if (given) return given;
  if (!c.target.tokenFile) return undefined;
  try {
    const t = readFileSync(c.target.tokenFile, 'utf8').trim();
    if (!t) throw new Error('empty');
    return t;
  } catch (err) {
    throw new LoadtestError(
      `target.tokenFile ${c.target.tokenFile}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`,
    );
  }
}

function resolveMix(c: Campaign, models: ModelInfo[]): Record<string, number> {
  const numClasses: Record<string, number> = {};
  c.mix.forEach((m, i) => {
    const info = models.find((x) => x.name === m.model);
    if (!info)
      throw new LoadtestError(
        `mix[${i}].model: "${m.model}" is not served by ${c.target.address} (serving: ${models.map((x) => x.name).join(', ') || 'none'})`,
      );
    numClasses[m.model] = info.numClasses;
    const keys = m.classes === undefined ? [] : Array.isArray(m.classes) ? m.classes : Object.keys(m.classes);
    for (const k of keys) {
      const asIndex = typeof k === 'number' ? k : /^\d+$/.test(k) ? Number(k) : null;
      const ok = asIndex !== null ? asIndex < info.numClasses : info.classNames.some((n) => n.toLowerCase() === String(k).toLowerCase());
      if (!ok)
        throw new LoadtestError(
          `mix[${i}].classes: ${JSON.stringify(k)} is not a class of ${m.model} (${info.numClasses} classes${info.classNames.length ? `: ${info.classNames.join(', ')}` : ', no names'})`,
        );
    }
  });
  return numClasses;
}

/** Splits n into parts proportional to weights (largest remainder), summing to n. */
export function split(n: number, weights: number[]): number[] {
  const sum = weights.reduce((a, b) => a + b, 0);
  const exact = weights.map((w) => (sum > 0 ? (n * w) / sum : 0));
  const parts = exact.map(Math.floor);
  let left = n - parts.reduce((a, b) => a + b, 0);
  const order = exact.map((e, i) => [e - Math.floor(e), i] as const).sort((a, b) => b[0] - a[0]);
  for (const [, i] of order) {
    if (left <= 0) break;
    parts[i]++;
    left--;
  }
  return parts;
}

function sloFor(c: Campaign, p: Phase): SloSpec {
  return { ...(c.slo ?? {}), ...(p.slo ?? {}) };
}

function evaluateSlo(slo: SloSpec, rec: Recorder, imagesPerSecond: number): SloObjective[] {
  const out: SloObjective[] = [];
  const pct = (k: string): number => Number(k.slice(1));
  for (const [k, bound] of Object.entries(slo.latency ?? {})) {
    const actual = rec.latencyMs(pct(k), true);
    out.push({
      objective: `latency ${k}`,
      comparison: '<=',
      bound,
      unit: 'ms',
      actual,
      met: actual !== null && actual <= bound,
      attainment: rec.fractionOkWithin(bound),
    });
  }
  for (const [k, bound] of Object.entries(slo.timeToFirstStep ?? {})) {
    const actual = rec.firstStepMs(pct(k));
    out.push({
      objective: `time to first step ${k}`,
      comparison: '<=',
      bound,
      unit: 'ms',
      actual,
      met: actual !== null && actual <= bound,
      attainment: rec.fractionOkWithin(bound, 'firstStep'),
    });
  }
  if (slo.errorRate !== undefined) {
    const actual = rec.count ? rec.errors / rec.count : 0;
    out.push({
      objective: 'error rate',
      comparison: '<=',
      bound: slo.errorRate,
      unit: 'fraction',
      actual,
      met: rec.count > 0 && actual <= slo.errorRate,
    });
  }
  if (slo.minImagesPerSecond !== undefined) {
    out.push({
      objective: 'images/s',
      comparison: '>=',
      bound: slo.minImagesPerSecond,
      unit: 'images/s',
      actual: imagesPerSecond,
      met: imagesPerSecond >= slo.minImagesPerSecond,
    });
  }
  return out;
}

class Pool {
  private readonly workers: Worker[] = [];
  private handlers = new Set<(i: number, m: FromWorker) => void>();
  private failure: Error | null = null;

  static async start(n: number, init: Omit<WorkerInit, 'index' | '__module'>): Promise<Pool> {
    const pool = new Pool();
    const ready: Array<Promise<void>> = [];
    for (let i = 0; i < n; i++) {
      const w = new Worker(BOOTSTRAP, { workerData: { ...init, index: i, __module: WORKER_MODULE } satisfies WorkerInit });
      pool.workers.push(w);
      ready.push(
        new Promise((resolve, reject) => {
          const onMsg = (m: FromWorker): void => {
            if (m.type === 'ready') {
              w.off('message', onMsg);
              resolve();
            }
          };
          w.on('message', onMsg);
          w.once('error', reject);
        }),
      );
      w.on('message', (m: FromWorker) => {
        if (m.type === 'fatal') pool.failure = new LoadtestError(`load generator ${i} failed: ${m.message}`);
        for (const h of pool.handlers) h(i, m);
      });
      w.on('error', (err) => {
        pool.failure = new LoadtestError(`load generator ${i} crashed: ${err.message}`);
        for (const h of pool.handlers) h(i, { type: 'fatal', message: err.message });
      });
    }
    await Promise.all(ready);
    return pool;
  }

  get size(): number {
    return this.workers.length;
  }

  elu(): Array<ReturnType<Worker['performance']['eventLoopUtilization']>> {
    return this.workers.map((w) => w.performance.eventLoopUtilization());
  }

  eluSince(prev: Array<ReturnType<Worker['performance']['eventLoopUtilization']>>): number[] {
    return this.workers.map((w, i) => w.performance.eventLoopUtilization(prev[i]).utilization);
  }

  stopAll(): void {
    for (const w of this.workers) w.postMessage({ type: 'stop' } satisfies ToWorker);
  }

  /** Sends each worker its plan (null = sits the phase out) and resolves when all are done. */
  run(plans: Array<PhasePlan | null>, onResults: (worker: number, results: RequestResult[], inFlight: number) => void): Promise<void> {
    const active = new Set(plans.flatMap((p, i) => (p ? [i] : [])));
    if (active.size === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const h = (i: number, m: FromWorker): void => {
        if (m.type === 'results' && plans[i] && m.phase === plans[i].id) onResults(i, m.results, m.inFlight);
        else if (m.type === 'phaseDone' && plans[i] && m.phase === plans[i].id) {
          active.delete(i);
          if (active.size === 0) {
            this.handlers.delete(h);
            resolve();
          }
        } else if (m.type === 'fatal') {
          this.handlers.delete(h);
          this.stopAll();
          reject(this.failure ?? new LoadtestError(m.message));
        }
      };
      this.handlers.add(h);
      plans.forEach((p, i) => p && this.workers[i].postMessage({ type: 'phase', plan: p } satisfies ToWorker));
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

export async function runCampaign(c: Campaign, opts: RunOptions = {}): Promise<Report> {
  const remote = remoteHosts(c);
  if (remote.length && !opts.allowRemote)
    throw new LoadtestError(
      `refusing to send load to ${remote.join(', ')}: not loopback and not in target.allowHosts; pass --allow-remote if that is intended`,
    );

  const allowed = new Set(c.target.allowHosts.map((h) => h.toLowerCase()));
  const allowHost = (host: string): boolean => Boolean(opts.allowRemote) || isLoopback(host) || allowed.has(host.toLowerCase());

  const tls = c.target.tls === false ? false : c.target.tls === true ? {} : c.target.tls;
  const token = resolveToken(c, opts.token);
  const api = new SamplerApi(c.target.address, { tls: clientTls(tls), token });
  let models: ModelInfo[];
  try {
    models = await api.listModels({ timeoutMs: 10_000 });
  } catch (err) {
    throw new LoadtestError(`target ${c.target.address}: ListModels failed: ${(err as Error).message}`);
  } finally {
    api.close();
  }
  const numClasses = resolveMix(c, models);
  const workers = Math.min(c.workers, Math.max(1, availableParallelism() * 4));
  const pool = await Pool.start(workers, {
    address: c.target.address,
    tls,
    token,
    timeoutMs: c.target.timeout,
    mix: c.mix,
    numClasses,
    seed: c.seed,
  });
  const status = opts.status === undefined ? new StatusLine(process.stderr) : opts.status ? new StatusLine(opts.status) : null;
  let aborted = false;
  const onAbort = (): void => {
    aborted = true;
    pool.stopAll();
  };
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  const cpu0 = process.cpuUsage();
  const wall0 = now();
  let phaseId = 0;

  try {
    let warmup: Report['warmup'] = null;
    if (c.warmup && !aborted) {
      const rec = new Recorder();
      const n = c.warmup.requests ?? Number.MAX_SAFE_INTEGER;
      const conc = split(c.warmup.concurrency, new Array<number>(workers).fill(1));
      const reqs = split(Math.min(n, 1e12), conc);
      const startMs = now() + 20;
      const plans = conc.map((cc, i): PhasePlan | null =>
        cc > 0 && reqs[i] > 0
          ? { id: ++phaseId, startMs, durationMs: c.warmup!.duration ?? c.maxPhaseDuration, requests: reqs[i], closed: { concurrency: cc } }
          : null,
      );
      status?.start('warm-up', () => ({ rec, inFlight: 0, startMs }));
      await pool.run(plans, (_, rs) => rs.forEach((r) => r.code !== 'INTERRUPTED' && rec.add(r)));
      status?.stop();
      warmup = { count: rec.count, errors: rec.errors, images: rec.images };
      rec.destroy();
    }

    const phases: PhaseReport[] = [];
    const all: RequestResult[] = [];
    let origin = 0;
    for (let pi = 0; pi < c.phases.length && !aborted; pi++) {
      const p = c.phases[pi];
      const before = await Promise.all(c.metrics.map((m) => scrape(m.name, m.url, { allowHost })));
      const rec = new Recorder();
      const inFlight = new Array<number>(workers).fill(0);
      const cpuBefore = process.cpuUsage();
      const eluBefore = pool.elu();
      const durationMs = p.duration ?? c.maxPhaseDuration;
      const n = p.requests ?? Number.MAX_SAFE_INTEGER;
      const startMs = now() + 20;
      if (pi === 0) origin = startMs;
      const id = ++phaseId;
      let plans: Array<PhasePlan | null>;
      if (p.rate !== undefined) {
        const { from, to } = typeof p.rate === 'number' ? { from: p.rate, to: p.rate } : p.rate;
        const share = split(Math.min(n, 1e12), new Array<number>(workers).fill(1));
        const maxIf = split(p.maxInFlight, new Array<number>(workers).fill(1));
        plans = share.map((s, i) =>
          s > 0
            ? {
                id,
                startMs,
                durationMs,
                requests: s,
                open: { from, to, arrivals: p.arrivals, maxInFlight: Math.max(1, maxIf[i]), offset: i, workers },
              }
            : null,
        );
      } else {
        const conc = split(p.concurrency!, new Array<number>(workers).fill(1));
        const reqs = split(Math.min(n, 1e12), conc);
        plans = conc.map((cc, i) =>
          cc > 0 && reqs[i] > 0 ? { id, startMs, durationMs, requests: reqs[i], closed: { concurrency: cc } } : null,
        );
      }
      status?.start(`${pi + 1}/${c.phases.length} ${p.name}`, () => ({ rec, inFlight: inFlight.reduce((a, b) => a + b, 0), startMs }));
      let cancelledByStop = 0;
      await pool.run(plans, (w, rs, f) => {
        inFlight[w] = f;
        for (const r of rs) {
          if (r.code === 'INTERRUPTED') cancelledByStop++;
          else rec.add(r);
        }
      });
      const interrupted = aborted;
      status?.stop();
      const endMs = now();
      const wallMs = endMs - startMs;
      const cpu = process.cpuUsage(cpuBefore);
      const after = await Promise.all(c.metrics.map((m) => scrape(m.name, m.url, { allowHost })));
      const imagesPerSecond = wallMs > 0 ? rec.images / (wallMs / 1000) : 0;
      const objectives = evaluateSlo(sloFor(c, p), rec, imagesPerSecond);
      const bucketMs = Math.max(1000, Math.ceil(wallMs / 120 / 1000) * 1000);
      phases.push({
        name: p.name!,
        loop: p.rate !== undefined ? 'open' : 'closed',
        offered: p.rate !== undefined ? { rate: p.rate, arrivals: p.arrivals } : { concurrency: p.concurrency },
        ...ghzSummary(rec.results, wallMs, new Date(startMs)),
        startOffsetMs: startMs - origin,
        wallMs,
        ok: rec.count - rec.errors,
        errors: rec.errors,
        errorRate: rec.count ? rec.errors / rec.count : 0,
        images: rec.images,
        imagesPerSecond,
        latencyMs: rec.distribution('ok'),
        timeToAcceptedMs: rec.distribution('accepted'),
        timeToFirstStepMs: rec.distribution('firstStep'),
        sendLagMs: rec.distribution('sendLag'),
        slo: { met: interrupted ? null : objectives.every((o) => o.met), objectives },
        interrupted,
        cancelledByStop,
        server: c.metrics.length ? serverFigures(before, after, wallMs / 1000) : null,
        tool: {
          cpuMs: (cpu.user + cpu.system) / 1000,
          cpuPercentOfOneCore: wallMs > 0 ? ((cpu.user + cpu.system) / 1000 / wallMs) * 100 : 0,
          workerEventLoopUtilization: pool.eluSince(eluBefore),
        },
        timeseries: timeSeries(rec.results, origin, startMs, endMs, bucketMs),
        latencyHistogram: latencyBins(rec.results),
      });
      for (const r of rec.results) all.push(r);
      rec.destroy();
    }

    const cpu = process.cpuUsage(cpu0);
    const wallMs = now() - wall0;
    const span = phases.length ? phases[phases.length - 1].startOffsetMs + phases[phases.length - 1].wallMs : 0;
    return {
      tool: 'ditpipe loadtest',
      campaign: { name: c.name, description: c.description, file: opts.file },
      target: c.target.address,
      workers,
      outcome: aborted ? 'interrupted' : phases.every((p) => p.slo.met) ? 'met' : 'missed',
      interrupted: aborted,
      sloMet: aborted ? null : phases.every((p) => p.slo.met),
      ...ghzSummary(all, span, new Date(origin || wall0)),
      images: phases.reduce((a, p) => a + p.images, 0),
      errors: phases.reduce((a, p) => a + p.errors, 0),
      warmup,
      phases,
      models: models.map((m) => ({ name: m.name, gflops: m.gflops, replicas: m.replicas, decoderReplicas: m.decoderReplicas })),
      tool_cpu: {
        cpuMs: (cpu.user + cpu.system) / 1000,
        wallMs,
        cpuPercentOfOneCore: wallMs > 0 ? ((cpu.user + cpu.system) / 1000 / wallMs) * 100 : 0,
      },
    };
  } finally {
    status?.stop();
    opts.signal?.removeEventListener('abort', onAbort);
    await pool.close();
  }
}

export type { Scrape };
