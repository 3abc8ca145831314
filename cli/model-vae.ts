// `ditpipe model build vae`: compiles a VAE decoder checkpoint (diffusers or LDM names) into a
// model directory. Registered under `model build` by cli/model.ts.
import { basename, resolve } from 'node:path';
import { Command, Option } from 'commander';
import cliProgress from 'cli-progress';
import { writeModelDir, type ModelDir, type VaeModelJson } from '../shared/model/modeldir.ts';
import {
  buildVaeDecoderGraph,
  DEFAULT_SCALING_FACTOR,
  parseVaeConfigJson,
  resolveVae,
  VaeConfigError,
  type VaeConfigJson,
  type VaeFormat,
} from '../shared/model/vae.ts';
import { openWeights, sha256File } from '../shared/weights/index.ts';
import { readJsonArg } from './common.ts';

export interface BuildVaeOptions {
  weights: string;
  out: string;
  format?: VaeFormat | 'auto';
  /** JSON file (or inline JSON) with diffusers `AutoencoderKL` config names. */
  config?: string;
  scalingFactor?: number;
  name?: string;
  dtype?: 'f32' | 'f16';
  /** Called after each weight is written (for a progress bar). */
  onProgress?: (done: number, total: number) => void;
}

/** `--config` takes a JSON file or inline JSON (starting with `{`), like `model build dit`. */
function readConfigArg(arg: string): VaeConfigJson {
  const { raw, source } = readJsonArg('--config', arg, (m) => new VaeConfigError(m));
  return parseVaeConfigJson(raw, source);
}

/** What the CLI action does, callable without a process (tests, `npm start`'s model cache). */
export function buildVaeModel(opts: BuildVaeOptions): ModelDir<VaeModelJson> {
  const given = opts.config ? readConfigArg(opts.config) : { config: {} };
  const scalingFactor = opts.scalingFactor ?? given.scalingFactor ?? DEFAULT_SCALING_FACTOR;
  if (!(scalingFactor > 0) || !Number.isFinite(scalingFactor)) {
    throw new VaeConfigError(`--scaling-factor must be a positive number, got ${scalingFactor}`);
  }
  const file = openWeights(opts.weights);
  try {
    const { names, config } = resolveVae(file, opts.format ?? 'auto', given);
    const name = opts.name ?? basename(resolve(opts.out));
    const graph = buildVaeDecoderGraph(file, config, { names, name });
    const dir = writeModelDir(
      opts.out,
      graph,
      {
        kind: 'vae-decoder',
        name,
        config,
        scalingFactor,
        source: { file: basename(opts.weights), format: names.scheme, sha256: sha256File(opts.weights) },
      },
      {
        weightDtype: opts.dtype === 'f16' ? 'float16' : 'float32',
        onProgress: opts.onProgress && ((done, total) => opts.onProgress?.(done, total)),
      },
    );
    return dir as ModelDir<VaeModelJson>; // written from a 'vae-decoder' draft just above
  } finally {
    file.close();
  }
}

function positiveNumber(flag: string): (v: string) => number {
  return (v) => {
    const x = Number(v);
    if (!Number.isFinite(x) || x <= 0) throw new VaeConfigError(`${flag} must be a positive number, got "${v}"`);
    return x;
  };
}

interface CliOptions {
  weights: string;
  out: string;
  format: VaeFormat | 'auto';
  config?: string;
  scalingFactor?: number;
  name?: string;
  dtype: 'f32' | 'f16';
}

export const command = new Command('vae')
  .description('Build a VAE decoder model directory from diffusers or LDM (CompVis) weights')
  .requiredOption('--weights <file>', 'VAE weights (safetensors or torch checkpoint); encoder tensors are ignored')
  .addOption(new Option('--format <format>', 'tensor naming scheme').choices(['auto', 'diffusers', 'ldm']).default('auto'))
  .option('--config <json>', 'diffusers AutoencoderKL config.json, file or inline JSON (norm_num_groups, scaling_factor, ...); the rest is read from the weight shapes')
  .option('--scaling-factor <x>', `latent scaling factor (default: the config's scaling_factor, else ${DEFAULT_SCALING_FACTOR})`, positiveNumber('--scaling-factor'))
  .option('--name <name>', 'model name services advertise (default: the output directory name)')
  .addOption(new Option('--dtype <dtype>', 'weight storage dtype').choices(['f32', 'f16']).default('f32'))
  .requiredOption('--out <dir>', 'output model directory')
  .action((o: CliOptions) => {
    const bar = process.stderr.isTTY
      ? new cliProgress.SingleBar({ format: 'writing weights [{bar}] {value}/{total}', stream: process.stderr }, cliProgress.Presets.shades_classic)
      : null;
    let started = false;
    const m = buildVaeModel({
      ...o,
      onProgress: (done, total) => {
        if (!bar) return;
        if (!started) bar.start(total, 0);
        started = true;
        bar.update(done);
      },
    });
    if (started) bar?.stop();
    const { meta } = m;
    const size = meta.config.latent_size;
    console.log(
      `${m.dir}: vae-decoder "${meta.name}" (${meta.source.format} names), ${meta.params} params, ` +
        `${meta.gflops.toFixed(3)} GMACs per image at ${size}×${size} latents, scaling factor ${meta.scalingFactor}`,
    );
  });
