// Generates the evaluation sets through ditpipe itself: a running scheduler (gRPC, real services),
// one set per sampler configuration, balanced over the 10 classes, each written as
// <out>/<config>.safetensors with `images` U8 [N, 28, 28] (as served: the VAE's model directory
// crops the 2-px padding it was trained with) and `labels` I64 [N], for eval.py to score. A set already
// written with the same size is kept, so a long run that stops can be started again.
//
//   node --import tsx models/fashion-mnist/eval_generate.ts --server 127.0.0.1:50051 --per-class 1000 --out models/fashion-mnist/runs/eval
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { SingleBar } from 'cli-progress';
import { SamplerApi } from '../../shared/client.ts';
import { SAMPLER_NAMES, samplerByName } from '../../shared/diffusion/sampler/registry.ts';
import { StepCacheOptions } from '../../shared/gen/ditpipe/v1/common.ts';
import { CachePolicy, type SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { STEP_CACHE_PRESET_NAMES } from '../../shared/step-cache.ts';
import { SAMPLER_KINDS } from '../../shared/sampler-kinds.ts';
import { decodePng } from '../../shared/image/png.ts';
import { openSafetensors, writeSafetensors } from '../../shared/weights/index.ts';

const { values } = parseArgs({
  options: {
    server: { type: 'string', default: '127.0.0.1:50051' },
    model: { type: 'string', default: 'fashion-mnist' },
    'per-class': { type: 'string', default: '1000' },
    configs: { type: 'string', default: 'ddpm250-cfg1,ddpm250-cfg1.5,ddpm250-cfg4,ddim50-cfg1,ddim50-cfg1.5,ddim50-cfg4' },
    batch: { type: 'string', default: '50' },
    'in-flight': { type: 'string', default: '5' }, // 5 × 50 images stays under the scheduler's default admission limit (256)
    seed: { type: 'string', default: '1000' },
    out: { type: 'string', default: 'models/fashion-mnist/runs/eval' },
  },
});

const perClass = Number(values['per-class']);
const batch = Number(values.batch);
const inFlight = Number(values['in-flight']);
const SIZE = 28;

interface Config {
  name: string;
  sampler: SamplerKind;
  steps: number;
  cfg: number;
  /** A step-cache preset (GenerateRequest.step_cache), or none. */
  stepCache: string | undefined;
}

function parseConfig(name: string): Config {
  const m = /^([a-z-]+?)(\d+)-cfg([\d.]+)(?:\+([a-z0-9.-]+))?$/.exec(name);
  const def = m ? samplerByName(m[1]) : undefined;
  if (!m || !def) {
    throw new Error(
      `config "${name}": expected <sampler><steps>-cfg<scale>[+<step-cache preset>], e.g. ddpm250-cfg4 or ddim50-cfg1.5+interval-2 (samplers: ${SAMPLER_NAMES.join(', ')}; presets: ${STEP_CACHE_PRESET_NAMES.join(', ')})`,
    );
  }
  if (m[4] !== undefined && !STEP_CACHE_PRESET_NAMES.includes(m[4])) {
    throw new Error(`config "${name}": unknown step-cache preset "${m[4]}" (presets: ${STEP_CACHE_PRESET_NAMES.join(', ')})`);
  }
  const sampler = SAMPLER_KINDS[def.name];
  return { name, sampler, steps: Number(m[2]), cfg: Number(m[3]), stepCache: m[4] };
}

function keptSize(path: string): number {
  const f = openSafetensors(path);
  try {
    return f.info('images').shape[0];
  } finally {
    f.close();
  }
}

const api = new SamplerApi(values.server);
mkdirSync(values.out, { recursive: true });
for (const cfg of values.configs.split(',').map(parseConfig)) {
  const total = perClass * 10;
  const path = join(values.out, `${cfg.name}.safetensors`);
  if (existsSync(path) && keptSize(path) === total) {
    process.stderr.write(`${cfg.name}: ${path} already holds ${total} images; kept\n`);
    continue;
  }
  const labels = Array.from({ length: total }, (_, i) => i % 10);
  const images = new Uint8Array(total * SIZE * SIZE);
  const started = Date.now();
  let done = 0;
  let gflops = 0;
  // On a terminal the bar redraws in place; in a log (eval.sh is usually run in the background)
  // it writes one line every 30 s.
  const bar = new SingleBar({
    format: `${cfg.name} [{bar}] {value}/{total} images | {duration}s`,
    hideCursor: true,
    noTTYOutput: true,
    notTTYSchedule: 30_000,
    stream: process.stderr,
  });
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < total) {
      const first = next;
      next = Math.min(total, next + batch);
      const res = await api.generate({
        model: values.model,
        classLabels: labels.slice(first, next).map((index) => ({ index })),
        sampler: cfg.sampler,
        numSteps: cfg.steps,
        cfgScale: cfg.cfg,
        // One seed per batch, so every image of the set has its own noise stream.
        seed: BigInt(values.seed) * 1_000_000n + BigInt(first),
        // Every image sampled: the speed figures are of sampling, never of the repeat cache.
        cachePolicy: CachePolicy.CACHE_POLICY_BYPASS,
        stepCache: cfg.stepCache === undefined ? undefined : StepCacheOptions.fromPartial({ preset: cfg.stepCache }),
      });
      gflops += res.samplingGflops;
      res.images.forEach((img, k) => {
        const px = decodePng(img.png);
        if (px.channels !== 1 || px.width !== SIZE || px.height !== SIZE) {
          throw new Error(`expected ${SIZE}×${SIZE} grayscale (a VAE built from vae.json crops its padding), got ${px.width}×${px.height}×${px.channels}`);
        }
        images.set(px.data, (first + k) * SIZE * SIZE);
      });
      done += res.images.length;
      bar.update(done);
    }
  };
  bar.start(total, 0);
  try {
    await Promise.all(Array.from({ length: inFlight }, worker));
  } finally {
    bar.stop();
  }
  const seconds = (Date.now() - started) / 1000;
  process.stderr.write(`${cfg.name}: ${(total / seconds).toFixed(1)} images/s, ${(gflops / total).toFixed(3)} Gflops per image\n`);
  writeSafetensors(path, [
    { name: 'images', dtype: 'U8', shape: [total, SIZE, SIZE], data: images },
    { name: 'labels', dtype: 'I64', shape: [total], data: BigInt64Array.from(labels, (l) => BigInt(l)) },
  ], {
    config: cfg.name,
    steps: String(cfg.steps),
    cfg: String(cfg.cfg),
    step_cache: cfg.stepCache ?? 'none',
    seconds: String(seconds),
    images_per_second: String(total / seconds),
    gflops_per_image: String(gflops / total),
  });
}
api.close();
