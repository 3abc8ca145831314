// `ditpipe model …`: build model directories from published weights, inspect them, make test weights.
import { existsSync, readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import cliProgress from 'cli-progress';
import {
  buildDitModel,
  DitConfigError,
  parseDitConfigJson,
  UnsupportedDtypeError,
  type DitConfig,
  type DitConfigJson,
} from '../shared/model/dit.ts';
import { initDitWeights, type DitInit } from '../shared/model/dit-init.ts';
import {
  CACHE_GRAPHS,
  cacheGraphPath,
  ditConfigSchema,
  GRAPH_REVISION,
  graphRevisionOf,
  readModelDir,
  type DitModelJson,
  type ModelDir,
  type ModelJson,
} from '../shared/model/modeldir.ts';
import { ditPreset } from '../shared/model/presets.ts';
import { croppedSize } from '../shared/image/crop.ts';
import type { OnnxSummary } from '../shared/onnx/inspect.ts';
import { readJsonArg } from './common.ts';

/** Builders registered under `model build` besides `dit`; each module exports its subcommand as `command`. */
const builders: Array<() => Promise<{ command: Command }>> = [() => import('./model-vae.ts')];

/** `--config` takes a JSON file or inline JSON (starting with `{`): constructor arguments or a training record. */
export function readDitConfigArg(arg: string): DitConfigJson {
  const { raw, source } = readJsonArg('--config', arg, (m) => new DitConfigError(m));
  return parseDitConfigJson(raw, source);
}

function readConfigArg(arg: string): Partial<DitConfig> {
  return readDitConfigArg(arg).config;
}

/** One label per line, or a JSON array of strings. */
function readClassNames(path: string): string[] {
  if (!existsSync(path)) throw new DitConfigError(`--class-names ${path}: no such file`);
  const text = readFileSync(path, 'utf8');
  if (text.trimStart().startsWith('[')) {
    const parsed: unknown = JSON.parse(text);
    if (!Array.isArray(parsed) || !parsed.every((s) => typeof s === 'string')) {
      throw new DitConfigError(`--class-names ${path}: expected a JSON array of strings`);
    }
    return parsed;
  }
  return text
    .split(/\r?\n/)
    .map((s) => s.trim())
    .filter((s, i, all) => s.length > 0 || i < all.length - 1);
}

function positiveInt(flag: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n <= 0) throw new DitConfigError(`${flag} must be a positive integer, got "${v}"`);
    return n;
  };
}

/** A progress reporter: a bar on a terminal, a line per ~10% otherwise (logs, CI). */
function progress(label: string): { update: (done: number, total: number) => void; stop: () => void } {
  if (process.stderr.isTTY) {
    const bar = new cliProgress.SingleBar(
      { format: `${label} [{bar}] {value}/{total} tensors`, stream: process.stderr, hideCursor: true },
      cliProgress.Presets.shades_classic,
    );
    let started = false;
    return {
      update: (done, total) => {
        if (!started) bar.start(total, 0);
        started = true;
        bar.update(done);
      },
      stop: () => {
        if (started) bar.stop();
      },
    };
  }
  let lastDecile = -1;
  return {
    update: (done, total) => {
      const decile = Math.floor((10 * done) / total);
      if (decile !== lastDecile) {
        lastDecile = decile;
        process.stderr.write(`${label}: ${done}/${total} tensors\n`);
      }
    },
    stop: () => {},
  };
}

interface BuildDitCli {
  weights: string;
  format: 'auto' | 'original' | 'diffusers';
  preset?: string;
  config?: string;
  inputSize?: number;
  dtype: string;
  name?: string;
  classNames?: string;
  vae?: string;
  cacheGraphs: boolean;
  out: string;
  quiet?: boolean;
}

const buildDit = new Command('dit')
  .description('Build a DiT model directory (ONNX + model.json) from original or diffusers weights, with the original DiT numerics')
  .requiredOption('--weights <file>', 'DiT weights: safetensors or torch.save checkpoint (original or diffusers names)')
  .addOption(new Option('--format <format>', 'tensor naming scheme').choices(['auto', 'original', 'diffusers']).default('auto'))
  .option('--preset <name>', 'DiT-S/B/L/XL × /2 /4 /8, e.g. DiT-XL/2 (sets num_heads; shapes must match the weights)')
  .option(
    '--config <json>',
    'DiT constructor arguments (input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes, learn_sigma), any subset: a JSON file or inline JSON; or a training record holding them under "config", whose class_names are used too (models/fashion-mnist/dit.json)',
  )
  .option('--input-size <n>', 'latent size (image size / 8); default: from pos_embed', positiveInt('--input-size'))
  .option('--dtype <dtype>', 'weight storage dtype: f32 or f16 (compute stays float32)', 'f32')
  .option('--name <name>', 'model name services advertise (default: the output directory name)')
  .option(
    '--class-names <file>',
    "class names, one per line or a JSON array, stored in model.json (default: a --config record's class_names)",
  )
  .option('--vae <name>', 'name of the VAE decoder this model samples for (schedulers pair them by it)')
  .option(
    '--no-cache-graphs',
    "do not write the step-cache graphs model.head/tail/skip.onnx (the DiT cut after block 0 and before the final layer, so that the block stack's output can be reused across steps); with external weights (above 256 MiB) they point into model.onnx.data, else they hold a second copy of the weights",
  )
  .option('--quiet', 'no progress output')
  .requiredOption('--out <dir>', 'output model directory')
  .action((o: BuildDitCli) => {
    if (o.dtype !== 'f32' && o.dtype !== 'f16') throw new UnsupportedDtypeError(o.dtype);
    if (o.preset) ditPreset(o.preset); // unknown preset: fail before opening anything
    const log = (m: string): void => {
      if (!o.quiet) process.stderr.write(`${m}\n`);
    };
    const bar = o.quiet ? null : progress('writing weights');
    const given = o.config ? readDitConfigArg(o.config) : undefined;
    if (given?.classNames && !o.classNames) log(`class names: ${given.classNames.length} from --config`);
    const m = buildDitModel({
      weights: o.weights,
      out: o.out,
      format: o.format,
      preset: o.preset,
      config: given?.config,
      inputSize: o.inputSize,
      dtype: o.dtype,
      name: o.name,
      classNames: o.classNames ? readClassNames(o.classNames) : given?.classNames,
      vae: o.vae,
      cacheGraphs: o.cacheGraphs,
      onNote: log,
      onWarning: (w) => process.stderr.write(`warning: ${w}\n`),
      onProgress: bar ? (done, total) => bar.update(done, total) : undefined,
    });
    bar?.stop();
    const c = m.meta.config as DitConfig;
    console.log(
      `${m.dir}: dit "${m.meta.name}" (${m.meta.source.format}), ${m.meta.params.toLocaleString('en-US')} params, ` +
        `${m.meta.gflops.toPrecision(4)} Gflops (multiply-accumulates) per forward at ${c.input_size}×${c.input_size} latents, weights ${m.meta.weightDtype}`,
    );
  });

interface InitDitCli {
  preset?: string;
  config?: string;
  inputSize?: number;
  seed: number;
  init: DitInit;
  out: string;
}

function nonNegInt(v: string): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new DitConfigError(`--seed must be a non-negative integer, got "${v}"`);
  return n;
}

const initDit = new Command('dit')
  .description("Write DiT weights (original names) without a checkpoint: the paper's init or random non-zero weights")
  .option('--preset <name>', 'DiT-S/2 … DiT-XL/8')
  .option('--config <json>', 'DiT constructor arguments, a JSON file or inline JSON (over the preset, or complete)')
  .option('--input-size <n>', 'latent size (overrides the preset/config)', positiveInt('--input-size'))
  .option('--seed <n>', 'random seed', nonNegInt, 0)
  .addOption(
    new Option('--init <kind>', "original: the paper's initialisation (zero adaLN/final layer); random: every weight non-zero")
      .choices(['original', 'random'])
      .default('random'),
  )
  .requiredOption('--out <file>', 'output .safetensors file')
  .action((o: InitDitCli) => {
    if (!o.preset && !o.config) throw new DitConfigError('give --preset or --config');
    const merged = {
      ...(o.preset ? ditPreset(o.preset) : {}),
      ...(o.config ? readConfigArg(o.config) : {}),
      ...(o.inputSize ? { input_size: o.inputSize } : {}),
    };
    const parsed = ditConfigSchema.safeParse(merged);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      throw new DitConfigError(`config field "${issue.path.join('.')}": ${issue.message}`);
    }
    const bar = progress('initialising');
    const res = initDitWeights(parsed.data, o.out, { init: o.init, seed: o.seed, onProgress: (d, t) => bar.update(d, t) });
    bar.stop();
    console.log(
      `${o.out}: ${res.tensors} tensors, ${res.params.toLocaleString('en-US')} params (${o.init} init, seed ${o.seed}), ${(res.bytes / 2 ** 20).toFixed(1)} MiB`,
    );
  });

/** Values of the DiT's fixed positional embedding: one sin-cos vector of hidden_size per token. */
function posEmbedValues(c: DitConfig): number {
  return (c.input_size / c.patch_size) ** 2 * c.hidden_size;
}

function describe(meta: ModelJson, dir: string, graph?: OnnxSummary): string {
  const io = (v: ModelJson['inputs'][number]): string => `  ${v.name}: ${v.dtype} [${v.shape.join(', ')}]`;
  const lines = [
    `${dir}`,
    `kind:     ${meta.kind}`,
    `name:     ${meta.name}`,
    `config:   ${JSON.stringify(meta.config)}`,
    `params:   ${meta.params.toLocaleString('en-US')}${meta.kind === 'dit' ? ` trainable (plus ${posEmbedValues(meta.config).toLocaleString('en-US')} fixed sin-cos pos_embed values, which PyTorch's parameters() also counts)` : ''}`,
    `Gflops:   ${meta.gflops.toFixed(3)} per forward at batch 1 (multiply-accumulates, the DiT paper's convention)`,
    `weights:  ${meta.weightDtype}${meta.externalData ? ` (external data: ${meta.externalData})` : ''}`,
    `source:   ${meta.source.file} (${meta.source.format}), sha256 ${meta.source.sha256}`,
    'inputs:',
    ...meta.inputs.map(io),
    'outputs:',
    ...meta.outputs.map(io),
  ];
  if (meta.kind === 'vae-decoder') lines.push(`scaling factor: ${meta.scalingFactor}`);
  if (meta.kind === 'vae-decoder' && meta.outputCrop) {
    const c = meta.outputCrop;
    const side = (meta.config.latent_size ?? 0) * 2 ** (meta.config.block_out_channels.length - 1);
    const served = croppedSize(side, side, c);
    lines.push(
      `output crop: top ${c.top}, right ${c.right}, bottom ${c.bottom}, left ${c.left} px (${side}×${side} decoded → ${served.width}×${served.height} served at ${meta.config.latent_size}×${meta.config.latent_size} latents)`,
    );
  }
  if (meta.kind === 'dit') {
    const cg = meta.cacheGraphs;
    lines.push(
      cg
        ? `cache:    step-cache graphs ${CACHE_GRAPHS.map((n) => cg[n].onnx).join(', ')}: a full step is head + tail, ${(cg.head.gflops + cg.tail.gflops).toFixed(3)} Gflops; a cached step head + skip, ${(cg.head.gflops + cg.skip.gflops).toFixed(3)} Gflops`
        : 'cache:    no step-cache graphs (built by an older ditpipe or with --no-cache-graphs): full steps only',
    );
  }
  if (meta.kind === 'dit' && meta.classNames)
    lines.push(
      `classes:  ${meta.classNames.length} named (${meta.classNames.slice(0, 3).join(', ')}${meta.classNames.length > 3 ? ', …' : ''})`,
    );
  const rev = graphRevisionOf(meta);
  const stale =
    rev < GRAPH_REVISION ? ` (this ditpipe writes revision ${GRAPH_REVISION}: rebuild for the faster graphs, same numbers)` : '';
  lines.push(`built by: ${meta.createdBy}, graph revision ${rev}${stale}`);
  if (graph) {
    const opset = graph.opsets.map((o) => `${o.domain || 'ai.onnx'} ${o.version}`).join(', ');
    lines.push(
      `graph:    ${meta.onnx} parses: ONNX IR ${graph.irVersion}, opset ${opset}, ${graph.nodes} nodes, ${graph.initializers} weights${graph.externalInitializers ? ` (${graph.externalInitializers} in external data)` : ''}; inputs/outputs match model.json`,
    );
  }
  return lines.join('\n');
}

const info = new Command('info')
  .description(
    'Show a model directory: params, Gflops per forward, inputs/outputs, source weights, step-cache graphs; checks that model.onnx (and the step-cache graphs) parse and match model.json',
  )
  .argument('<dir>', 'model directory')
  .option('--json', 'print model.json')
  .action((dir: string, o: { json?: boolean }) => {
    // Verifies model.onnx, and the step-cache graphs a DiT lists, parse and match model.json
    // (errors exit non-zero, naming the file).
    const m = readModelDir(dir);
    if (m.meta.kind === 'dit' && m.meta.cacheGraphs) for (const n of CACHE_GRAPHS) cacheGraphPath(m as ModelDir<DitModelJson>, n);
    console.log(o.json ? JSON.stringify(m.meta, null, 2) : describe(m.meta, dir, m.graph));
  });

const build = new Command('build').description('Compile published weights into a model directory').addCommand(buildDit);
for (const load of builders) build.addCommand((await load()).command);

export const command = new Command('model')
  .description('Build, inspect and initialise models')
  .addCommand(build)
  .addCommand(info)
  .addCommand(new Command('init').description('Write weights without a checkpoint (tests, benchmarks)').addCommand(initDit));
