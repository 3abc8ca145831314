// Step caching: images/s and Gflops per image through the real pipeline (scheduler and one
// denoiser as separate processes over a real nats-server, raw-latent output) for each step-cache
// preset, against the uncached run at the same steps, against an uncached run with fewer steps at
// the same compute, and with cached and uncached requests sharing the denoiser's passes. Models:
// the bundled Fashion-MNIST DiT and DiT-S/2 at latent 32 (256×256 images; random weights, so only
// its speed means anything).
//
//   npm run bench -- step-cache [--models fashion,DiT-S/2] [--steps 50] [--cfg 1.5]
//     [--images 400] [--images-large 16] [--batch 8] [--concurrency 4] [--threads 2]
//
// Quality of the same settings is measured by models/fashion-mnist/eval.sh (BENCHMARKS.md §8).
// Prints one JSON object on stdout.
import { parseArgs } from 'node:util';
import { ensureDefaultModels } from '../../cli/default-model.ts';
import { SamplerApi } from '../../shared/client.ts';
import { StepCacheOptions } from '../../shared/gen/ditpipe/v1/common.ts';
import { CachePolicy, OutputFormat, SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { readDitModelDir } from '../../shared/model/modeldir.ts';
import { STEP_CACHE_PRESET_NAMES } from '../../shared/step-cache.ts';
import { benchModel, log, machine, metric, metricWhere, round, startCluster } from './cluster.ts';

export interface StepCacheBenchOptions {
  models: string[];
  steps: number;
  cfg: number;
  images: number;
  imagesLarge: number;
  batch: number;
  concurrency: number;
  threads: number;
}

interface Run {
  setting: string;
  steps: number;
  images: number;
  seconds: number;
  images_per_s: number;
  gflops_per_image: number;
  /** Denoise calls of the run that reused the cache, of those with step caching. */
  cached_calls?: number;
  step_cache_calls?: number;
  /** images/s against the uncached run at the full steps. */
  speedup?: number;
  /** Mixed run: the seconds its two halves would take, each at its own rate alone, and the ratio to that. */
  expected_seconds_alone?: number;
  mix_cost?: number;
}

export async function runStepCacheBench(o: StepCacheBenchOptions): Promise<Record<string, unknown>> {
  const results: Array<Record<string, unknown>> = [];
  for (const which of o.models) {
    const large = which !== 'fashion';
    const { dir: modelDir, name: model } = large
      ? benchModel(which, 32)
      : { dir: ensureDefaultModels({ log }).ditDir, name: 'fashion-mnist' };
    const meta = readDitModelDir(modelDir).meta;
    if (!meta.cacheGraphs) throw new Error(`${modelDir} has no step-cache graphs: rebuild it (ditpipe model build dit)`);
    const total = large ? o.imagesLarge : o.images;
    log(`step-cache: ${model} (${meta.gflops.toFixed(3)} Gflops/row), ${total} images per setting, ${o.steps} DDIM steps, cfg ${o.cfg}`);
    const cluster = await startCluster({ modelDir, model, denoisers: 1, denoiserArgs: ['--threads', String(o.threads)] });
    const api = new SamplerApi(cluster.address);
    const gen = (first: number, steps: number, preset: string | undefined) =>
      api.generate({
        model,
        classLabels: Array.from({ length: Math.min(o.batch, total - first) }, (_, k) => ({ index: (first + k) % meta.config.num_classes })),
        numSteps: steps,
        sampler: SamplerKind.SAMPLER_KIND_DDIM,
        cfgScale: o.cfg,
        seed: BigInt(first),
        outputFormat: OutputFormat.OUTPUT_FORMAT_RAW_LATENT,
        cachePolicy: CachePolicy.CACHE_POLICY_BYPASS,
        stepCache: preset === undefined ? undefined : StepCacheOptions.fromPartial({ preset }),
      });
    /** `total` images in requests of `batch`, `concurrency` in flight; `presetOf(i)` picks request i's setting. */
    const run = async (setting: string, steps: number, presetOf: (i: number) => string | undefined): Promise<Run> => {
      const before = await cluster.scheduler.metrics();
      const t0 = performance.now();
      let next = 0;
      let gflops = 0;
      let images = 0;
      await Promise.all(
        Array.from({ length: o.concurrency }, async () => {
          while (next < total) {
            const first = next;
            next += o.batch;
            const res = await gen(first, steps, presetOf(first / o.batch));
            gflops += res.samplingGflops;
            images += res.images.length;
          }
        }),
      );
      const seconds = (performance.now() - t0) / 1000;
      const after = await cluster.scheduler.metrics();
      const d = (name: string): number => metric(after, name) - metric(before, name);
      const dWhere = (name: string, labels: RegExp): number => metricWhere(after, name, labels) - metricWhere(before, name, labels);
      const r: Run = {
        setting,
        steps,
        images,
        seconds: round(seconds, 2),
        images_per_s: round(images / seconds, 3),
        gflops_per_image: round(gflops / images, 3),
      };
      const calls = d('ditpipe_scheduler_step_cache_calls_total');
      if (calls > 0) {
        r.step_cache_calls = calls;
        r.cached_calls = dWhere('ditpipe_scheduler_step_cache_calls_total', /outcome="cached"/);
      }
      log(`step-cache: ${model} ${setting} (${steps} steps): ${r.images_per_s} images/s, ${r.gflops_per_image} Gflops/image`);
      return r;
    };
    const runs: Run[] = [];
    try {
      await gen(0, 2, STEP_CACHE_PRESET_NAMES[0]); // warm-up: sessions, queues
      const none = await run('none', o.steps, () => undefined);
      runs.push(none);
      for (const preset of STEP_CACHE_PRESET_NAMES) {
        const p = await run(preset, o.steps, () => preset);
        // Fewer steps, uncached, at the same compute per image.
        const fewer = Math.max(1, Math.round((o.steps * p.gflops_per_image) / none.gflops_per_image));
        const f = await run(`none (equal compute to ${preset})`, fewer, () => undefined);
        runs.push(
          { ...p, speedup: round(p.images_per_s / none.images_per_s, 2) },
          { ...f, speedup: round(f.images_per_s / none.images_per_s, 2) },
        );
      }
      // Cached and uncached requests in the same passes: every other request uses interval-2.
      const i2 = runs.find((r) => r.setting === 'interval-2')!;
      const mixed = await run('mixed: none + interval-2, alternating', o.steps, (i) => (i % 2 === 0 ? undefined : 'interval-2'));
      // What the mix would take if each half ran alone at its own rate.
      const alone = mixed.images / 2 / none.images_per_s + mixed.images / 2 / i2.images_per_s;
      runs.push({ ...mixed, expected_seconds_alone: round(alone, 2), mix_cost: round(mixed.seconds / alone, 3) });
    } finally {
      api.close();
      await cluster.stop();
    }
    results.push({
      model,
      latent: `${meta.config.in_channels}x${meta.config.input_size}x${meta.config.input_size}`,
      gflops_full_row: meta.gflops,
      gflops_cached_row: round(meta.cacheGraphs.head.gflops + meta.cacheGraphs.skip.gflops, 4),
      runs,
    });
  }
  return {
    bench: 'step-cache',
    sampler: 'ddim',
    steps: o.steps,
    cfg: o.cfg,
    batch: o.batch,
    concurrency: o.concurrency,
    threads: o.threads,
    machine: machine(),
    models: results,
  };
}

export function stepCacheBenchOptions(argv: string[]): StepCacheBenchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      models: { type: 'string', default: 'fashion,DiT-S/2' },
      steps: { type: 'string', default: '50' },
      cfg: { type: 'string', default: '1.5' },
      images: { type: 'string', default: '400' },
      'images-large': { type: 'string', default: '16' },
      batch: { type: 'string', default: '8' },
      concurrency: { type: 'string', default: '4' },
      threads: { type: 'string', default: '2' },
    },
  });
  return {
    models: values.models.split(','),
    steps: Number(values.steps),
    cfg: Number(values.cfg),
    images: Number(values.images),
    imagesLarge: Number(values['images-large']),
    batch: Number(values.batch),
    concurrency: Number(values.concurrency),
    threads: Number(values.threads),
  };
}
