// Step batching: images/s through the real pipeline (scheduler and one denoiser as separate
// processes over a real nats-server, raw-latent output) with 1, 4 and 16 concurrent clients, each
// sending one-image requests back to back, and the mean rows per forward pass from the denoiser's
// /metrics (ditpipe_denoiser_forward_rows_total / ditpipe_denoiser_batch_rows_count).
//
//   node --import tsx bench/pipeline/batching.ts [--concurrency 1,4,16] [--steps 50] [--threads 2]
//     [--seconds 20] [--preset DiT-S/8] [--input-size 32] [--cfg 4]
//
// Each level runs until `--seconds` have passed and every request started by then has finished, so
// every level completes at least one full round of requests. Prints one JSON object on stdout.
import { parseArgs } from 'node:util';
import { SamplerApi } from '../../shared/client.ts';
import { OutputFormat, SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { readDitModelDir } from '../../shared/model/modeldir.ts';
import { benchModel, log, machine, metric, round, startCluster, type Metrics } from './cluster.ts';

export interface BatchingOptions {
  concurrency: number[];
  steps: number;
  threads: number;
  seconds: number;
  preset: string;
  inputSize: number;
  cfg: number;
}

export async function runBatching(o: BatchingOptions): Promise<Record<string, unknown>> {
  const { dir: modelDir, name: model } = benchModel(o.preset, o.inputSize);
  const meta = readDitModelDir(modelDir).meta;
  log(`batching: ${model} (${meta.gflops.toFixed(3)} Gflops/row), ${o.steps} steps, cfg ${o.cfg}, ${o.threads} intra-op threads`);
  const cluster = await startCluster({ modelDir, model, denoisers: 1, denoiserArgs: ['--threads', String(o.threads)] });
  const api = new SamplerApi(cluster.address);
  const gen = (i: number, steps: number) =>
    api.generate({
      model,
      classLabels: [{ index: (i * 37) % meta.config.num_classes }],
      numSteps: steps,
      sampler: SamplerKind.SAMPLER_KIND_DDIM,
      cfgScale: o.cfg,
      seed: BigInt(i),
      outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
    });
  const levels: Array<Record<string, unknown>> = [];
  try {
    await Promise.all(Array.from({ length: Math.max(...o.concurrency) }, (_, i) => gen(i, 1))); // warm-up
    for (const n of o.concurrency) {
      const before: Metrics = await cluster.denoisers[0].metrics();
      const t0 = performance.now();
      const end = t0 + o.seconds * 1000;
      let images = 0;
      let latencyMs = 0;
      await Promise.all(
        Array.from({ length: n }, async (_, client) => {
          for (let k = 0; performance.now() < end; k++) {
            const s = performance.now();
            const res = await gen(client * 1000 + k, o.steps);
            latencyMs += performance.now() - s;
            images += res.images.length;
          }
        }),
      );
      const seconds = (performance.now() - t0) / 1000;
      const after = await cluster.denoisers[0].metrics();
      const d = (name: string): number => metric(after, name) - metric(before, name);
      const passes = d('ditpipe_denoiser_batch_rows_count');
      const level = {
        concurrency: n,
        images,
        seconds: round(seconds, 2),
        images_per_s: round(images / seconds, 4),
        mean_latency_s: round(latencyMs / images / 1000, 2),
        mean_batch_rows: round(d('ditpipe_denoiser_forward_rows_total') / passes, 2),
        max_rows_possible: n * (o.cfg === 1 ? 1 : 2),
        forward_passes: passes,
        mean_forward_ms: round((d('ditpipe_denoiser_forward_seconds_sum') * 1000) / passes, 1),
        mean_queue_wait_ms: round(
          (d('ditpipe_denoiser_queue_wait_seconds_sum') * 1000) / d('ditpipe_denoiser_queue_wait_seconds_count'),
          1,
        ),
      };
      log(
        `batching: ${n} concurrent: ${level.images_per_s} images/s, ${level.mean_batch_rows} rows per pass (${images} images in ${level.seconds} s)`,
      );
      levels.push(level);
    }
  } finally {
    api.close();
    await cluster.stop();
  }
  const base = levels[0]?.images_per_s as number;
  for (const l of levels) l.speedup_vs_first = round((l.images_per_s as number) / base, 2);
  return {
    bench: 'batching',
    model,
    preset: o.preset,
    latent: `${meta.config.in_channels}x${o.inputSize}x${o.inputSize}`,
    gflops_per_row: meta.gflops,
    sampler: 'ddim',
    steps: o.steps,
    cfg: o.cfg,
    threads: o.threads,
    machine: machine(),
    levels,
  };
}

export function batchingOptions(argv: string[]): BatchingOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      concurrency: { type: 'string', default: '1,4,16' },
      steps: { type: 'string', default: '50' },
      threads: { type: 'string', default: '2' },
      seconds: { type: 'string', default: '20' },
      preset: { type: 'string', default: 'DiT-S/8' },
      'input-size': { type: 'string', default: '32' },
      cfg: { type: 'string', default: '4' },
    },
  });
  return {
    concurrency: values.concurrency.split(',').map(Number),
    steps: Number(values.steps),
    threads: Number(values.threads),
    seconds: Number(values.seconds),
    preset: values.preset,
    inputSize: Number(values['input-size']),
    cfg: Number(values.cfg),
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify(await runBatching(batchingOptions(process.argv.slice(2))), null, 2));
}
