// The compiler writes its graphs in the forms onnxruntime fuses: every biased linear layer is one
// Gemm (bias added inside the GEMM) and the DiT's tanh-GELU becomes one FastGelu kernel. Checked on
// what onnxruntime actually runs (its profiler's kernel list), so a refactor that breaks a fusion
// pattern fails here instead of silently costing speed.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, describe, expect, it } from 'vitest';
import { readDitModelDir, readVaeModelDir } from '../../shared/model/modeldir.ts';
import { testModels } from '../helpers/models.ts';

const dir = mkdtempSync(join(tmpdir(), 'ditpipe-fusion-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** op type → how many kernels of it one forward ran. */
async function kernelsRun(onnxPath: string, feeds: Record<string, ort.Tensor>, tag: string): Promise<Map<string, number>> {
  const prefix = join(dir, tag);
  const session = await ort.InferenceSession.create(onnxPath, {
    graphOptimizationLevel: 'all',
    intraOpNumThreads: 1,
    enableProfiling: true,
    profileFilePrefix: prefix,
  });
  await session.run(feeds);
  session.endProfiling();
  await session.release();
  const file = readdirSync(dir).find((f) => f.startsWith(`${tag}_`) && f.endsWith('.json'));
  if (!file) throw new Error(`onnxruntime wrote no profile for ${tag}`);
  const events = JSON.parse(readFileSync(join(dir, file), 'utf8')) as { cat: string; name: string; args?: { op_name?: string } }[];
  const counts = new Map<string, number>();
  for (const e of events) {
    if (e.cat === 'Node' && e.name.endsWith('_kernel_time') && e.args?.op_name)
      counts.set(e.args.op_name, (counts.get(e.args.op_name) ?? 0) + 1);
  }
  return counts;
}

describe('compiled graphs run as fused onnxruntime kernels', () => {
  it('DiT: one FastGelu per block, no Tanh left, every linear layer a Gemm', async () => {
    const { ditDir } = testModels();
    const { meta, onnxPath } = readDitModelDir(ditDir);
    const { depth, in_channels: c, input_size: s } = meta.config;
    const b = 3;
    const k = await kernelsRun(
      onnxPath,
      {
        x: new ort.Tensor('float32', new Float32Array(b * c * s * s).fill(0.5), [b, c, s, s]),
        t: new ort.Tensor('int64', BigInt64Array.of(1n, 500n, 999n), [b]),
        y: new ort.Tensor('int64', BigInt64Array.of(0n, 3n, 9n), [b]),
      },
      'dit',
    );
    expect(k.get('FastGelu')).toBe(depth);
    expect(k.get('Tanh')).toBeUndefined();
    // Per block: adaLN, qkv, attention output, fc1, fc2; plus the two timestep-MLP layers and the
    // final layer's adaLN and projection.
    expect(k.get('Gemm')).toBe(5 * depth + 4);
  });

  it('VAE decoder: the mid-block attention projections are Gemms', async () => {
    const { vaeDir } = testModels();
    const { meta, onnxPath } = readVaeModelDir(vaeDir);
    const c = meta.config.latent_channels;
    const k = await kernelsRun(onnxPath, { z: new ort.Tensor('float32', new Float32Array(2 * c * 8 * 8).fill(0.1), [2, c, 8, 8]) }, 'vae');
    expect(k.get('Gemm')).toBe(4);
  });
});
