// `ditpipe sample`: the whole reverse-diffusion loop in one process, without the services, to
// reproduce a run or compare it step by step with the original code (same tensor layout as the
// golden trajectory files).
import { Command, Option } from 'commander';
import * as ort from 'onnxruntime-node';
import {
  advance,
  combineGuidance,
  DEFAULT_SAMPLER,
  DiffusionInputError,
  guidanceRows,
  modelOutChannels,
  next,
  packGuidedRows,
  result,
  SAMPLER_NAMES,
  samplerByName,
  samplerList,
  spacedDiffusion,
  start,
  type SamplerName,
} from '../shared/diffusion/index.ts';
import { readDitModelDir } from '../shared/model/modeldir.ts';
import { findClass } from './classes.ts';
import { openSafetensors, writeSafetensors } from '../shared/weights/index.ts';

/** A sampling run that cannot start: the message names the flag. */
export class SampleArgumentError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SampleArgumentError';
  }
}

export interface SampleOptions {
  /** DiT model directory. */
  modelDir: string;
  /** Class indices, or class names when the model carries them. */
  labels: string[];
  sampler: SamplerName;
  respacing: string;
  cfg: number;
  guidanceChannels: 3 | 'all';
  eta: number;
  seed?: bigint;
  /** First sample's index in the noise streams (so a sample can be re-run alone). */
  sampleIndexOffset?: number;
  noiseFrom?: string;
  out: string;
  onStep?: (done: number, total: number) => void;
}

export interface SampleResult {
  /** [steps, B, C, H, W]: the latent after each reverse step. */
  trajectory: Float32Array;
  /** [B, C, H, W]. */
  sample: Float32Array;
  timesteps: number[];
  labels: number[];
  shape: [number, number, number, number];
}

function resolveLabels(raw: string[], numClasses: number, classNames: string[] | undefined): number[] {
  if (raw.length === 0) throw new SampleArgumentError('--labels: give at least one class label');
  return raw.map((s) => {
    const text = s.trim();
    if (/^\d+$/.test(text)) {
      const v = Number(text);
      if (v >= numClasses) throw new SampleArgumentError(`--labels: ${v} is not a class of this model (0..${numClasses - 1})`);
      return v;
    }
    const i = classNames ? findClass(text, classNames) : -1;
    if (i < 0) {
      throw new SampleArgumentError(
        `--labels: '${text}' is neither a class index (0..${numClasses - 1}) nor ${classNames ? 'a class name of this model' : 'usable as a name (the model has no class names)'}`,
      );
    }
    return i;
  });
}

interface InjectedNoiseFile {
  z: Float32Array;
  stepNoise: Float32Array | null;
}

function readNoise(path: string, latent: number[], steps: number, needsStepNoise: boolean): InjectedNoiseFile {
  const f = openSafetensors(path);
  try {
    const check = (name: string, want: number[]) => {
      if (!f.has(name)) throw new SampleArgumentError(`--noise-from ${path}: tensor '${name}' [${want.join(', ')}] is missing`);
      const got = f.info(name).shape;
      if (got.length !== want.length || got.some((d, i) => d !== want[i])) {
        throw new SampleArgumentError(
          `--noise-from ${path}: tensor '${name}' has shape [${got.join(', ')}], expected [${want.join(', ')}]`,
        );
      }
      return f.readF32(name);
    };
    const z = check('z', latent);
    const stepNoise = needsStepNoise || f.has('step_noise') ? check('step_noise', [steps, ...latent]) : null;
    return { z, stepNoise };
  } finally {
    f.close();
  }
}

/** Runs the sampling loop and writes `trajectory`, `sample`, `timesteps` and `labels` to `out`. */
export async function runSample(o: SampleOptions): Promise<SampleResult> {
  const samplerDef = samplerByName(o.sampler);
  if (!samplerDef) throw new SampleArgumentError(`--sampler: must be ${samplerList('')}, got '${String(o.sampler)}'`);
  if (!(Number.isFinite(o.cfg) && o.cfg >= 1)) throw new SampleArgumentError(`--cfg: must be a number >= 1, got ${o.cfg}`);
  if (o.seed !== undefined && o.noiseFrom !== undefined) {
    throw new SampleArgumentError('--seed and --noise-from exclude each other: the noise is either drawn or read');
  }
  const model = readDitModelDir(o.modelDir);
  const c = model.meta.config;
  const labels = resolveLabels(o.labels, c.num_classes, model.meta.classNames);
  const n = labels.length;
  const C = c.in_channels;
  const S = c.input_size;
  const per = n * C * S * S;
  let steps: number;
  try {
    steps = spacedDiffusion({ respacing: o.respacing }).numTimesteps;
  } catch (err) {
    if (err instanceof DiffusionInputError) throw new SampleArgumentError(`--respacing: ${err.message.replace(/^respacing: /, '')}`);
    throw err;
  }
  const drawsNoise = samplerDef.drawsNoise({ eta: o.eta });
  const injected = o.noiseFrom ? readNoise(o.noiseFrom, [n, C, S, S], steps, drawsNoise) : null;

  let state;
  try {
    state = start({
      sampler: o.sampler,
      respacing: o.respacing,
      shape: [C, S, S],
      count: n,
      learnSigma: c.learn_sigma,
      seed: o.seed ?? 0n,
      sampleIndexOffset: o.sampleIndexOffset,
      eta: o.eta,
      recordTrajectory: true,
      ...(injected
        ? {
            noise: {
              z: injected.z,
              stepNoise: (i: number) => (injected.stepNoise ? injected.stepNoise.subarray(i * per, (i + 1) * per) : new Float32Array(per)),
            },
          }
        : {}),
    });
  } catch (err) {
    if (err instanceof DiffusionInputError)
      throw new SampleArgumentError(
        `--${err.field.replace(/[A-Z]/g, (m) => `-${m.toLowerCase()}`)}: ${err.message.slice(err.field.length + 2)}`,
      );
    throw err;
  }

  const rows = guidanceRows(n, o.cfg);
  const outChannels = modelOutChannels(C, c.learn_sigma);
  const input = { x: new Float32Array(rows * C * S * S), t: new BigInt64Array(rows), y: new BigInt64Array(rows) };
  const t = new Array<bigint>(n);
  const guided = new Float32Array(n * outChannels * S * S);
  const timesteps: number[] = [];
  const session = await ort.InferenceSession.create(model.onnxPath);
  try {
    for (let p = next(state); p; p = next(state)) {
      timesteps.push(p.timestep);
      packGuidedRows(input, 0, { x: p.x, t: t.fill(BigInt(p.timestep)), y: labels, n }, o.cfg, c.num_classes);
      const r = await session.run({
        x: new ort.Tensor('float32', input.x, [rows, C, S, S]),
        t: new ort.Tensor('int64', input.t, [rows]),
        y: new ort.Tensor('int64', input.y, [rows]),
      });
      combineGuidance(
        r.out.data as Float32Array,
        { rows: n, outChannels, inChannels: C, plane: S * S, scale: o.cfg, channels: o.guidanceChannels },
        guided,
      );
      advance(state, guided);
      o.onStep?.(p.step + 1, steps);
    }
  } finally {
    await session.release();
  }
  const sample = result(state);
  const trajectory = state.trajectory as Float32Array;
  writeSafetensors(
    o.out,
    [
      { name: 'trajectory', dtype: 'F32', shape: [steps, n, C, S, S], data: trajectory },
      { name: 'sample', dtype: 'F32', shape: [n, C, S, S], data: sample },
      { name: 'timesteps', dtype: 'I64', shape: [steps], data: BigInt64Array.from(timesteps, (t) => BigInt(t)) },
      { name: 'labels', dtype: 'I64', shape: [n], data: BigInt64Array.from(labels, (l) => BigInt(l)) },
    ],
    {
      model: model.meta.name,
      sampler: o.sampler,
      respacing: o.respacing,
      cfg_scale: String(o.cfg),
      guidance_channels: String(o.guidanceChannels),
      eta: String(o.eta),
      noise: o.noiseFrom ? `file:${o.noiseFrom}` : `philox4x32-10 seed ${o.seed ?? 0n} offset ${o.sampleIndexOffset ?? 0}`,
    },
  );
  return { trajectory, sample, timesteps, labels, shape: [n, C, S, S] };
}

function parseSeed(v: string): bigint {
  if (!/^\d+$/.test(v.trim())) throw new SampleArgumentError(`--seed: must be an unsigned 64-bit integer, got "${v}"`);
  const s = BigInt(v.trim());
  if (s >= 1n << 64n) throw new SampleArgumentError(`--seed: must be below 2^64, got ${v}`);
  return s;
}

function parseNumber(flag: string, min: number): (v: string) => number {
  return (v) => {
    const x = Number(v);
    if (v.trim() === '' || !Number.isFinite(x) || x < min) throw new SampleArgumentError(`${flag}: must be a number >= ${min}, got "${v}"`);
    return x;
  };
}

export const command = new Command('sample')
  .description(
    'Sample latents in this process (no services) to reproduce or debug a run; writes trajectory [steps,B,C,H,W], sample [B,C,H,W], timesteps and labels as safetensors.',
  )
  .requiredOption('--model-dir <dir>', 'DiT model directory (from `ditpipe model build dit`)')
  .requiredOption(
    '--labels <list>',
    'comma-separated class labels (indices, or names the model carries, also as output files spell them); one sample each',
  )
  .addOption(new Option('--sampler <name>', 'reverse-diffusion sampler').choices(SAMPLER_NAMES).default(DEFAULT_SAMPLER))
  .option('--respacing <spec>', 'timestep respacing of the 1000-step schedule: "250", "ddim50", "10,10,5"', '250')
  .option('--cfg <scale>', 'classifier-free guidance scale (1 = none)', parseNumber('--cfg', 1), 1)
  .addOption(
    new Option('--guidance-channels <which>', "guided latent channels: 3 (the original's) or all").choices(['3', 'all']).default('3'),
  )
  .option('--eta <eta>', 'DDIM eta (0 = deterministic)', parseNumber('--eta', 0), 0)
  .option('--seed <n>', 'uint64 seed of the Philox noise (default 0)', parseSeed)
  .option('--sample-index-offset <n>', 'noise-stream index of the first sample', (v) => {
    const x = Number(v);
    if (!Number.isInteger(x) || x < 0) throw new SampleArgumentError(`--sample-index-offset: must be a non-negative integer, got "${v}"`);
    return x;
  })
  .option('--noise-from <file>', 'read z [B,C,H,W] and step_noise [steps,B,C,H,W] from a safetensors file instead of drawing noise')
  .requiredOption('--out <file>', 'output .safetensors file')
  .action(
    async (f: {
      modelDir: string;
      labels: string;
      sampler: SamplerName;
      respacing: string;
      cfg: number;
      guidanceChannels: '3' | 'all';
      eta: number;
      seed?: bigint;
      sampleIndexOffset?: number;
      noiseFrom?: string;
      out: string;
    }) => {
      const started = performance.now();
      const r = await runSample({
        modelDir: f.modelDir,
        labels: f.labels.split(','),
        sampler: f.sampler,
        respacing: f.respacing,
        cfg: f.cfg,
        guidanceChannels: f.guidanceChannels === 'all' ? 'all' : 3,
        eta: f.eta,
        seed: f.seed,
        sampleIndexOffset: f.sampleIndexOffset,
        noiseFrom: f.noiseFrom,
        out: f.out,
        onStep: process.stderr.isTTY ? (done, total) => process.stderr.write(`\rstep ${done}/${total}`) : undefined,
      });
      if (process.stderr.isTTY) process.stderr.write('\n');
      const secs = ((performance.now() - started) / 1000).toFixed(2);
      console.log(
        `wrote ${f.out}: ${r.shape[0]} sample(s) [${r.shape.slice(1).join(', ')}], ${r.timesteps.length} ${f.sampler} steps (t ${r.timesteps[0]}→${r.timesteps[r.timesteps.length - 1]}) in ${secs}s`,
      );
    },
  );
