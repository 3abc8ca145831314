// `ditpipe generate`: asks a running scheduler for images over gRPC, shows progress, writes the
// PNGs, a labelled grid and run.json (what was asked, the seed, the timings) into one run folder.
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SingleBar } from 'cli-progress';
import { Command, Option } from 'commander';
import { checkAddress, request as fullRequest, SamplerApi } from '../shared/client.ts';
import { DitpipeError } from '../shared/errors.ts';
import {
  CachePolicy,
  GenerateRequest,
  type GenerateEvent,
  type Image,
  type ModelInfo,
  type Timings,
} from '../shared/gen/ditpipe/v1/sampler.ts';
import { labelledGrid } from '../shared/image/grid.ts';
import { StepCacheOptions } from '../shared/gen/ditpipe/v1/common.ts';
import { STEP_CACHE_PRESET_NAMES } from '../shared/step-cache.ts';
import { VERSION } from '../shared/version.ts';
import { classFileName, describeClasses, findClass } from './classes.ts';
import { addGrpcClientOptions, clientOptionsFromFlags, intArg, numberArg, type GrpcClientFlags } from './common.ts';
import { DEFAULT_SAMPLER } from '../shared/diffusion/sampler/registry.ts';
import { GUIDANCE_FLAGS, inCliTerms, SAMPLER_FLAGS, UsageError } from './request-errors.ts';

export { SAMPLER_FLAGS } from './request-errors.ts';

/** "3,Sandal,Ankle_boot" → the entries as typed (resolved against the model's classes later). */
function splitList(v: string): string[] {
  return v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
}

/** Class indices of `--class` entries: indices, class names or their file-name forms. */
export function resolveClasses(entries: string[], model: Pick<ModelInfo, 'name' | 'numClasses' | 'classNames'>): number[] {
  if (entries.length === 0) throw new UsageError('--class: give at least one class');
  return entries.map((s) => {
    if (/^\d+$/.test(s)) {
      const i = Number(s);
      if (i >= model.numClasses) throw new UsageError(`--class ${s}: not a class of ${model.name} (classes 0..${model.numClasses - 1})`);
      return i;
    }
    const i = findClass(s, model.classNames);
    if (i < 0) {
      const known = model.classNames.length
        ? `classes: ${describeClasses(model.classNames)}`
        : `it has no class names; use indices 0..${model.numClasses - 1}`;
      throw new UsageError(`--class ${s}: not a class of ${model.name} (${known})`);
    }
    return i;
  });
}

/** Files a generate run writes into its folder: the only ones --overwrite removes. */
const RUN_FILE = /^(\d{3,}-[A-Za-z0-9_-]+\.png|grid\.png|run\.json)$/;

/**
 * Makes `out` ready for a run: created when missing; a non-empty folder is refused unless
 * `overwrite`, which removes the files an earlier run wrote there (other files stay).
 */
export function prepareOutDir(out: string, overwrite: boolean, flag = '--out'): void {
  if (!existsSync(out)) {
    mkdirSync(out, { recursive: true });
    return;
  }
  if (!statSync(out).isDirectory()) throw new UsageError(`${flag} ${out}: is a file, not a folder`);
  const entries = readdirSync(out);
  if (entries.length === 0) return;
  if (!overwrite) {
    throw new UsageError(
      `${flag} ${out}: the folder is not empty (${entries.length} file(s), e.g. ${entries.slice(0, 2).join(', ')}); give a new ${flag}, or --overwrite to replace an earlier run's images`,
    );
  }
  for (const e of entries) if (RUN_FILE.test(e)) rmSync(join(out, e), { force: true });
}

/** What the server reported about a run when it accepted it. */
export interface RunInfo {
  requestId: string;
  model: string;
  seed: bigint;
  numSteps: number;
  cfgScale: number;
}

export interface GenerateToDirOptions {
  /** The events of a request: a SamplerApi's generateStream, or a Scheduler's in-process. */
  stream: (req: Partial<GenerateRequest>, opts: { timeoutMs?: number }) => AsyncIterable<GenerateEvent>;
  request: Partial<GenerateRequest>;
  out: string;
  /** Replace an earlier run's files in `out` (else a non-empty `out` is refused). */
  overwrite?: boolean;
  timeoutMs?: number;
  /** Grid title, from what the server accepted (default: model, steps, cfg and seed). */
  title?: (run: RunInfo) => string;
  /** Recorded in run.json next to the request (e.g. the server address, the command's flags). */
  record?: Record<string, unknown>;
  /** Progress: called with steps done and total. */
  onProgress?: (step: number, total: number) => void;
}

export interface GenerateToDirResult {
  images: Image[];
  grid: string;
  runJson: string;
  seed: bigint;
  run: RunInfo;
}

export function defaultTitle(r: RunInfo, sampler?: string): string {
  return `${r.model}${sampler ? ` · ${sampler}` : ''} · ${r.numSteps} steps · cfg ${r.cfgScale} · seed ${r.seed}`;
}

/** The file an image is written to: `<sample index>-<class>.png`. */
export function imageFileName(img: Pick<Image, 'sampleIndex' | 'className' | 'classLabel'>): string {
  return `${String(img.sampleIndex).padStart(3, '0')}-${classFileName(img.className || String(img.classLabel))}.png`;
}

/** Streams one request, writes `<out>/<index>-<class>.png` per image, `<out>/grid.png` and `<out>/run.json`. */
export async function generateToDir(o: GenerateToDirOptions): Promise<GenerateToDirResult> {
  prepareOutDir(o.out, o.overwrite ?? false);
  const req = fullRequest(o.request);
  const images: Image[] = [];
  let run: RunInfo | null = null;
  let timings: Timings | undefined;
  const startedAt = new Date();
  const t0 = performance.now();
  for await (const ev of o.stream(req, { timeoutMs: o.timeoutMs })) {
    if (ev.accepted) {
      const a = ev.accepted;
      run = { requestId: a.requestId, model: a.model, seed: a.seed, numSteps: a.numSteps, cfgScale: a.cfgScale };
    }
    if (ev.progress) o.onProgress?.(ev.progress.step, ev.progress.numSteps);
    if (ev.image?.image) images.push(ev.image.image);
    if (ev.completed) timings = ev.completed.timings;
  }
  const clientMs = performance.now() - t0;
  if (!run) throw new Error('the server ended the stream without accepting the request');
  images.sort((a, b) => a.sampleIndex - b.sampleIndex);
  for (const img of images) writeFileSync(join(o.out, imageFileName(img)), img.png);
  const rows = new Map<string, Uint8Array[]>();
  for (const img of images) {
    const label = img.className ? `${img.classLabel} ${img.className}` : `class ${img.classLabel}`;
    rows.set(label, [...(rows.get(label) ?? []), img.png]);
  }
  const scale = Math.max(1, Math.floor(96 / Math.max(1, images[0]?.height ?? 96)));
  const grid = join(o.out, 'grid.png');
  const title = (o.title ?? ((r) => defaultTitle(r)))(run);
  writeFileSync(
    grid,
    await labelledGrid(
      [...rows].map(([label, pngs]) => ({ label, pngs })),
      { scale, title },
    ),
  );
  const runJson = join(o.out, 'run.json');
  const record = {
    tool: `ditpipe ${VERSION}`,
    startedAt: startedAt.toISOString(),
    ...o.record,
    // The request exactly as sent (proto JSON: enum names, 64-bit numbers as strings).
    request: GenerateRequest.toJSON(req),
    requestId: run.requestId,
    model: run.model,
    seed: run.seed.toString(),
    numSteps: run.numSteps,
    cfgScale: run.cfgScale,
    // Server-side timings of the whole request, and the wall time this client saw.
    timings: {
      queueMs: timings?.queueMs ?? null,
      denoiseMs: timings?.denoiseMs ?? null,
      decodeMs: timings?.decodeMs ?? null,
      totalMs: timings?.totalMs ?? null,
      clientMs,
    },
    images: images.map((img) => ({
      file: imageFileName(img),
      sampleIndex: img.sampleIndex,
      classLabel: img.classLabel,
      className: img.className,
      width: img.width,
      height: img.height,
      cached: img.cached,
    })),
    grid: 'grid.png',
  };
  writeFileSync(runJson, `${JSON.stringify(record, null, 2)}\n`);
  return { images, grid, runJson, seed: run.seed, run };
}

interface Flags extends GrpcClientFlags {
  server: string;
  model?: string;
  class: string[];
  num: number;
  steps?: number;
  sampler: string;
  cfg?: number;
  guidanceChannels: string;
  eta?: number;
  seed?: string;
  cache: boolean;
  stepCache?: string;
  out: string;
  overwrite?: boolean;
  timeout: number;
}

export const command = addGrpcClientOptions(
  new Command('generate')
    .description('Generate images from a running ditpipe scheduler and write PNGs, a labelled grid and run.json into a folder.')
    .addOption(
      new Option('--server <host:port>', 'scheduler gRPC address')
        .env('DITPIPE_SERVER')
        .default('127.0.0.1:50051')
        .argParser((v) => checkAddress(v, '--server')),
    ),
)
  .addOption(new Option('--model <name>', 'served model name, as ListModels lists it (default: the first model the server lists)'))
  .addOption(
    new Option(
      '--class <labels>',
      'classes by index or name (or the name as output files spell it), comma-separated, e.g. "3,Sandal,Ankle_boot"',
    )
      .makeOptionMandatory()
      .argParser(splitList),
  )
  .addOption(new Option('--num <n>', 'images per class').default(1).argParser(intArg('--num', 1, 1024)))
  .addOption(
    new Option('--steps <n>', 'sampling steps (default: the server default for the sampler)').argParser(intArg('--steps', 1, 1000)),
  )
  .addOption(new Option('--sampler <name>', 'sampler').choices(Object.keys(SAMPLER_FLAGS)).default(DEFAULT_SAMPLER))
  .addOption(
    new Option('--cfg <scale>', 'classifier-free guidance scale (1 = none; default: the server default)').argParser(numberArg('--cfg', 1)),
  )
  .addOption(
    new Option('--guidance-channels <which>', 'latent channels guidance applies to').choices(Object.keys(GUIDANCE_FLAGS)).default('3'),
  )
  .addOption(new Option('--eta <eta>', 'DDIM eta (with --sampler ddim)').argParser(numberArg('--eta', 0)))
  .addOption(
    new Option('--seed <n>', 'noise seed (default: the server picks one and reports it)').argParser((v) => {
      if (!/^\d+$/.test(v) || BigInt(v) >= 2n ** 64n) throw new Error(`--seed must be an integer within 0..2^64-1, got "${v}"`);
      return v;
    }),
  )
  .addOption(
    new Option(
      '--step-cache <preset>',
      "step caching: reuse the transformer blocks' work across neighbouring steps (faster, slightly different images; docs/step-cache.md)",
    ).choices(STEP_CACHE_PRESET_NAMES),
  )
  .option('--no-cache', "sample every image, even those the server's repeat cache holds from an earlier identical request")
  .addOption(new Option('--out <dir>', 'run folder for the images, grid.png and run.json (must be empty or new)').default('out/generate'))
  .option('--overwrite', 'reuse a non-empty --out: remove the images, grid and run.json an earlier run wrote there')
  .addOption(new Option('--timeout <ms>', 'request deadline').default(600_000).argParser(intArg('--timeout', 1)))
  .action(async (o: Flags) => {
    const api = new SamplerApi(o.server, clientOptionsFromFlags(o));
    try {
      const models = await api.listModels({ timeoutMs: 10_000 });
      const model = o.model === undefined ? models[0] : models.find((m) => m.name === o.model);
      if (!model) {
        const serving = models.map((m) => m.name).join(', ');
        throw new UsageError(
          o.model === undefined
            ? `the server at ${o.server} serves no model yet`
            : `--model ${o.model}: not served by ${o.server} (serving: ${serving || 'none yet'})`,
        );
      }
      const classes = resolveClasses(o.class, model);
      const labels = classes.flatMap((index) => Array.from({ length: o.num }, () => ({ index })));
      const bar = new SingleBar({
        format: 'sampling [{bar}] step {value}/{total} | {duration}s',
        hideCursor: true,
        noTTYOutput: true,
        notTTYSchedule: 2000,
        stream: process.stderr,
      });
      let started = false;
      let res: GenerateToDirResult;
      try {
        res = await generateToDir({
          stream: (req, opts) => api.generateStream(req, opts),
          out: o.out,
          overwrite: o.overwrite,
          timeoutMs: o.timeout,
          title: (r) => defaultTitle(r, o.sampler),
          record: {
            server: o.server,
            flags: {
              class: o.class,
              num: o.num,
              sampler: o.sampler,
              steps: o.steps ?? null,
              cfg: o.cfg ?? null,
              eta: o.eta ?? null,
              seed: o.seed ?? null,
              cache: o.cache,
              stepCache: o.stepCache ?? null,
            },
          },
          request: {
            model: model.name,
            classLabels: labels,
            numSteps: o.steps,
            sampler: SAMPLER_FLAGS[o.sampler],
            cfgScale: o.cfg,
            guidanceChannels: GUIDANCE_FLAGS[o.guidanceChannels],
            eta: o.eta,
            seed: o.seed === undefined ? undefined : BigInt(o.seed),
            cachePolicy: o.cache ? CachePolicy.CACHE_POLICY_UNSPECIFIED : CachePolicy.CACHE_POLICY_BYPASS,
            stepCache: o.stepCache === undefined ? undefined : StepCacheOptions.fromPartial({ preset: o.stepCache }),
          },
          onProgress: (step, total) => {
            if (!started) bar.start(total, 0);
            started = true;
            bar.update(step);
          },
        });
      } catch (err) {
        throw err instanceof DitpipeError ? inCliTerms(err) : err;
      } finally {
        if (started) bar.stop();
      }
      const cached = res.images.filter((i) => i.cached).length;
      console.log(
        `${res.images.length} image(s) from ${model.name}, seed ${res.seed}, ${res.run.numSteps} steps, cfg ${res.run.cfgScale}, in ${o.out}; grid: ${res.grid}${cached ? ` (${cached} from the server's repeat cache)` : ''}`,
      );
    } finally {
      api.close();
    }
  });
