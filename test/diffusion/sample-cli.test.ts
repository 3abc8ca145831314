// `ditpipe sample`: the golden ddpm10-cfg4 run reproduced through the CLI with the golden noise;
// seeded runs reproducible and independent of batching; bad arguments named and exit non-zero.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runSample, SampleArgumentError, type SampleOptions } from '../../cli/sample.ts';
import { buildDitModel } from '../../shared/model/dit.ts';
import type { DitConfig } from '../../shared/model/modeldir.ts';
import { openSafetensors } from '../../shared/weights/index.ts';

const ROOT = resolve(import.meta.dirname, '../..');
const GOLDEN = resolve(ROOT, '../shared/golden/dit');
const config = (JSON.parse(readFileSync(join(GOLDEN, 'index.json'), 'utf8')) as { cases: Record<string, { config: DitConfig }> }).cases[
  'dit-tiny-p2'
].config;
const TRAJ = join(GOLDEN, 'dit-tiny-p2', 'traj-ddpm10-cfg4.safetensors');

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-sample-'));
const modelDir = join(tmp, 'model');
beforeAll(() => {
  buildDitModel({ weights: join(GOLDEN, 'dit-tiny-p2', 'weights.safetensors'), out: modelDir, config });
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const run = promisify(execFile);
const cli = (args: string[]) => run(process.execPath, [join(ROOT, 'bin/ditpipe.js'), 'sample', ...args], { cwd: ROOT });

describe('ditpipe sample', () => {
  it('reproduces the golden ddpm10-cfg4 trajectory from its noise', async () => {
    const out = join(tmp, 'golden-run.safetensors');
    const { stdout } = await cli([
      '--model-dir',
      modelDir,
      '--labels',
      '3,7',
      '--sampler',
      'ddpm',
      '--respacing',
      '10',
      '--cfg',
      '4',
      '--noise-from',
      TRAJ,
      '--out',
      out,
    ]);
    expect(stdout).toMatch(/2 sample\(s\) \[4, 8, 8\], 10 ddpm steps \(t 999→0\)/);
    const g = openSafetensors(TRAJ);
    const want = g.readF32('trajectory');
    expect(Array.from(g.readI64('labels'))).toEqual([3n, 7n]);
    g.close();
    const f = openSafetensors(out);
    expect(f.info('trajectory').shape).toEqual([10, 2, 4, 8, 8]);
    const got = f.readF32('trajectory');
    const sample = f.readF32('sample');
    expect(Array.from(f.readI64('timesteps'), Number)).toEqual([999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
    f.close();
    const per = 2 * 4 * 8 * 8;
    for (let s = 0; s < 10; s++) {
      let e = 0;
      let m = 0;
      for (let i = s * per; i < (s + 1) * per; i++) {
        e = Math.max(e, Math.abs(got[i] - want[i]));
        m = Math.max(m, Math.abs(want[i]));
      }
      // Same bound as test/diffusion/trajectory.test.ts (free-running): 1e-3, or 16 ulps of |x|.
      expect(e, `step ${s}`).toBeLessThanOrEqual(Math.max(1e-3, 2 ** -19 * m));
    }
    expect(Array.from(sample)).toEqual(Array.from(got.subarray(9 * per)));
  });

  const base = (over: Partial<SampleOptions>): SampleOptions => ({
    modelDir,
    labels: ['3', '7'],
    sampler: 'ddim',
    respacing: '8',
    cfg: 2,
    guidanceChannels: 3,
    eta: 0.5,
    out: join(tmp, 'x.safetensors'),
    ...over,
  });

  it('is reproducible from a seed, and a sample does not depend on its batch', async () => {
    const a = await runSample(base({ seed: 42n }));
    const b = await runSample(base({ seed: 42n }));
    expect(Array.from(a.sample)).toEqual(Array.from(b.sample));
    const alone = await runSample(base({ seed: 42n, labels: ['7'], sampleIndexOffset: 1 }));
    expect(Array.from(alone.sample)).toEqual(Array.from(a.sample.subarray(256)));
    const other = await runSample(base({ seed: 43n }));
    expect(Array.from(other.sample)).not.toEqual(Array.from(a.sample));
  });

  it('names the bad argument', async () => {
    const bad: Array<[Partial<SampleOptions>, RegExp]> = [
      [{ labels: ['3', '10'] }, /--labels: 10 is not a class of this model \(0\.\.9\)/],
      [{ labels: ['boot'] }, /--labels: 'boot' is neither a class index/],
      [{ respacing: '8,x' }, /--respacing: section count 'x' is not a non-negative integer/],
      [{ respacing: '2000' }, /--respacing: '2000' asks for 2000 steps but the schedule has 1000/],
      [{ cfg: 0.5 }, /--cfg: must be a number >= 1/],
      [{ seed: 1n, noiseFrom: TRAJ }, /--seed and --noise-from exclude each other/],
      [{ noiseFrom: TRAJ, labels: ['1'] }, /tensor 'z' has shape \[2, 4, 8, 8\], expected \[1, 4, 8, 8\]/],
      [{ noiseFrom: TRAJ, sampler: 'ddpm' }, /tensor 'step_noise' has shape \[10, 2, 4, 8, 8\], expected \[8, 2, 4, 8, 8\]/],
      [{ modelDir: tmp }, /is not a model directory: model\.json is missing/],
    ];
    for (const [over, msg] of bad) await expect(runSample(base(over)), msg.source).rejects.toThrow(msg);
    await expect(runSample(base({ labels: [] }))).rejects.toBeInstanceOf(SampleArgumentError);
  });

  it('exits non-zero with the message on bad input', async () => {
    const err = await cli(['--model-dir', modelDir, '--labels', '1', '--respacing', 'ddim999', '--out', join(tmp, 'y.safetensors')]).then(
      () => null,
      (e: { code: number; stderr: string }) => e,
    );
    expect(err?.code).toBe(1);
    expect(err?.stderr).toMatch(/--respacing: 'ddim999': no integer stride gives exactly 999 steps/);
  });
});
