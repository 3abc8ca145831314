// `ditpipe model build vae`: compiles a VAE decoder checkpoint (diffusers or LDM names) into a
// model directory. Registered under `model build` by cli/model.ts.
//
// The latent scaling factor cannot be read off the weights and a wrong one still decodes (into
// washed-out or saturated images), so it is never guessed: it comes from --scaling-factor, the
// --config, the safetensors header (`scaling_factor` metadata), or a config beside the weights
// (`<name>.json`, as models/fashion-mnist/vae.json sits beside vae.safetensors, or a diffusers
// `config.json` in the same folder); with none of them the build stops and says so.
import { existsSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import cliProgress from 'cli-progress';
import { croppedSize, imageCropSchema, isNoCrop, parseCrop, type ImageCrop } from '../shared/image/crop.ts';
import type { ModelDir, VaeModelJson } from '../shared/model/modeldir.ts';
import { writeModelDir } from '../shared/model/modeldir-write.ts';
import {
  buildVaeDecoderGraph,
  DEFAULT_LATENT_SIZE,
  parseVaeConfigJson,
  resolveVae,
  SD_SCALING_FACTOR,
  VaeConfigError,
  type VaeConfigJson,
  type VaeFormat,
} from '../shared/model/vae.ts';
import { openWeights, sha256File, SafetensorsFile, type WeightFile } from '../shared/weights/index.ts';
import { readJsonArg } from './common.ts';

export interface BuildVaeOptions {
  weights: string;
  out: string;
  format?: VaeFormat | 'auto';
  /** JSON file (or inline JSON) with diffusers `AutoencoderKL` config names (or a record holding them under `config`). */
  config?: string;
  scalingFactor?: number;
  /** Pixels the decoder crops from each edge of the decoded images (model.json `outputCrop`). */
  outputCrop?: ImageCrop;
  name?: string;
  dtype?: 'f32' | 'f16';
  /** Where each setting came from, one line each (the CLI prints them). */
  onNote?: (message: string) => void;
  /** Called after each weight is written (for a progress bar). */
  onProgress?: (done: number, total: number) => void;
}

/** `--config` takes a JSON file or inline JSON (starting with `{`), like `model build dit`. */
function readConfigArg(arg: string, flag = '--config'): VaeConfigJson {
  const { raw, source } = readJsonArg(flag, arg, (m) => new VaeConfigError(m));
  return parseVaeConfigJson(raw, source);
}

/** A config file beside the weights: `<name>.json` (this repository's layout), else diffusers' `config.json`. */
export function sidecarConfig(weights: string): string | undefined {
  const dir = dirname(weights);
  const stem = basename(weights).replace(/\.[^.]+$/, '');
  return [join(dir, `${stem}.json`), join(dir, 'config.json')].find((f) => f !== weights && existsSync(f));
}

function headerScalingFactor(file: WeightFile): number | undefined {
  const v = file instanceof SafetensorsFile ? file.metadata.scaling_factor : undefined;
  if (v === undefined) return undefined;
  const x = Number(v);
  if (!(x > 0) || !Number.isFinite(x))
    throw new VaeConfigError(`${file.path}: header metadata scaling_factor must be a positive number, got "${v}"`);
  return x;
}

/** What the CLI action does, callable without a process (tests, `npm start`'s model cache). */
export function buildVaeModel(opts: BuildVaeOptions): ModelDir<VaeModelJson> {
  const note = opts.onNote ?? (() => undefined);
  const sidecar = sidecarConfig(opts.weights);
  const sidecarJson = sidecar ? readConfigArg(sidecar, 'config beside the weights,') : undefined;
  // --config wins; a config beside the weights stands in for a missing one.
  const given = opts.config ? readConfigArg(opts.config) : (sidecarJson ?? { config: {} });
  if (!opts.config && sidecar) note(`config: ${sidecar} (beside the weights)`);
  const file = openWeights(opts.weights);
  try {
    const sources: Array<[number | undefined, string]> = [
      [opts.scalingFactor, '--scaling-factor'],
      [opts.config ? given.scalingFactor : undefined, '--config'],
      [headerScalingFactor(file), `${opts.weights} header metadata`],
      [sidecarJson?.scalingFactor, `${sidecar}`],
    ];
    const hit = sources.find(([v]) => v !== undefined);
    if (!hit) {
      throw new VaeConfigError(
        `--scaling-factor: ${opts.weights} does not say its latent scaling factor (no scaling_factor in --config, in the safetensors header or in a <name>.json / config.json beside it), and a wrong one still decodes, only into wrong images: give it, e.g. --scaling-factor ${SD_SCALING_FACTOR} for Stable Diffusion's VAEs (sd-vae-ft-ema/-mse)`,
      );
    }
    const scalingFactor = hit[0] as number;
    if (!(scalingFactor > 0) || !Number.isFinite(scalingFactor)) {
      throw new VaeConfigError(`--scaling-factor must be a positive number, got ${scalingFactor}`);
    }
    note(`scaling factor: ${scalingFactor} (${hit[1]})`);
    const outputCrop = opts.outputCrop ?? given.outputCrop;
    if (outputCrop && !isNoCrop(outputCrop))
      note(`output crop: ${JSON.stringify(outputCrop)} px (${opts.outputCrop ? '--output-crop' : opts.config ? '--config' : sidecar})`);
    const { names, config } = resolveVae(file, opts.format ?? 'auto', given);
    if (outputCrop) {
      const ok = imageCropSchema.safeParse(outputCrop);
      if (!ok.success) throw new VaeConfigError(`--output-crop ${JSON.stringify(outputCrop)}: ${ok.error.issues[0].message}`);
      const side = (config.latent_size ?? DEFAULT_LATENT_SIZE) * 2 ** (config.block_out_channels.length - 1);
      const left = croppedSize(side, side, outputCrop);
      if (left.height < 1)
        throw new VaeConfigError(
          `--output-crop ${JSON.stringify(outputCrop)}: leaves no pixels of the ${side}×${side} images this VAE decodes at latent_size ${config.latent_size}`,
        );
    }
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
        ...(outputCrop && !isNoCrop(outputCrop) ? { outputCrop } : {}),
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

function cropArg(v: string): ImageCrop {
  const c = parseCrop(v);
  if (!c) throw new VaeConfigError(`--output-crop must be N (every edge) or TOP,RIGHT,BOTTOM,LEFT in pixels, got "${v}"`);
  return c;
}

interface CliOptions {
  weights: string;
  out: string;
  format: VaeFormat | 'auto';
  config?: string;
  scalingFactor?: number;
  outputCrop?: ImageCrop;
  name?: string;
  dtype: 'f32' | 'f16';
}

export const command = new Command('vae')
  .description('Build a VAE decoder model directory from diffusers or LDM (CompVis) weights')
  .requiredOption('--weights <file>', 'VAE weights (safetensors or torch checkpoint); encoder tensors are ignored')
  .addOption(new Option('--format <format>', 'tensor naming scheme').choices(['auto', 'diffusers', 'ldm']).default('auto'))
  .option(
    '--config <json>',
    'diffusers AutoencoderKL config.json, file or inline JSON (norm_num_groups, scaling_factor, output_crop, ...), or a record holding it under "config" (models/fashion-mnist/vae.json); default: <name>.json or config.json beside the weights; the rest is read from the weight shapes',
  )
  .option(
    '--scaling-factor <x>',
    `latent scaling factor (default: the config's scaling_factor, the safetensors header's, or that of a config beside the weights; never guessed: ${SD_SCALING_FACTOR} for Stable Diffusion's VAEs)`,
    positiveNumber('--scaling-factor'),
  )
  .option(
    '--output-crop <px>',
    "pixels the decoder crops from each edge of decoded images: N, or TOP,RIGHT,BOTTOM,LEFT (default: the config's output_crop, else none)",
    cropArg,
  )
  .option('--name <name>', 'model name services advertise (default: the output directory name)')
  .addOption(new Option('--dtype <dtype>', 'weight storage dtype').choices(['f32', 'f16']).default('f32'))
  .requiredOption('--out <dir>', 'output model directory')
  .action((o: CliOptions) => {
    const bar = process.stderr.isTTY
      ? new cliProgress.SingleBar(
          { format: 'writing weights [{bar}] {value}/{total}', stream: process.stderr },
          cliProgress.Presets.shades_classic,
        )
      : null;
    let started = false;
    const m = buildVaeModel({
      ...o,
      onNote: (line) => process.stderr.write(`${line}\n`),
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
    const crop = meta.outputCrop
      ? `, output crop ${meta.outputCrop.top}/${meta.outputCrop.right}/${meta.outputCrop.bottom}/${meta.outputCrop.left} px`
      : '';
    console.log(
      `${m.dir}: vae-decoder "${meta.name}" (${meta.source.format} names), ${meta.params} params, ` +
        `${meta.gflops.toFixed(3)} GMACs per image at ${size}×${size} latents, scaling factor ${meta.scalingFactor}${crop}`,
    );
  });
