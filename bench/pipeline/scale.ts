// Scale simulation: how steps/s and request latency behave as denoiser replicas go 1 → 64 and the
// offered load rises, with the real scheduler and nats-server and `ditpipe denoiser --simulate
// <base>+<perRow>` processes standing in for GPUs (each pass sleeps base + perRow·rows ms and answers
// zeros). Raw-latent output, so no decoders. For each replica count N: one nats-server, one scheduler
// and N denoisers, each its own process (a fresh cluster per N); a closed loop raises the requests
// kept in flight through the `--concurrency` list on the same processes (new clients are started
// spread over the warm-up so they do not move in lockstep) and stops raising once steps/s grew by
// less than `--growth` from the previous level.
//
//   npm run bench -- scale [flags]   or   node --import tsx bench/pipeline/scale.ts [--replicas 1,4,16,64] [--concurrency 8,32,128,512]
//     [--simulate 8+0.6] [--steps 50] [--cfg 4] [--warmup 3] [--max-warmup 30] [--seconds 10] [--growth 0.1]
//     [--max-batch-rows 64] [--preset DiT-S/2] [--input-size 32] [--deadline 720] [--svg FILE]
//
// The scheduler runs with --max-samples-in-flight 2·max(C) (admission never refuses) and
// --step-timeout 120000 (a CPU-starved machine must not turn slow steps into retries).
// --simulate 8+0.6 is an ASSUMPTION for DiT-XL/2 256×256 on one H100, not a measurement (derivation
//   in docs/loadtest.md "Scale simulation").
// --preset/--input-size: the model.json the denoisers serve. The simulate path never loads the ONNX,
//   and DiT-S/2 at input size 32 has DiT-XL/2 256×256's tensor shapes (latent 4×32×32 in, 8×32×32
//   out, 1000 classes), which is all the scheduler and NATS see; it builds in seconds, XL/2 does not.
// --warmup S: warm-up before the first window of each N; later levels warm up for one expected
//   request latency (C·steps / previous steps/s, at least --warmup, at most --max-warmup).
// --growth G: stop raising C for this N once steps/s grew by less than G (0.1 = 10 %); `--growth=-1`
//   runs every level.
// --deadline S: levels that would start after S seconds from the start are skipped (the JSON says so).
// --svg FILE: also writes a plot (steps/s and client p99 against requests in flight, one line per N).
// --plot-from A.json[,B.json] --svg FILE [--title T]: only re-plots saved outputs (first file wins per (N, C)).
//
// Per (N, C) level, over a `--seconds` window after `--warmup` s: steps/s from the scheduler's
// ditpipe_steps_dispatched_total; client-side p50/p99 latency of the requests that completed in the
// window; mean denoiser batch rows (Σ forward_rows / Σ batch_rows_count over all denoisers); simulated
// GPU busy fraction (Σ forward seconds / (N · window)); CPU cores kept busy by the scheduler,
// nats-server, all denoisers, this client process and the rest of the machine (/proc). Prints one
// JSON object on stdout.
import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { SamplerApi } from '../../shared/client.ts';
import { OutputFormat, SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { benchModel, log, machine, metric, parseMetrics, round, startCluster, type Cluster, type Metrics } from './cluster.ts';

export interface ScaleOptions {
  replicas: number[];
  concurrency: number[];
  simulate: string;
  steps: number;
  cfg: number;
  warmupSeconds: number;
  maxWarmupSeconds: number;
  seconds: number;
  growth: number;
  maxBatchRows: number;
  preset: string;
  inputSize: number;
  deadlineSeconds: number;
  svg?: string;
}

export interface ScaleLevel {
  replicas: number;
  concurrency: number;
  warmup_s: number;
  window_s: number;
  steps_per_s: number;
  /** Steps/s the simulated GPUs could give at this level's mean batch size if never idle. */
  gpu_bound_steps_per_s: number;
  requests_completed: number;
  latency_p50_s: number | null;
  latency_p99_s: number | null;
  /** C / completed requests per second (Little's law), for levels with few completions. */
  littles_law_latency_s: number | null;
  mean_batch_rows: number;
  gpu_busy_fraction: number;
  scheduler_us_cpu_per_step: number;
  nats_us_cpu_per_step: number;
  cpu_cores_busy: { scheduler: number; nats: number; denoisers: number; client: number; other: number; machine: number };
  errors: number;
  first_error?: string;
}

const TICK_S = 0.01; // USER_HZ

/** User + system CPU seconds of a process so far (0 once it is gone). */
function procCpu(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) * TICK_S;
  } catch {
    return 0;
  }
}

/** Busy CPU seconds of the whole machine so far (all cores; idle and iowait excluded). */
function machineCpu(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0];
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = v;
  return (user + nice + system + irq + softirq + steal) * TICK_S;
}

function quantile(sorted: number[], q: number): number | null {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function scrape(urls: number[]): Promise<Metrics[]> {
  return Promise.all(
    urls.map(async (port) => {
      const res = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(10_000) });
      return parseMetrics(await res.text());
    }),
  );
}

function sumMetric(ms: Metrics[], name: string): number {
  return ms.reduce((a, m) => a + metric(m, name), 0);
}

/** Steps/s N never-idle replicas give with passes of `rows` rows (cfg doubles rows per step). */
function gpuBound(o: ScaleOptions, n: number, rows: number, base: number, perRow: number): number {
  if (!(rows > 0)) return 0;
  const rowsPerStep = o.cfg > 1 ? 2 : 1;
  return (n * (rows / rowsPerStep) * 1000) / (base + perRow * rows);
}

async function runReplicas(
  o: ScaleOptions,
  n: number,
  modelDir: string,
  model: string,
  started: number,
): Promise<{ levels: ScaleLevel[]; skipped: number[] }> {
  const [base, perRow] = o.simulate.split('+').map(Number);
  const maxC = Math.max(...o.concurrency);
  const t0 = performance.now();
  log(`scale: starting nats-server, scheduler and ${n} denoisers (--simulate ${o.simulate})`);
  const cluster: Cluster = await startCluster({
    modelDir,
    model,
    denoisers: n,
    denoiserArgs: ['--simulate', o.simulate, '--max-batch-rows', String(o.maxBatchRows)],
    schedulerArgs: ['--max-samples-in-flight', String(2 * maxC), '--step-timeout', '120000'],
  });
  log(`scale: ${n} denoisers up in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const api = new SamplerApi(cluster.address);
  // One controller per request (not one shared signal): SamplerApi.generate leaves its abort
  // listener on the signal, so a shared one would collect a listener per request.
  const stopping = { now: false };
  const inFlight = new Set<AbortController>();
  const done: Array<{ end: number; ms: number }> = [];
  let errors = 0;
  let firstError = '';
  const clients: Array<Promise<void>> = [];
  const client = async (c: number, delayMs: number): Promise<void> => {
    await sleep(delayMs);
    for (let k = 0; !stopping.now; k++) {
      const s = performance.now();
      const ac = new AbortController();
      inFlight.add(ac);
      try {
        await api.generate(
          {
            model,
            classLabels: [{ index: (c * 31 + k) % 1000 }],
            numSteps: o.steps,
            sampler: SamplerKind.SAMPLER_KIND_DDIM,
            cfgScale: o.cfg,
            seed: BigInt(c * 1_000_000 + k),
            outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
          },
          { signal: ac.signal },
        );
        const e = performance.now();
        done.push({ end: e, ms: e - s });
      } catch (err) {
        if (stopping.now) return;
        errors++;
        firstError ||= err instanceof Error ? err.message : String(err);
      } finally {
        inFlight.delete(ac);
      }
    }
  };
  const ports = [cluster.scheduler.metricsPort, ...cluster.denoisers.map((d) => d.metricsPort)];
  const pids = {
    scheduler: [cluster.scheduler.proc.pid],
    nats: [cluster.nats.pid],
    denoisers: cluster.denoisers.map((d) => d.proc.pid),
    client: [process.pid],
  };
  const cpu = (): Record<keyof typeof pids, number> & { machine: number } => ({
    scheduler: procCpu(pids.scheduler[0]),
    nats: procCpu(pids.nats[0]),
    denoisers: pids.denoisers.reduce<number>((a, p) => a + procCpu(p), 0),
    client: procCpu(process.pid),
    machine: machineCpu(),
  });
  const levels: ScaleLevel[] = [];
  const skipped: number[] = [];
  try {
    let running = 0;
    for (const c of o.concurrency) {
      if ((performance.now() - started) / 1000 + o.warmupSeconds + o.seconds > o.deadlineSeconds) {
        skipped.push(c);
        continue;
      }
      const add = c - running;
      for (let i = 0; i < add; i++) clients.push(client(running + i, (i * o.warmupSeconds * 1000 * 0.8) / add));
      running = c;
      // Closed loop: a request takes about C·steps / (steps/s). Warm up for one such latency (from the
      // previous level's rate, capped) so the window's completions come from clients in steady state.
      const prevRate = levels.at(-1)?.steps_per_s ?? 0;
      const warmup =
        prevRate > 0 ? Math.min(o.maxWarmupSeconds, Math.max(o.warmupSeconds, (1.2 * c * o.steps) / prevRate)) : o.warmupSeconds;
      await sleep(warmup * 1000);
      const [m0, c0, w0, e0] = [await scrape(ports), cpu(), performance.now(), errors];
      await sleep(o.seconds * 1000);
      const [m1, c1, w1] = [await scrape(ports), cpu(), performance.now()];
      const window = (w1 - w0) / 1000;
      const d = (name: string, from: 'sched' | 'den'): number => {
        const [a, b] = from === 'sched' ? [m0.slice(0, 1), m1.slice(0, 1)] : [m0.slice(1), m1.slice(1)];
        return sumMetric(b, name) - sumMetric(a, name);
      };
      const steps = d('ditpipe_steps_dispatched_total', 'sched');
      const rows = d('ditpipe_denoiser_forward_rows_total', 'den');
      const passes = d('ditpipe_denoiser_batch_rows_count', 'den');
      const fwdS = d('ditpipe_denoiser_forward_seconds_sum', 'den');
      const lat = done
        .filter((x) => x.end >= w0 && x.end <= w1)
        .map((x) => x.ms / 1000)
        .sort((a, b) => a - b);
      const busy = (k: keyof typeof c0): number => (c1[k] - c0[k]) / window;
      const ours = busy('scheduler') + busy('nats') + busy('denoisers') + busy('client');
      const meanRows = passes > 0 ? rows / passes : 0;
      const level: ScaleLevel = {
        replicas: n,
        concurrency: c,
        warmup_s: round(warmup, 1),
        window_s: round(window, 2),
        steps_per_s: Math.round(steps / window),
        gpu_bound_steps_per_s: Math.round(gpuBound(o, n, meanRows, base, perRow)),
        requests_completed: lat.length,
        latency_p50_s: lat.length ? round(quantile(lat, 0.5) as number, 3) : null,
        latency_p99_s: lat.length ? round(quantile(lat, 0.99) as number, 3) : null,
        littles_law_latency_s: lat.length ? round(c / (lat.length / window), 2) : null,
        mean_batch_rows: round(meanRows, 2),
        gpu_busy_fraction: round(fwdS / (n * window), 3),
        scheduler_us_cpu_per_step: steps > 0 ? round(((c1.scheduler - c0.scheduler) / steps) * 1e6, 1) : 0,
        nats_us_cpu_per_step: steps > 0 ? round(((c1.nats - c0.nats) / steps) * 1e6, 1) : 0,
        cpu_cores_busy: {
          scheduler: round(busy('scheduler'), 2),
          nats: round(busy('nats'), 2),
          denoisers: round(busy('denoisers'), 2),
          client: round(busy('client'), 2),
          other: round(Math.max(0, busy('machine') - ours), 2),
          machine: round(busy('machine'), 2),
        },
        errors: errors - e0,
        ...(firstError ? { first_error: firstError } : {}),
      };
      levels.push(level);
      log(
        `scale: N=${n} C=${c}: ${level.steps_per_s} steps/s (GPU bound ${level.gpu_bound_steps_per_s}), p50 ${level.latency_p50_s} s p99 ${level.latency_p99_s} s (${lat.length} done), ` +
          `rows ${level.mean_batch_rows}, GPU busy ${level.gpu_busy_fraction}, cores ${JSON.stringify(level.cpu_cores_busy)}`,
      );
      const prev = levels.at(-2);
      if (prev && level.steps_per_s < prev.steps_per_s * (1 + o.growth)) {
        skipped.push(...o.concurrency.filter((x) => x > c));
        break;
      }
    }
  } finally {
    stopping.now = true;
    for (const ac of inFlight) ac.abort();
    await Promise.allSettled(clients);
    api.close();
    await cluster.stop();
  }
  return { levels, skipped };
}

/** Two panels (steps/s, client p99) against requests in flight on a log2 axis, one line per N. */
export function scaleSvg(levels: ScaleLevel[], title: string): string {
  const W = 380;
  const H = 260;
  const pad = { l: 58, r: 12, t: 28, b: 40 };
  const cs = [...new Set(levels.map((l) => l.concurrency))].sort((a, b) => a - b);
  const ns = [...new Set(levels.map((l) => l.replicas))].sort((a, b) => a - b);
  const colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b'];
  const lx = (c: number): number => {
    const lo = Math.log2(cs[0]);
    const hi = Math.log2(cs.at(-1) as number);
    return pad.l + (hi > lo ? ((Math.log2(c) - lo) / (hi - lo)) * (W - pad.l - pad.r) : (W - pad.l - pad.r) / 2);
  };
  const panel = (ox: number, label: string, value: (l: ScaleLevel) => number | null): string => {
    const vals = levels.map(value).filter((v): v is number => v !== null);
    const top = Math.max(1e-9, ...vals);
    const mag = 10 ** Math.floor(Math.log10(top / 4));
    const tick = ([1, 2, 2.5, 5, 10].find((m) => m * mag * 4 >= top) ?? 10) * mag;
    const max = tick * Math.ceil(top / tick);
    const y = (v: number): number => H - pad.b - (v / max) * (H - pad.t - pad.b);
    const parts: string[] = [
      `<g transform="translate(${ox},0)">`,
      `<text x="${W / 2}" y="16" text-anchor="middle" font-weight="bold">${label}</text>`,
    ];
    parts.push(
      `<line x1="${pad.l}" y1="${H - pad.b}" x2="${W - pad.r}" y2="${H - pad.b}" stroke="#000"/><line x1="${pad.l}" y1="${pad.t}" x2="${pad.l}" y2="${H - pad.b}" stroke="#000"/>`,
    );
    for (let v = 0; v <= max + tick / 2; v += tick) {
      parts.push(
        `<line x1="${pad.l}" y1="${y(v)}" x2="${W - pad.r}" y2="${y(v)}" stroke="#ddd"/><text x="${pad.l - 4}" y="${y(v) + 4}" text-anchor="end">${Number(v.toPrecision(6))}</text>`,
      );
    }
    for (const c of cs) parts.push(`<text x="${lx(c)}" y="${H - pad.b + 14}" text-anchor="middle">${c}</text>`);
    parts.push(`<text x="${(pad.l + W - pad.r) / 2}" y="${H - 6}" text-anchor="middle">requests in flight (closed loop)</text>`);
    ns.forEach((n, i) => {
      const pts = levels
        .filter((l) => l.replicas === n)
        .map((l) => [lx(l.concurrency), value(l)] as const)
        .filter((p): p is readonly [number, number] => p[1] !== null)
        .map(([px, v]) => `${px.toFixed(1)},${y(v).toFixed(1)}`);
      const col = colors[i % colors.length];
      parts.push(`<polyline fill="none" stroke="${col}" stroke-width="2" points="${pts.join(' ')}"/>`);
      for (const p of pts) {
        const [px, py] = p.split(',');
        parts.push(`<circle cx="${px}" cy="${py}" r="3" fill="${col}"/>`);
      }
    });
    parts.push('</g>');
    return parts.join('\n');
  };
  const legend = ns
    .map(
      (n, i) =>
        `<rect x="${20 + i * 90}" y="${H + 8}" width="12" height="12" fill="${colors[i % colors.length]}"/><text x="${36 + i * 90}" y="${H + 18}">N=${n} replicas</text>`,
    )
    .join('\n');
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${2 * W}" height="${H + 50}" font-family="sans-serif" font-size="11">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    `<text x="${W}" y="${H + 44}" text-anchor="middle" fill="#444">${title}</text>`,
    panel(0, 'steps/s (scheduler)', (l) => l.steps_per_s),
    panel(W, 'client p99 latency, s', (l) => l.latency_p99_s),
    legend,
    '</svg>',
    '',
  ].join('\n');
}

export async function runScale(o: ScaleOptions): Promise<Record<string, unknown>> {
  if (!/^\d+(\.\d+)?\+\d+(\.\d+)?$/.test(o.simulate)) throw new Error(`--simulate: expected "<base ms>+<ms per row>", got "${o.simulate}"`);
  const started = performance.now();
  const { dir: modelDir, name: model } = benchModel(o.preset, o.inputSize);
  const levels: ScaleLevel[] = [];
  const skipped: Array<{ replicas: number; concurrency: number[] }> = [];
  const machineBefore = machine();
  for (const n of o.replicas) {
    if ((performance.now() - started) / 1000 + o.warmupSeconds + o.seconds > o.deadlineSeconds) {
      skipped.push({ replicas: n, concurrency: o.concurrency });
      continue;
    }
    const r = await runReplicas(o, n, modelDir, model, started);
    levels.push(...r.levels);
    if (r.skipped.length) skipped.push({ replicas: n, concurrency: r.skipped });
  }
  if (o.svg) {
    writeFileSync(
      o.svg,
      scaleSvg(
        levels,
        `ditpipe scale simulation: --simulate ${o.simulate} ms/pass, DDIM ${o.steps} steps, cfg ${o.cfg}, ${machineBefore.nproc} shared cores`,
      ),
    );
    log(`scale: plot written to ${o.svg}`);
  }
  return {
    bench: 'scale',
    simulate: o.simulate,
    simulate_note: 'ASSUMED profile for DiT-XL/2 256x256 on one H100 (docs/loadtest.md), not a measurement',
    model: { preset: o.preset, input_size: o.inputSize, name: model },
    sampler: 'ddim',
    steps: o.steps,
    cfg: o.cfg,
    images_per_request: 1,
    max_batch_rows: o.maxBatchRows,
    warmup_s: o.warmupSeconds,
    window_s: o.seconds,
    machine: machineBefore,
    wall_s: round((performance.now() - started) / 1000, 1),
    levels,
    skipped,
  };
}

export function scaleOptions(argv: string[]): ScaleOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      replicas: { type: 'string', default: '1,4,16,64' },
      concurrency: { type: 'string', default: '8,32,128,512' },
      simulate: { type: 'string', default: '8+0.6' },
      steps: { type: 'string', default: '50' },
      cfg: { type: 'string', default: '4' },
      warmup: { type: 'string', default: '3' },
      'max-warmup': { type: 'string', default: '30' },
      seconds: { type: 'string', default: '10' },
      growth: { type: 'string', default: '0.1' },
      'max-batch-rows': { type: 'string', default: '64' },
      preset: { type: 'string', default: 'DiT-S/2' },
      'input-size': { type: 'string', default: '32' },
      deadline: { type: 'string', default: '720' },
      svg: { type: 'string' },
    },
  });
  const ints = (s: string, flag: string): number[] => {
    const v = s.split(',').map(Number);
    if (v.some((x) => !Number.isInteger(x) || x < 1)) throw new Error(`--${flag}: expected positive integers, got "${s}"`);
    return v;
  };
  return {
    replicas: ints(values.replicas, 'replicas'),
    concurrency: ints(values.concurrency, 'concurrency').sort((a, b) => a - b),
    simulate: values.simulate,
    steps: Number(values.steps),
    cfg: Number(values.cfg),
    warmupSeconds: Number(values.warmup),
    maxWarmupSeconds: Number(values['max-warmup']),
    seconds: Number(values.seconds),
    growth: Number(values.growth),
    maxBatchRows: Number(values['max-batch-rows']),
    preset: values.preset,
    inputSize: Number(values['input-size']),
    deadlineSeconds: Number(values.deadline),
    svg: values.svg,
  };
}

/** Levels from earlier outputs of this bench (bare, or wrapped by bench/run.ts); the first file wins for a repeated (N, C). */
export function levelsFrom(files: string[]): ScaleLevel[] {
  const seen = new Set<string>();
  const out: ScaleLevel[] = [];
  for (const f of files) {
    const j = JSON.parse(readFileSync(f, 'utf8')) as { levels?: ScaleLevel[]; results?: { scale?: { levels?: ScaleLevel[] } } };
    const levels = j.levels ?? j.results?.scale?.levels;
    if (!levels) throw new Error(`${f}: no "levels" (not an output of the scale bench)`);
    for (const l of levels) {
      const key = `${l.replicas}/${l.concurrency}`;
      if (!seen.has(key)) out.push(l);
      seen.add(key);
    }
  }
  return out.sort((a, b) => a.replicas - b.replicas || a.concurrency - b.concurrency);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const argv = process.argv.slice(2);
  const from = argv.indexOf('--plot-from');
  if (from >= 0) {
    // Re-plot saved runs without running anything: --plot-from a.json[,b.json] --svg FILE [--title T]
    const { values } = parseArgs({
      args: argv,
      options: { 'plot-from': { type: 'string' }, svg: { type: 'string' }, title: { type: 'string', default: 'ditpipe scale simulation' } },
    });
    if (!values.svg) throw new Error('--plot-from needs --svg FILE');
    writeFileSync(values.svg, scaleSvg(levelsFrom((values['plot-from'] as string).split(',')), values.title));
    log(`scale: plot written to ${values.svg}`);
  } else {
    console.log(JSON.stringify(await runScale(scaleOptions(argv)), null, 2));
  }
}
