// Scheduler capacity: denoise steps per second one scheduler process sustains against many
// `--simulate` denoiser processes (they sleep base + perRow·rows ms per pass and answer zeros) over a
// real nats-server, with many concurrent raw-latent requests kept in flight by a closed loop.
// Steps/s is the scheduler's own ditpipe_steps_dispatched_total over a window after a warm-up; the
// CPU each process used in that window (from /proc) shows which part saturates.
//
//   node --import tsx bench/pipeline/capacity.ts [--denoisers 16] [--concurrency 256] [--steps 50]
//     [--simulate 0+0] [--input-size 8,32] [--warmup 3] [--seconds 10] [--cfg 4] [--cpu-prof DIR]
//     [--variants pull,push] [--baseline 9258ea3] [--reps 1]
//
// --cpu-prof DIR: V8 CPU profiles of the scheduler and of the first denoiser, top self-time functions in the JSON.
// --variants: which dispatch runs, in turns for each input size and repetition: "pull" is this tree,
// "push" the ditpipe of --baseline (default 9258ea3, the last commit that pushed steps through NATS
// queue groups), checked out into $TMPDIR.
//
// The simulated model's model.json is a DiT-S/2 built at each input size (simulate never loads the
// ONNX). Prints one JSON object on stdout.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { basename, join } from 'node:path';
import { parseArgs } from 'node:util';
import { SamplerApi } from '../../shared/client.ts';
import { OutputFormat, SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { baselineTree, benchModel, log, machine, metric, PULL, round, startCluster, type Variant } from './cluster.ts';

export interface CapacityOptions {
  denoisers: number;
  concurrency: number;
  steps: number;
  simulate: string;
  inputSizes: number[];
  warmupSeconds: number;
  seconds: number;
  cfg: number;
  /** Write a V8 CPU profile of the scheduler process into this folder. */
  cpuProf?: string;
  variants: Variant[];
  reps: number;
}

/** "pull" is this tree; "push" the baseline revision. */
export function variantsFrom(list: string, baseline: string): Variant[] {
  return list.split(',').map((v) => {
    if (v === 'pull') return PULL;
    if (v === 'push') return baselineTree(baseline, 'push');
    throw new Error(`--variants: expected pull and/or push, got "${v}"`);
  });
}

const TICK_S = 0.01; // /proc/<pid>/stat times are in clock ticks; USER_HZ is 100 on Linux

/** [user, system] CPU seconds of a process so far ([0, 0] once it is gone). */
function cpuSeconds(pid: number | undefined): [number, number] {
  if (pid === undefined) return [0, 0];
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return [Number(fields[11]) * TICK_S, Number(fields[12]) * TICK_S]; // utime, stime (fields 14, 15)
  } catch {
    return [0, 0];
  }
}

async function runOne(o: CapacityOptions, inputSize: number, variant: Variant): Promise<Record<string, unknown>> {
  const { dir: modelDir, name: model } = benchModel('DiT-S/2', inputSize);
  log(
    `capacity (${variant.name}): ${o.denoisers} denoisers --simulate ${o.simulate}, latent 4x${inputSize}x${inputSize}, ${o.concurrency} requests in flight, ${o.steps} steps each`,
  );
  const cluster = await startCluster({
    variant,
    modelDir,
    model,
    denoisers: o.denoisers,
    denoiserArgs: ['--simulate', o.simulate],
    schedulerArgs: ['--max-samples-in-flight', String(Math.max(256, o.concurrency))],
    schedulerNodeArgs: o.cpuProf ? ['--cpu-prof', `--cpu-prof-dir=${join(o.cpuProf, `scheduler-${inputSize}`)}`] : [],
    firstDenoiserNodeArgs: o.cpuProf ? ['--cpu-prof', `--cpu-prof-dir=${join(o.cpuProf, `denoiser-${inputSize}`)}`] : [],
  });
  const api = new SamplerApi(cluster.address);
  let stop = false;
  let completed = 0;
  let failed = 0;
  let firstError = '';
  try {
    const clients = Array.from({ length: o.concurrency }, async (_, c) => {
      for (let k = 0; !stop; k++) {
        try {
          await api.generate({
            model,
            classLabels: [{ index: (c + k) % 1000 }],
            numSteps: o.steps,
            sampler: SamplerKind.SAMPLER_KIND_DDIM,
            cfgScale: o.cfg,
            seed: BigInt(c * 100_000 + k),
            outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
          });
          completed++;
        } catch (err) {
          failed++;
          firstError ||= err instanceof Error ? err.message : String(err);
        }
      }
    });
    await new Promise((r) => setTimeout(r, o.warmupSeconds * 1000));
    const pids: Record<string, Array<number | undefined>> = {
      scheduler: [cluster.scheduler.proc.pid],
      denoisers: cluster.denoisers.map((d) => d.proc.pid),
      nats: [cluster.nats.pid],
      client: [process.pid],
    };
    const cpu = (): Record<string, [number, number]> =>
      Object.fromEntries(
        Object.entries(pids).map(([k, ps]) => [
          k,
          ps.reduce<[number, number]>(
            (a, p) => {
              const [u, sy] = cpuSeconds(p);
              return [a[0] + u, a[1] + sy];
            },
            [0, 0],
          ),
        ]),
      );
    const m0 = await cluster.scheduler.metrics();
    const c0 = cpu();
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, o.seconds * 1000));
    const m1 = await cluster.scheduler.metrics();
    const c1 = cpu();
    const seconds = (performance.now() - t0) / 1000;
    stop = true;
    await Promise.all(clients);
    const steps = metric(m1, 'ditpipe_steps_dispatched_total') - metric(m0, 'ditpipe_steps_dispatched_total');
    const stepsPerS = steps / seconds;
    const requests = metric(m1, 'ditpipe_request_seconds_count') - metric(m0, 'ditpipe_request_seconds_count');
    const latency = (metric(m1, 'ditpipe_request_seconds_sum') - metric(m0, 'ditpipe_request_seconds_sum')) / requests;
    const busy = (k: string): number => (c1[k][0] + c1[k][1] - c0[k][0] - c0[k][1]) / seconds;
    const cpuShare = Object.fromEntries(Object.keys(c0).map((k) => [k, round(busy(k), 2)]));
    const sysShare = Object.fromEntries(Object.keys(c0).map((k) => [k, round((c1[k][1] - c0[k][1]) / seconds, 2)]));
    const res = {
      variant: variant.name,
      latent: `4x${inputSize}x${inputSize}`,
      steps_per_s: Math.round(stepsPerS),
      target: 5000,
      met: stepsPerS >= 5000,
      window_s: round(seconds, 2),
      requests_completed_in_window: requests,
      mean_request_latency_s: requests > 0 ? round(latency, 3) : null,
      scheduler_us_cpu_per_step: round(((busy('scheduler') * seconds) / steps) * 1e6, 1),
      denoisers_us_cpu_per_step: round(((busy('denoisers') * seconds) / steps) * 1e6, 1),
      nats_us_cpu_per_step: round(((busy('nats') * seconds) / steps) * 1e6, 1),
      // The transport's own cost: everything but the client (the simulated denoisers compute nothing).
      total_us_cpu_per_step: round((((busy('scheduler') + busy('denoisers') + busy('nats')) * seconds) / steps) * 1e6, 1),
      // Cores each part kept busy during the window (1.0 = one core); the machine has machine().nproc.
      cpu_cores_busy: cpuShare,
      // Of which in the kernel (system time).
      cpu_cores_busy_sys: sysShare,
      requests_completed_total: completed,
      requests_failed: failed,
      ...(firstError ? { first_error: firstError } : {}),
    };
    log(
      `capacity (${variant.name}): ${res.steps_per_s} steps/s (µs CPU/step: scheduler ${res.scheduler_us_cpu_per_step}, denoisers ${res.denoisers_us_cpu_per_step}, nats ${res.nats_us_cpu_per_step}; cores busy ${JSON.stringify(cpuShare)})`,
    );
    return res;
  } finally {
    stop = true;
    api.close();
    await cluster.stop();
  }
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

/** Self time by function of the newest V8 .cpuprofile in `dir`, most expensive first. */
export function profileTop(dir: string, top = 20): { file: string; functions: Array<{ fn: string; self_pct: number }> } {
  // CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile: thread 0 is the main thread (others are tsx's loader).
  const files = readdirSync(dir).filter((f) => /\.\d+\.0\.\d+\.cpuprofile$/.test(f));
  if (files.length === 0) throw new Error(`no .cpuprofile in ${dir}`);
  const file = join(dir, files.sort((a, b) => statSync(join(dir, b)).mtimeMs - statSync(join(dir, a)).mtimeMs)[0]);
  const prof = JSON.parse(readFileSync(file, 'utf8')) as { nodes: ProfileNode[] };
  const self = new Map<string, number>();
  let total = 0;
  for (const n of prof.nodes) {
    const hits = n.hitCount ?? 0;
    const f = n.callFrame;
    const key = `${f.functionName || '(anonymous)'} ${f.url ? `${basename(f.url)}:${f.lineNumber + 1}` : ''}`.trim();
    self.set(key, (self.get(key) ?? 0) + hits);
    total += hits;
  }
  const functions = [...self.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([fn, hits]) => ({ fn, self_pct: round((100 * hits) / total, 1) }));
  return { file, functions };
}

export async function runCapacity(o: CapacityOptions): Promise<Record<string, unknown>> {
  const cases: Array<Record<string, unknown>> = [];
  for (const size of o.inputSizes) {
    for (let rep = 0; rep < o.reps; rep++) {
      for (const variant of o.variants) {
        const c = await runOne(o, size, variant);
        if (o.cpuProf) {
          c.scheduler_profile = profileTop(join(o.cpuProf, `scheduler-${size}`));
          c.denoiser0_profile = profileTop(join(o.cpuProf, `denoiser-${size}`));
        }
        cases.push({ rep, ...c });
      }
    }
  }
  return {
    bench: 'capacity',
    denoisers: o.denoisers,
    simulate: o.simulate,
    concurrency: o.concurrency,
    steps: o.steps,
    sampler: 'ddim',
    cfg: o.cfg,
    machine: machine(),
    cases,
  };
}

export function capacityOptions(argv: string[]): CapacityOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      denoisers: { type: 'string', default: '16' },
      concurrency: { type: 'string', default: '256' },
      steps: { type: 'string', default: '50' },
      simulate: { type: 'string', default: '0+0' },
      'input-size': { type: 'string', default: '8,32' },
      warmup: { type: 'string', default: '3' },
      seconds: { type: 'string', default: '10' },
      cfg: { type: 'string', default: '4' },
      'cpu-prof': { type: 'string' },
      variants: { type: 'string', default: 'pull' },
      baseline: { type: 'string', default: '9258ea3' },
      reps: { type: 'string', default: '1' },
    },
  });
  return {
    denoisers: Number(values.denoisers),
    concurrency: Number(values.concurrency),
    steps: Number(values.steps),
    simulate: values.simulate,
    inputSizes: values['input-size'].split(',').map(Number),
    warmupSeconds: Number(values.warmup),
    seconds: Number(values.seconds),
    cfg: Number(values.cfg),
    cpuProf: values['cpu-prof'],
    variants: variantsFrom(values.variants, values.baseline),
    reps: Number(values.reps),
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify(await runCapacity(capacityOptions(process.argv.slice(2))), null, 2));
}
