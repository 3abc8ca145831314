// Orchestration overhead: the same model, steps and requests through the real pipeline (gRPC client
// → scheduler process → NATS → denoiser process, raw-latent output so no decoding) versus a plain
// loop in this process calling onnxruntime directly with the same state machine and guidance code.
// For N concurrent requests the direct loop batches the N requests' steps into one forward, as the
// denoiser would at best. Both sides use the same intra-op thread count.
//
//   node --import tsx bench/pipeline/overhead.ts [--concurrency 1,8] [--steps 50] [--threads 2]
//     [--reps 2] [--reps-large 1] [--preset DiT-S/2] [--input-size 32] [--cfg 4]
//
// Prints one JSON object on stdout. The machine is shared, so forward times drift between runs;
// runs alternate direct/pipeline and the JSON also gives each side's time outside forward passes.
import * as ort from 'onnxruntime-node';
import { parseArgs } from 'node:util';
import { SamplerApi } from '../../shared/client.ts';
import {
  advance,
  combineGuidance,
  guidanceRows,
  modelOutChannels,
  next,
  packGuidedRows,
  result,
  start,
  type SamplerState,
} from '../../shared/diffusion/index.ts';
import { OutputFormat, SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { readDitModelDir } from '../../shared/model/modeldir.ts';
import { readF32Tensor } from '../../shared/tensor.ts';
import { benchModel, log, machine, metric, round, startCluster, type Cluster } from './cluster.ts';

export interface OverheadOptions {
  concurrency: number[];
  steps: number;
  threads: number;
  /** Repetitions per side for concurrency 1 (and other small cases). */
  reps: number;
  /** Repetitions per side for concurrency ≥ 8 (long on a CPU). */
  repsLarge: number;
  preset: string;
  inputSize: number;
  cfg: number;
}

interface RunTimes {
  wallMs: number;
  /** Time inside forward passes (direct: around session.run; pipeline: the denoiser's histogram sum). */
  forwardMs: number;
  passes: number;
}

const SEED = 1234n;
const label = (i: number): number => (i * 37) % 1000;

/** The plain loop: N requests in lockstep, one forward of [cond; uncond] rows per request per step. */
async function directRun(
  session: ort.InferenceSession,
  dir: ReturnType<typeof readDitModelDir>,
  n: number,
  o: OverheadOptions,
): Promise<RunTimes & { latents: Float32Array[] }> {
  const c = dir.meta.config;
  const plane = c.input_size * c.input_size;
  const rowSize = c.in_channels * plane;
  const outCh = modelOutChannels(c.in_channels, c.learn_sigma);
  const outRow = outCh * plane;
  const per = guidanceRows(1, o.cfg);
  const t0 = performance.now();
  const states: SamplerState[] = Array.from({ length: n }, (_, i) =>
    start({
      sampler: 'ddim',
      numSteps: o.steps,
      shape: [c.in_channels, c.input_size, c.input_size],
      count: 1,
      learnSigma: c.learn_sigma,
      seed: SEED + BigInt(i),
    }),
  );
  let forwardMs = 0;
  let passes = 0;
  for (;;) {
    const pending = states.map((s) => next(s));
    if (pending[0] === null) break;
    const rows = n * per;
    const x = new Float32Array(rows * rowSize);
    const t = new BigInt64Array(rows);
    const y = new BigInt64Array(rows);
    // Each request's own [cond; uncond] pair, as combineGuidance reads it below.
    let r = 0;
    pending.forEach((p, i) => {
      r += packGuidedRows({ x, t, y }, r, { x: p!.x, t: [BigInt(p!.timestep)], y: [label(i)], n: 1 }, o.cfg, c.num_classes);
    });
    const f0 = performance.now();
    const out = await session.run({
      x: new ort.Tensor('float32', x, [rows, c.in_channels, c.input_size, c.input_size]),
      t: new ort.Tensor('int64', t, [rows]),
      y: new ort.Tensor('int64', y, [rows]),
    });
    forwardMs += performance.now() - f0;
    passes++;
    const data = out.out.data as Float32Array;
    states.forEach((s, i) => {
      const guided = combineGuidance(data.subarray(i * per * outRow, (i + 1) * per * outRow), {
        rows: 1,
        outChannels: outCh,
        inChannels: c.in_channels,
        plane,
        scale: o.cfg,
        channels: 3,
      });
      advance(s, guided);
    });
  }
  const latents = states.map((s) => result(s).slice());
  return { wallMs: performance.now() - t0, forwardMs, passes, latents };
}

async function pipelineRun(
  api: SamplerApi,
  cluster: Cluster,
  model: string,
  n: number,
  o: OverheadOptions,
  steps = o.steps,
): Promise<RunTimes & { latents: Float32Array[] }> {
  const before = await cluster.denoisers[0].metrics();
  const t0 = performance.now();
  const res = await Promise.all(
    Array.from({ length: n }, (_, i) =>
      api.generate({
        model,
        classLabels: [{ index: label(i) }],
        numSteps: steps,
        sampler: SamplerKind.SAMPLER_KIND_DDIM,
        cfgScale: o.cfg,
        seed: SEED + BigInt(i),
        outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
      }),
    ),
  );
  const wallMs = performance.now() - t0;
  const after = await cluster.denoisers[0].metrics();
  const d = (name: string): number => metric(after, name) - metric(before, name);
  const latents = res.map((r) => readF32Tensor(r.images[0].latent, 'latent', [null, null, null]).data);
  return {
    wallMs,
    forwardMs: d('ditpipe_denoiser_forward_seconds_sum') * 1000,
    passes: d('ditpipe_denoiser_forward_seconds_count'),
    latents,
  };
}

function maxAbsDiff(a: Float32Array[], b: Float32Array[]): number {
  let m = 0;
  a.forEach((x, i) => {
    for (let j = 0; j < x.length; j++) m = Math.max(m, Math.abs(x[j] - b[i][j]));
  });
  return m;
}

const summary = (r: RunTimes) => ({
  wall_s: round(r.wallMs / 1000),
  forward_s: round(r.forwardMs / 1000),
  outside_forward_s: round((r.wallMs - r.forwardMs) / 1000),
  passes: r.passes,
});

export async function runOverhead(o: OverheadOptions): Promise<Record<string, unknown>> {
  const { dir: modelDir, name: model } = benchModel(o.preset, o.inputSize);
  const dir = readDitModelDir(modelDir);
  log(`overhead: ${model} (${dir.meta.gflops.toFixed(3)} Gflops/row), ${o.steps} steps, cfg ${o.cfg}, ${o.threads} intra-op threads`);
  const session = await ort.InferenceSession.create(dir.onnxPath, {
    intraOpNumThreads: o.threads,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
  });
  const cluster = await startCluster({ modelDir, model, denoisers: 1, denoiserArgs: ['--threads', String(o.threads)] });
  const api = new SamplerApi(cluster.address);
  const cases: Array<Record<string, unknown>> = [];
  try {
    for (const n of o.concurrency) {
      const reps = n >= 8 ? o.repsLarge : o.reps;
      // Warm-up at this batch shape on both sides (first runs allocate arenas, JIT the loops).
      await directRun(session, dir, n, { ...o, steps: 1 });
      await pipelineRun(api, cluster, model, n, o, 1);
      const direct: RunTimes[] = [];
      const pipe: RunTimes[] = [];
      let diff = 0;
      for (let rep = 0; rep < reps; rep++) {
        // Alternate the order so drifting load on the shared machine hits both sides alike.
        const order = rep % 2 === 0 ? ['direct', 'pipeline'] : ['pipeline', 'direct'];
        let d: Awaited<ReturnType<typeof directRun>> | undefined;
        let p: Awaited<ReturnType<typeof pipelineRun>> | undefined;
        for (const side of order) {
          if (side === 'direct') d = await directRun(session, dir, n, o);
          else p = await pipelineRun(api, cluster, model, n, o);
          const r = (side === 'direct' ? d : p)!;
          log(
            `overhead: ${n} request(s), rep ${rep + 1}/${reps}, ${side}: ${(r.wallMs / 1000).toFixed(1)} s wall, ${(r.forwardMs / 1000).toFixed(1)} s in ${r.passes} forward passes`,
          );
        }
        direct.push(d!);
        pipe.push(p!);
        diff = Math.max(diff, maxAbsDiff(d!.latents, p!.latents));
      }
      const sum = (rs: RunTimes[], k: keyof RunTimes): number => rs.reduce((a, r) => a + r[k], 0);
      const dWall = sum(direct, 'wallMs');
      const pWall = sum(pipe, 'wallMs');
      const dOut = dWall - sum(direct, 'forwardMs');
      const pOut = pWall - sum(pipe, 'forwardMs');
      const target = n === 1 ? 1.1 : 1.05;
      const ratio = pWall / dWall;
      cases.push({
        requests: n,
        rows_per_step: n * guidanceRows(1, o.cfg),
        reps,
        ratio: round(ratio),
        target,
        met: ratio <= target,
        // Wall-time ratio had both sides spent the same time in forward passes: isolates orchestration from load drift.
        ratio_same_forward: round((dWall + (pOut - dOut)) / dWall),
        pipeline_extra_per_step_ms: round((pOut - dOut) / reps / o.steps, 2),
        latent_max_abs_diff: diff,
        direct: direct.map(summary),
        pipeline: pipe.map(summary),
      });
    }
  } finally {
    api.close();
    await cluster.stop();
    await session.release();
  }
  return {
    bench: 'overhead',
    model,
    preset: o.preset,
    latent: `${dir.meta.config.in_channels}x${o.inputSize}x${o.inputSize}`,
    gflops_per_row: dir.meta.gflops,
    sampler: 'ddim',
    steps: o.steps,
    cfg: o.cfg,
    threads: o.threads,
    machine: machine(),
    cases,
  };
}

export function overheadOptions(argv: string[]): OverheadOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      concurrency: { type: 'string', default: '1,8' },
      steps: { type: 'string', default: '50' },
      threads: { type: 'string', default: '2' },
      reps: { type: 'string', default: '2' },
      'reps-large': { type: 'string', default: '1' },
      preset: { type: 'string', default: 'DiT-S/2' },
      'input-size': { type: 'string', default: '32' },
      cfg: { type: 'string', default: '4' },
    },
  });
  return {
    concurrency: values.concurrency.split(',').map(Number),
    steps: Number(values.steps),
    threads: Number(values.threads),
    reps: Number(values.reps),
    repsLarge: Number(values['reps-large']),
    preset: values.preset,
    inputSize: Number(values['input-size']),
    cfg: Number(values.cfg),
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify(await runOverhead(overheadOptions(process.argv.slice(2))), null, 2));
}
