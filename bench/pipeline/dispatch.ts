// Dispatch: push (steps pushed through NATS queue groups, ditpipe before 2026-12-02) against pull
// (replicas pull from JetStream work queues) in turns in one run, on clusters of real processes
// with `--simulate` denoisers (each pass sleeps base + perRow·rows ms and answers zeros):
//
//   frozen   2 denoisers, one SIGSTOPped: latency of 50-step DDIM requests before and after the
//            freeze, and the retries (push) or redeliveries (pull) it caused
//   hetero   a fast and a 4× slower denoiser, 16 requests in flight: images/s, latency p50/p99,
//            and each replica's share of the steps
//   lone     one request at a time on one denoiser with 8 ms passes: time per step outside the
//            pass (the target for pull is at most 2 ms)
//
//   npm run bench -- dispatch [--cases frozen,hetero,lone] [--variants push,pull] [--baseline 9258ea3]
//     [--reps 2] [--seconds 15]
//
// Push runs the services of --baseline (default 9258ea3, the last commit with push dispatch),
// checked out into $TMPDIR; pull runs this tree. Prints one JSON object on stdout.
import { parseArgs } from 'node:util';
import { SamplerApi } from '../../shared/client.ts';
import { OutputFormat, SamplerKind, type GenerateRequest } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { variantsFrom } from './capacity.ts';
import { benchModel, log, machine, metric, round, startCluster, type Variant } from './cluster.ts';

export interface DispatchOptions {
  cases: string[];
  variants: Variant[];
  reps: number;
  seconds: number;
}

const quantile = (xs: number[], q: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))] : Number.NaN;
};

function model(): { dir: string; name: string } {
  return benchModel('DiT-S/2', 32);
}

function request(name: string, seed: number, steps: number): Partial<GenerateRequest> {
  return {
    model: name,
    classLabels: [{ index: seed % 1000 }],
    numSteps: steps,
    sampler: SamplerKind.SAMPLER_KIND_DDIM,
    cfgScale: 4,
    seed: BigInt(seed),
    outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
  };
}

/** Work taken again: push counts retries at the scheduler, pull redeliveries at the replicas. */
async function rework(c: Awaited<ReturnType<typeof startCluster>>): Promise<number> {
  const s = await c.scheduler.metrics();
  let n = metric(s, 'ditpipe_retries_total');
  for (const d of c.denoisers) n += metric(await d.metrics().catch(() => new Map()), 'ditpipe_denoiser_redelivered_steps_total');
  return n;
}

/** A frozen (SIGSTOPped) replica of two: request latency before, right after and well after the freeze. */
async function frozen(variant: Variant): Promise<Record<string, unknown>> {
  const { dir, name } = model();
  // The setting for push: --step-timeout 2000 (at the default 30 s a request costs minutes).
  const schedulerArgs = variant.name === 'push' ? ['--step-timeout', '2000'] : [];
  const c = await startCluster({ variant, modelDir: dir, model: name, denoisers: 2, denoiserArgs: ['--simulate', '8+0'], schedulerArgs });
  const api = new SamplerApi(c.address);
  try {
    const timed = async (seed: number): Promise<number> => {
      const t = performance.now();
      await api.generate(request(name, seed, 50), { timeoutMs: 300_000 });
      return performance.now() - t;
    };
    const healthy: number[] = [];
    for (let i = 0; i < 3; i++) healthy.push(await timed(i));
    const before = await rework(c);
    c.denoisers[1].proc.kill('SIGSTOP');
    const frozenMs: number[] = [];
    for (let i = 0; i < 5; i++) frozenMs.push(await timed(10 + i));
    c.denoisers[1].proc.kill('SIGCONT');
    const after = await rework(c);
    const res = {
      variant: variant.name,
      healthy_ms: healthy.map((x) => round(x, 0)),
      frozen_ms: frozenMs.map((x) => round(x, 0)),
      rework_during_freeze: after - before,
      rework_kind: variant.name === 'push' ? 'retries (scheduler)' : 'redeliveries (replicas)',
    };
    log(
      `frozen (${variant.name}): healthy ${res.healthy_ms.join(', ')} ms; with one of 2 frozen ${res.frozen_ms.join(', ')} ms; ${res.rework_during_freeze} ${res.rework_kind}`,
    );
    return res;
  } finally {
    api.close();
    await c.stop();
  }
}

/** A fast and a 4× slower replica under 16 requests in flight. */
async function hetero(variant: Variant, seconds: number): Promise<Record<string, unknown>> {
  const { dir, name } = model();
  const c = await startCluster({
    variant,
    modelDir: dir,
    model: name,
    denoisers: 2,
    perDenoiserArgs: [
      ['--simulate', '8+0.6'],
      ['--simulate', '32+2.4'],
    ],
    schedulerArgs: ['--step-timeout', '120000'],
  });
  const api = new SamplerApi(c.address);
  let stop = false;
  const latencies: number[] = [];
  try {
    const loops = Array.from({ length: 16 }, async (_, i) => {
      for (let k = 0; !stop; k++) {
        const t = performance.now();
        await api.generate(request(name, i * 1000 + k, 30), { timeoutMs: 300_000 });
        if (!stop) latencies.push(performance.now() - t);
      }
    });
    await new Promise((r) => setTimeout(r, 5_000));
    latencies.length = 0;
    const s0 = await Promise.all(c.denoisers.map((d) => d.metrics()));
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, seconds * 1000));
    const s1 = await Promise.all(c.denoisers.map((d) => d.metrics()));
    const window = (performance.now() - t0) / 1000;
    const done = latencies.length;
    stop = true;
    await Promise.all(loops);
    const steps = s1.map((m, i) => metric(m, 'ditpipe_denoiser_steps_total') - metric(s0[i], 'ditpipe_denoiser_steps_total'));
    const res = {
      variant: variant.name,
      simulate: ['8+0.6', '32+2.4'],
      images_per_s: round(done / window, 2),
      latency_ms: { p50: round(quantile(latencies.slice(0, done), 0.5), 0), p99: round(quantile(latencies.slice(0, done), 0.99), 0) },
      steps_fast_slow: steps,
      slow_share: round(steps[1] / (steps[0] + steps[1]), 3),
    };
    log(
      `hetero (${variant.name}): ${res.images_per_s} images/s, p50 ${res.latency_ms.p50} ms, p99 ${res.latency_ms.p99} ms, steps fast/slow ${steps.join('/')}`,
    );
    return res;
  } finally {
    stop = true;
    api.close();
    await c.stop();
  }
}

/** One request at a time, one replica, 8 ms passes: per-step time outside the pass. */
async function lone(variant: Variant): Promise<Record<string, unknown>> {
  const { dir, name } = model();
  const passMs = 8;
  const steps = 50;
  const c = await startCluster({ variant, modelDir: dir, model: name, denoisers: 1, denoiserArgs: ['--simulate', `${passMs}+0`] });
  const api = new SamplerApi(c.address);
  try {
    await api.generate(request(name, 1, steps));
    const per: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t = performance.now();
      await api.generate(request(name, 2 + i, steps));
      per.push((performance.now() - t) / steps);
    }
    const res = {
      variant: variant.name,
      pass_ms: passMs,
      ms_per_step: { median: round(quantile(per, 0.5), 2), min: round(Math.min(...per), 2) },
      outside_pass_ms_per_step: { median: round(quantile(per, 0.5) - passMs, 2), min: round(Math.min(...per) - passMs, 2) },
    };
    log(
      `lone (${variant.name}): ${res.ms_per_step.median} ms per step, ${res.outside_pass_ms_per_step.median} ms outside the ${passMs} ms pass`,
    );
    return res;
  } finally {
    api.close();
    await c.stop();
  }
}

export async function runDispatch(o: DispatchOptions): Promise<Record<string, unknown>> {
  const out: Record<string, unknown[]> = {};
  for (const name of o.cases) {
    out[name] = [];
    for (let rep = 0; rep < o.reps; rep++) {
      for (const v of o.variants) {
        const r = name === 'frozen' ? await frozen(v) : name === 'hetero' ? await hetero(v, o.seconds) : await lone(v);
        out[name].push({ rep, ...r });
      }
    }
  }
  return { bench: 'dispatch', machine: machine(), ...out };
}

export function dispatchOptions(argv: string[]): DispatchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      cases: { type: 'string', default: 'frozen,hetero,lone' },
      variants: { type: 'string', default: 'push,pull' },
      baseline: { type: 'string', default: '9258ea3' },
      reps: { type: 'string', default: '2' },
      seconds: { type: 'string', default: '15' },
    },
  });
  const cases = values.cases.split(',');
  for (const c of cases)
    if (!['frozen', 'hetero', 'lone'].includes(c)) throw new Error(`--cases: unknown case "${c}" (frozen, hetero, lone)`);
  return { cases, variants: variantsFrom(values.variants, values.baseline), reps: Number(values.reps), seconds: Number(values.seconds) };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify(await runDispatch(dispatchOptions(process.argv.slice(2))), null, 2));
}
