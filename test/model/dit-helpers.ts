// Shared by the DiT tests: golden cases, running a model directory in onnxruntime, fixtures.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import * as ort from 'onnxruntime-node';
import { originalToDiffusers } from '../../shared/model/dit-names.ts';
import type { DitConfig } from '../../shared/model/modeldir.ts';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../../shared/weights/index.ts';

export const ROOT = resolve(import.meta.dirname, '../..');
export const GOLDEN = resolve(ROOT, '../shared/golden/dit');

export interface GoldenCase {
  name: string;
  dir: string;
  config: DitConfig;
  params: number;
  cfgScale: number;
}

export function goldenCases(): GoldenCase[] {
  const index = JSON.parse(readFileSync(join(GOLDEN, 'index.json'), 'utf8')) as {
    cases: Record<string, { config: DitConfig; params: number; cfg_scale: number }>;
  };
  return Object.entries(index.cases).map(([name, c]) => ({
    name,
    dir: join(GOLDEN, name),
    config: c.config,
    params: c.params,
    cfgScale: c.cfg_scale,
  }));
}

export interface GoldenIo {
  x: Float32Array;
  xShape: number[];
  t: BigInt64Array;
  y: BigInt64Array;
  out: Float32Array;
  cfg: { x: Float32Array; xShape: number[]; t: BigInt64Array; y: BigInt64Array; out3ch: Float32Array; outAll: Float32Array };
}

export function goldenIo(dir: string): GoldenIo {
  const f = openSafetensors(join(dir, 'io.safetensors'));
  try {
    return {
      x: f.readF32('x'),
      xShape: f.info('x').shape,
      t: f.readI64('t'),
      y: f.readI64('y'),
      out: f.readF32('out'),
      cfg: {
        x: f.readF32('cfg.x'),
        xShape: f.info('cfg.x').shape,
        t: f.readI64('cfg.t'),
        y: f.readI64('cfg.y'),
        out3ch: f.readF32('cfg.out_3ch'),
        outAll: f.readF32('cfg.out_all'),
      },
    };
  } finally {
    f.close();
  }
}

export async function runDit(
  onnxPath: string,
  x: Float32Array,
  xShape: number[],
  t: BigInt64Array,
  y: BigInt64Array,
): Promise<Float32Array> {
  const s = await ort.InferenceSession.create(onnxPath);
  try {
    const r = await s.run({
      x: new ort.Tensor('float32', x, xShape),
      t: new ort.Tensor('int64', t, [t.length]),
      y: new ort.Tensor('int64', y, [y.length]),
    });
    return r.out.data as Float32Array;
  } finally {
    await s.release();
  }
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

/**
 * Rewrites an original-named DiT safetensors under diffusers `DiTTransformer2DModel` names: qkv split
 * into to_q/to_k/to_v, the embedders copied into every block, pos_embed dropped (diffusers computes it).
 */
export function writeDiffusersFixture(src: string, dst: string, depth: number, tweak?: (name: string, data: Float32Array) => void): void {
  const f = openSafetensors(src);
  const out: TensorToWrite[] = [];
  try {
    for (const name of f.names()) {
      const map = originalToDiffusers(name, depth);
      if (!map) continue;
      const shape = f.info(name).shape;
      const data = f.readF32(name);
      if (map.copies || map.names.length === 1) {
        for (const n of map.names) {
          const copy = data.slice();
          tweak?.(n, copy);
          out.push({ name: n, dtype: 'F32', shape, data: copy });
        }
      } else {
        const rows = shape[0] / map.names.length;
        const per = data.length / map.names.length;
        map.names.forEach((n, i) =>
          out.push({ name: n, dtype: 'F32', shape: [rows, ...shape.slice(1)], data: data.slice(i * per, (i + 1) * per) }),
        );
      }
    }
  } finally {
    f.close();
  }
  writeSafetensors(dst, out);
}

/** Copies a safetensors file with some tensors dropped or replaced. */
export function rewriteSafetensors(
  src: string,
  dst: string,
  edit: (name: string, shape: number[], data: Float32Array) => { shape: number[]; data: Float32Array } | null,
): void {
  const f = openSafetensors(src);
  const out: TensorToWrite[] = [];
  try {
    for (const name of f.names()) {
      const r = edit(name, f.info(name).shape, f.readF32(name));
      if (r) out.push({ name, dtype: 'F32', shape: r.shape, data: r.data });
    }
  } finally {
    f.close();
  }
  writeSafetensors(dst, out);
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the real `ditpipe` binary. */
export function cli(args: string[]): Promise<CliResult> {
  return new Promise((res) => {
    execFile(process.execPath, [join(ROOT, 'bin/ditpipe.js'), ...args], { cwd: ROOT, maxBuffer: 1 << 24 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      res({ code, stdout, stderr });
    });
  });
}
