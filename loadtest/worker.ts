// Load generator on a worker thread: runs one phase plan at a time against the Sampler API
// (GenerateStream, so admission and first-step times are seen) and posts results in batches.
// Open loop: each request is due at a time fixed by the arrival process, and its latency counts
// from that time even when the send is late (no coordinated omission).
import { parentPort, workerData } from 'node:worker_threads';
import { SamplerApi } from '../shared/client.ts';
import { codeName, DitpipeError } from '../shared/errors.ts';
import { GuidanceChannels } from '../shared/gen/ditpipe/v1/common.ts';
import { CachePolicy, OutputFormat, type ClassLabel, type GenerateRequest } from '../shared/gen/ditpipe/v1/sampler.ts';
import { SAMPLER_KINDS } from '../shared/sampler-kinds.ts';
import type { MixEntry } from './campaign.ts';
import type { FromWorker, PhasePlan, RequestResult, ToWorker, WorkerInit } from './protocol.ts';
import { prng } from '../shared/prng.ts';

const now = (): number => performance.timeOrigin + performance.now();

function pickWeighted<T>(items: T[], weight: (x: T) => number, r: number): T {
  const sum = items.reduce((s, x) => s + weight(x), 0);
  let acc = 0;
  for (const x of items) {
    acc += weight(x);
    if (r * sum < acc) return x;
  }
  return items[items.length - 1];
}

function label(c: string | number): ClassLabel {
  if (typeof c === 'number') return { index: c };
  return /^\d+$/.test(c) ? { index: Number(c) } : { name: c };
}

/** A request drawn from the mix with the given random source; returns the mix index too. */
export function drawRequest(
  mix: MixEntry[],
  numClasses: Record<string, number>,
  rand: () => number,
): { req: Partial<GenerateRequest>; mix: number } {
  const entry = pickWeighted(mix, (m) => m.weight, rand());
  const idx = mix.indexOf(entry);
  const n =
    typeof entry.images === 'number' ? entry.images : entry.images.min + Math.floor(rand() * (entry.images.max - entry.images.min + 1));
  const labels: ClassLabel[] = [];
  for (let i = 0; i < n; i++) {
    const c = entry.classes;
    if (c === undefined) labels.push({ index: Math.floor(rand() * (numClasses[entry.model] ?? 1)) });
    else if (Array.isArray(c)) labels.push(label(c[Math.floor(rand() * c.length)]));
    else labels.push(label(pickWeighted(Object.entries(c), ([, w]) => w, rand())[0]));
  }
  const req: Partial<GenerateRequest> = {
    model: entry.model,
    classLabels: labels,
    sampler: SAMPLER_KINDS[entry.sampler],
    outputFormat: entry.output === 'latent' ? OutputFormat.OUTPUT_FORMAT_RAW_LATENT : OutputFormat.OUTPUT_FORMAT_PNG,
    // A load test measures sampling: the scheduler's repeat cache would answer the repeats of an
    // entry with a fixed seed without any.
    cachePolicy: CachePolicy.CACHE_POLICY_BYPASS,
  };
  if (entry.steps !== undefined) req.numSteps = entry.steps;
  if (entry.cfg !== undefined) req.cfgScale = entry.cfg;
  if (entry.eta !== undefined) req.eta = entry.eta;
  if (entry.seed !== undefined) req.seed = BigInt(entry.seed);
  if (entry.guidanceChannels)
    req.guidanceChannels =
      entry.guidanceChannels === 'all' ? GuidanceChannels.GUIDANCE_CHANNELS_ALL : GuidanceChannels.GUIDANCE_CHANNELS_THREE;
  return { req, mix: idx };
}

/**
 * Send time (ms after the phase start) of the arrival at cumulative intensity u, for a rate that
 * goes linearly from `from` to `to` per second over `durationMs`; Infinity past the end.
 */
export function arrivalTime(u: number, from: number, to: number, durationMs: number): number {
  const d = durationMs / 1000;
  const k = (to - from) / d;
  let t: number;
  if (Math.abs(k) < 1e-12) t = u / from;
  else {
    const disc = from * from + 2 * k * u;
    if (disc < 0) return Infinity;
    t = (Math.sqrt(disc) - from) / k;
  }
  return t * 1000;
}

function main(): void {
  const port = parentPort;
  if (!port) throw new Error('loadtest worker must run on a worker thread');
  const init = workerData as WorkerInit;
  const tls = init.tls === false ? false : { caFile: init.tls.ca, certFile: init.tls.cert, keyFile: init.tls.key };
  const api = new SamplerApi(init.address, { tls, token: init.token });
  const post = (m: FromWorker): void => port.postMessage(m);

  let current: { plan: PhasePlan; stop: () => void } | null = null;
  let pending: RequestResult[] = [];
  let inFlight = 0;
  const controllers = new Set<AbortController>();
  // Requests the coordinator's stop (Ctrl-C) cancelled: the client's doing, not a server error.
  const interrupted = new WeakSet<AbortController>();

  const flush = (phase: number): void => {
    if (pending.length === 0) return;
    post({ type: 'results', phase, results: pending, inFlight });
    pending = [];
  };

  async function one(req: Partial<GenerateRequest>, mix: number, intended: number): Promise<void> {
    const ac = new AbortController();
    controllers.add(ac);
    inFlight++;
    const sent = now();
    const r: RequestResult = { intended, sent, end: sent, code: 'OK', images: 0, mix };
    try {
      for await (const ev of api.generateStream(req, { timeoutMs: init.timeoutMs, signal: ac.signal })) {
        if (ev.accepted && r.accepted === undefined) r.accepted = now() - intended;
        else if (ev.progress && r.firstStep === undefined) r.firstStep = now() - intended;
        else if (ev.image) r.images++;
      }
    } catch (err) {
      if (interrupted.has(ac)) {
        r.code = 'INTERRUPTED';
        r.error = 'cancelled by the load tester (run interrupted)';
      } else {
        r.code = err instanceof DitpipeError ? codeName(err.code) : 'UNKNOWN';
        r.error = (err as Error).message;
      }
    } finally {
      r.end = now();
      inFlight--;
      controllers.delete(ac);
      pending.push(r);
    }
  }

  async function runPhase(plan: PhasePlan): Promise<void> {
    const rand = prng((init.seed * 1_000_003 + plan.id * 7919 + init.index * 104_729) >>> 0);
    const end = plan.startMs + plan.durationMs;
    let stopped = false;
    let wake: (() => void) | null = null;
    const sleep = (ms: number): Promise<void> =>
      new Promise((resolve) => {
        const t = setTimeout(() => ((wake = null), resolve()), Math.max(0, ms));
        wake = () => (clearTimeout(t), (wake = null), resolve());
      });
    current = { plan, stop: () => ((stopped = true), wake?.()) };
    const ticker = setInterval(() => flush(plan.id), 100);
    const running = new Set<Promise<void>>();
    const track = (p: Promise<void>): void => {
      running.add(p);
      void p.finally(() => running.delete(p));
    };
    try {
      if (plan.open) {
        const o = plan.open;
        let issued = 0;
        let u = o.arrivals === 'uniform' ? o.offset : 0;
        const nextU = (): number => (o.arrivals === 'uniform' ? o.workers : -Math.log(1 - rand()) * o.workers);
        if (o.arrivals === 'poisson') u = nextU();
        while (!stopped && issued < plan.requests) {
          const due = plan.startMs + arrivalTime(u, o.from, o.to, plan.durationMs);
          if (!(due < end)) break;
          const wait = due - now();
          if (wait > 1) await sleep(wait);
          if (stopped) break;
          issued++;
          u += nextU();
          const { req, mix } = drawRequest(init.mix, init.numClasses, rand);
          if (inFlight >= o.maxInFlight) {
            const t = now();
            pending.push({
              intended: due,
              sent: t,
              end: t,
              code: 'CLIENT_OVERLOAD',
              error: `more than ${o.maxInFlight} requests in flight on worker ${init.index}; arrival not sent`,
              images: 0,
              mix,
            });
            continue;
          }
          track(one(req, mix, due));
          // Yield now and then when behind schedule so results and stop messages still get through.
          if (issued % 64 === 0) await sleep(0);
        }
      } else if (plan.closed) {
        let issued = 0;
        const slot = async (): Promise<void> => {
          while (!stopped && issued < plan.requests && now() < end) {
            issued++;
            const { req, mix } = drawRequest(init.mix, init.numClasses, rand);
            await one(req, mix, now());
          }
        };
        const slots = Array.from({ length: plan.closed.concurrency }, () => slot());
        await Promise.all(slots);
      }
      // In-flight requests end by their own deadline; a stop cancels them.
      await Promise.all(running);
    } finally {
      clearInterval(ticker);
      flush(plan.id);
      current = null;
      post({ type: 'phaseDone', phase: plan.id });
    }
  }

  port.on('message', (m: ToWorker) => {
    if (m.type === 'phase') {
      runPhase(m.plan).catch((err: unknown) => post({ type: 'fatal', message: (err as Error).stack ?? String(err) }));
    } else if (m.type === 'stop') {
      current?.stop();
      for (const ac of controllers) {
        interrupted.add(ac);
        ac.abort();
      }
    } else if (m.type === 'exit') {
      api.close();
      port.close();
    }
  });
  post({ type: 'ready' });
}

if (parentPort && (workerData as WorkerInit | null)?.__module) main();
