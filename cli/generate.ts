// `ditpipe generate`: asks a running scheduler for images over gRPC, shows progress, writes the
// PNGs and a labelled grid.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SingleBar } from 'cli-progress';
import { Command, Option } from 'commander';
import { checkAddress, SamplerApi } from '../shared/client.ts';
import { GuidanceChannels } from '../shared/gen/ditpipe/v1/common.ts';
import { SamplerKind, type ClassLabel, type GenerateEvent, type GenerateRequest, type Image } from '../shared/gen/ditpipe/v1/sampler.ts';
import { labelledGrid } from '../shared/image/grid.ts';
import { addGrpcClientOptions, clientOptionsFromFlags, intArg, numberArg, type GrpcClientFlags } from './common.ts';

export const SAMPLER_FLAGS: Record<string, SamplerKind> = {
  ddpm: SamplerKind.SAMPLER_KIND_DDPM,
  ddim: SamplerKind.SAMPLER_KIND_DDIM,
  dpmpp: SamplerKind.SAMPLER_KIND_DPM_SOLVER_PP,
};

/** "3,Sandal,7" → labels by index or name. */
export function parseClasses(v: string): ClassLabel[] {
  return v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => (/^\d+$/.test(s) ? { index: Number(s) } : { name: s }));
}

function fileSafe(s: string): string {
  return s.replace(/[^A-Za-z0-9_-]+/g, '_');
}

export interface GenerateToDirOptions {
  /** The events of a request: a SamplerApi's generateStream, or a Scheduler's in-process. */
  stream: (req: Partial<GenerateRequest>, opts: { timeoutMs?: number }) => AsyncIterable<GenerateEvent>;
  request: Partial<GenerateRequest>;
  out: string;
  timeoutMs?: number;
  /** Grid title. */
  title?: string;
  /** Progress: called with steps done and total. */
  onProgress?: (step: number, total: number) => void;
}

/** Streams one request, writes `<out>/<index>-<class>.png` per image and `<out>/grid.png`. */
export async function generateToDir(o: GenerateToDirOptions): Promise<{ images: Image[]; grid: string; seed: bigint }> {
  const images: Image[] = [];
  let seed = 0n;
  for await (const ev of o.stream(o.request, { timeoutMs: o.timeoutMs })) {
    if (ev.accepted) seed = ev.accepted.seed;
    if (ev.progress) o.onProgress?.(ev.progress.step, ev.progress.numSteps);
    if (ev.image?.image) images.push(ev.image.image);
  }
  images.sort((a, b) => a.sampleIndex - b.sampleIndex);
  mkdirSync(o.out, { recursive: true });
  for (const img of images) {
    writeFileSync(join(o.out, `${String(img.sampleIndex).padStart(3, '0')}-${fileSafe(img.className || String(img.classLabel))}.png`), img.png);
  }
  const rows = new Map<string, Uint8Array[]>();
  for (const img of images) {
    const label = img.className ? `${img.classLabel} ${img.className}` : `class ${img.classLabel}`;
    rows.set(label, [...(rows.get(label) ?? []), img.png]);
  }
  const scale = Math.max(1, Math.floor(96 / Math.max(1, images[0]?.height ?? 96)));
  const grid = join(o.out, 'grid.png');
  writeFileSync(grid, await labelledGrid([...rows].map(([label, pngs]) => ({ label, pngs })), { scale, title: o.title }));
  return { images, grid, seed };
}

interface Flags extends GrpcClientFlags {
  server: string;
  model?: string;
  class: ClassLabel[];
  num: number;
  steps?: number;
  sampler: string;
  cfg?: number;
  guidanceChannels: '3' | 'all';
  eta?: number;
  seed?: string;
  out: string;
  timeout: number;
}

export const command = addGrpcClientOptions(
  new Command('generate')
    .description('Generate images from a running ditpipe scheduler and write PNGs plus a labelled grid.')
    .addOption(new Option('--server <host:port>', 'scheduler gRPC address').env('DITPIPE_SERVER').default('127.0.0.1:50051').argParser((v) => checkAddress(v, '--server'))),
)
  .addOption(new Option('--model <name>', 'model name (default: the first model the server lists)'))
  .addOption(new Option('--class <labels>', 'classes by index or name, comma-separated, e.g. "3,Sandal"').makeOptionMandatory().argParser(parseClasses))
  .addOption(new Option('--num <n>', 'images per class').default(1).argParser(intArg('--num', 1, 1024)))
  .addOption(new Option('--steps <n>', 'sampling steps (default: the server default for the sampler)').argParser(intArg('--steps', 1, 1000)))
  .addOption(new Option('--sampler <name>', 'sampler').choices(Object.keys(SAMPLER_FLAGS)).default('ddpm'))
  .addOption(new Option('--cfg <scale>', 'classifier-free guidance scale (1 = none; default: the server default)').argParser(numberArg('--cfg', 1)))
  .addOption(new Option('--guidance-channels <which>', 'latent channels guidance applies to').choices(['3', 'all']).default('3'))
  .addOption(new Option('--eta <eta>', 'DDIM eta').argParser(numberArg('--eta', 0)))
  .addOption(new Option('--seed <n>', 'noise seed (default: the server picks one and reports it)').argParser((v) => {
    if (!/^\d+$/.test(v) || BigInt(v) >= 2n ** 64n) throw new Error(`--seed must be an integer within 0..2^64-1, got "${v}"`);
    return v;
  }))
  .addOption(new Option('--out <dir>', 'output directory').default('out/generate'))
  .addOption(new Option('--timeout <ms>', 'request deadline').default(600_000).argParser(intArg('--timeout', 1)))
  .action(async (o: Flags) => {
    const api = new SamplerApi(o.server, clientOptionsFromFlags(o));
    try {
      const model = o.model ?? (await api.listModels({ timeoutMs: 10_000 }))[0]?.name;
      if (!model) throw new Error(`the server at ${o.server} serves no model yet`);
      const labels = o.class.flatMap((l) => Array.from({ length: o.num }, () => l));
      const bar = new SingleBar({ format: 'sampling [{bar}] step {value}/{total} | {duration}s', hideCursor: true, noTTYOutput: true, notTTYSchedule: 2000, stream: process.stderr });
      let started = false;
      const res = await generateToDir({
        stream: (req, opts) => api.generateStream(req, opts),
        out: o.out,
        timeoutMs: o.timeout,
        title: `${model} · ${o.sampler}`,
        request: {
          model,
          classLabels: labels,
          numSteps: o.steps,
          sampler: SAMPLER_FLAGS[o.sampler],
          cfgScale: o.cfg,
          guidanceChannels: o.guidanceChannels === 'all' ? GuidanceChannels.GUIDANCE_CHANNELS_ALL : GuidanceChannels.GUIDANCE_CHANNELS_THREE,
          eta: o.eta,
          seed: o.seed === undefined ? undefined : BigInt(o.seed),
        },
        onProgress: (step, total) => {
          if (!started) bar.start(total, 0);
          started = true;
          bar.update(step);
        },
      });
      bar.stop();
      console.log(`${res.images.length} image(s) from ${model}, seed ${res.seed}, in ${o.out}; grid: ${res.grid}`);
    } finally {
      api.close();
    }
  });
