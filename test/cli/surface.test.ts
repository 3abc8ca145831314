// The command line as a newcomer meets it: one naming scheme, errors in flag terms (not request
// field or proto enum names), class names as output files spell them, a run folder with run.json
// that is never mixed with an earlier run, --version, and every service flag settable from the
// environment (a denoiser started from environment variables alone).
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeClasses, findClass } from '../../cli/classes.ts';
import { defaultTitle } from '../../cli/generate.ts';
import { freePorts } from '../../cli/ports.ts';
import { inCliTerms, UsageError } from '../../cli/request-errors.ts';
import { runSample } from '../../cli/sample.ts';
import { InvalidArgumentError, NotFoundError } from '../../shared/errors.ts';
import { decodePng } from '../../shared/image/png.ts';
import { VERSION } from '../../shared/version.ts';
import { healthStatus } from '../helpers/grpc.ts';
import { FASHION_CLASS_NAMES, testModels, variantModels } from '../helpers/models.ts';
import { assertNoNatsServersRunning, startNatsServer } from '../helpers/nats.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';
import { liveServiceProcesses, spawnService } from '../helpers/processes.ts';

const BIN = resolve(import.meta.dirname, '../../bin/ditpipe.js');
const dir = mkdtempSync(join(tmpdir(), 'ditpipe-surface-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function ditpipe(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((done) => {
    const p = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    p.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    p.once('exit', (code) => done({ code, stdout, stderr }));
  });
}

describe('class names', () => {
  it('match by name or by the file-name form, case-insensitive', () => {
    expect(findClass('Ankle boot', FASHION_CLASS_NAMES)).toBe(9);
    expect(findClass('ankle_boot', FASHION_CLASS_NAMES)).toBe(9);
    expect(findClass('T-shirt_top', FASHION_CLASS_NAMES)).toBe(0);
    expect(findClass('t-shirt/top', FASHION_CLASS_NAMES)).toBe(0);
    expect(findClass('Boot', FASHION_CLASS_NAMES)).toBe(-1);
    expect(describeClasses(FASHION_CLASS_NAMES.slice(0, 2))).toBe('0 T-shirt/top (T-shirt_top), 1 Trouser');
  });

  it('`sample --labels` takes the file-name form too', async () => {
    const r = await runSample({
      modelDir: variantModels().namedDitDir,
      labels: ['Ankle_boot', 'T-shirt_top'],
      sampler: 'ddim',
      respacing: '2',
      cfg: 1,
      guidanceChannels: 3,
      eta: 0,
      out: join(dir, 'labels.safetensors'),
    });
    expect(r.labels).toEqual([9, 0]);
  });
});

describe('server errors in CLI terms', () => {
  it('maps request fields to flags and enum names to CLI values, in one table', () => {
    const t = (message: string, field?: string): string => inCliTerms(new InvalidArgumentError(message, { field })).message;
    expect(t('class_labels asks for 100 images; at most 64 per request', 'class_labels')).toBe(
      '--class × --num asks for 100 images; at most 64 per request',
    );
    expect(t('eta applies to SAMPLER_KIND_DDIM only; got eta 0.5 with SAMPLER_KIND_DPM_SOLVER_PP', 'eta')).toBe(
      '--eta applies to --sampler ddim only; got eta 0.5 with --sampler dpmpp',
    );
    expect(t('cfg_scale must be finite and >= 1 (1 = no guidance), got NaN', 'cfg_scale')).toBe(
      '--cfg must be finite and >= 1 (1 = no guidance), got NaN',
    );
    expect(t('class_labels[3]: class index must be within 0..9 for model "m", got 12', 'class_labels[3]')).toBe(
      '--class: class index must be within 0..9 for model "m", got 12',
    );
    expect(t('unknown value 7', 'guidance_channels')).toBe('--guidance-channels: unknown value 7');
    expect(inCliTerms(new InvalidArgumentError('x'))).toBeInstanceOf(UsageError);
    const other = new NotFoundError('model "x" is not served here');
    expect(inCliTerms(other)).toBe(other);
  });

  it('names steps, cfg and seed in the grid title', () => {
    expect(defaultTitle({ requestId: 'r', model: 'fashion-mnist', seed: 7n, numSteps: 50, cfgScale: 4 }, 'ddim')).toBe(
      'fashion-mnist · ddim · 50 steps · cfg 4 · seed 7',
    );
  });
});

describe('ditpipe generate against a served model', () => {
  let pipeline: Pipeline;
  beforeAll(async () => {
    const { namedDitDir, croppedVaeDir } = variantModels();
    pipeline = await startPipeline({ transport: { kind: 'inproc' }, models: { ditDir: namedDitDir, vaeDir: croppedVaeDir } });
  });
  afterAll(async () => {
    await pipeline?.stop();
  });
  const gen = (...args: string[]) => ditpipe(['generate', '--server', pipeline.address, ...args]);

  it('takes class names as the output files spell them, and writes run.json with request, seed and timings', async () => {
    const out = join(dir, 'run1');
    const r = await gen('--class', 'Ankle_boot,T-shirt_top', '--steps', '2', '--sampler', 'ddim', '--seed', '3', '--out', out);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('2 image(s) from dit-tiny-named, seed 3, 2 steps, cfg 4,');
    expect(readdirSync(out).sort()).toEqual(['000-Ankle_boot.png', '001-T-shirt_top.png', 'grid.png', 'run.json']);
    const run = JSON.parse(readFileSync(join(out, 'run.json'), 'utf8')) as Record<string, unknown> & {
      request: Record<string, unknown>;
      timings: Record<string, number>;
      images: Array<Record<string, unknown>>;
    };
    expect(run).toMatchObject({
      server: pipeline.address,
      model: 'dit-tiny-named',
      seed: '3',
      numSteps: 2,
      cfgScale: 4,
      grid: 'grid.png',
      tool: `ditpipe ${VERSION}`,
    });
    expect(run.request).toEqual({
      model: 'dit-tiny-named',
      classLabels: [{ index: 9 }, { index: 0 }],
      numSteps: 2,
      sampler: 'SAMPLER_KIND_DDIM',
      guidanceChannels: 'GUIDANCE_CHANNELS_THREE',
      seed: '3',
    });
    for (const k of ['queueMs', 'denoiseMs', 'decodeMs', 'totalMs', 'clientMs']) expect(run.timings[k], k).toBeGreaterThan(0);
    expect(run.images).toEqual([
      { file: '000-Ankle_boot.png', sampleIndex: 0, classLabel: 9, className: 'Ankle boot', width: 28, height: 28, cached: false },
      { file: '001-T-shirt_top.png', sampleIndex: 1, classLabel: 0, className: 'T-shirt/top', width: 28, height: 28, cached: false },
    ]);
    expect(decodePng(readFileSync(join(out, '000-Ankle_boot.png'))).width).toBe(28);
  });

  it('--no-cache asks the server to sample every image (cache_policy BYPASS in the request sent)', async () => {
    const out = join(dir, 'nocache');
    const r = await gen('--class', '1', '--steps', '1', '--seed', '4', '--no-cache', '--out', out);
    expect(r.code, r.stderr).toBe(0);
    const run = JSON.parse(readFileSync(join(out, 'run.json'), 'utf8')) as {
      request: Record<string, unknown>;
      flags: Record<string, unknown>;
    };
    expect(run.request.cachePolicy).toBe('CACHE_POLICY_BYPASS');
    expect(run.flags.cache).toBe(false);
  });

  it('refuses a non-empty --out, and with --overwrite replaces only what a run wrote', async () => {
    const out = join(dir, 'run2');
    expect((await gen('--class', '1,2', '--steps', '1', '--out', out)).code).toBe(0);
    writeFileSync(join(out, 'notes.txt'), 'mine');
    const before = readFileSync(join(out, '000-Trouser.png'));
    const again = await gen('--class', '8', '--steps', '1', '--out', out);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/--out .*run2: the folder is not empty .*give a new --out, or --overwrite/);
    expect(readFileSync(join(out, '000-Trouser.png')).equals(before)).toBe(true);
    const over = await gen('--class', '8', '--steps', '1', '--out', out, '--overwrite');
    expect(over.code, over.stderr).toBe(0);
    expect(readdirSync(out).sort()).toEqual(['000-Bag.png', 'grid.png', 'notes.txt', 'run.json']);
  });

  it('names the flags the user typed, in CLI values', async () => {
    const many = await gen('--class', '1', '--num', '100', '--out', join(dir, 'many'));
    expect(many.code).toBe(1);
    expect(many.stderr).toContain('--class × --num asks for 100 images; at most 64 per request');
    expect(many.stderr).not.toContain('class_labels');
    const eta = await gen('--class', '1', '--eta', '0.5', '--out', join(dir, 'eta'));
    expect(eta.code).toBe(1);
    expect(eta.stderr).toContain('--eta applies to --sampler ddim only; got eta 0.5 with --sampler ddpm');
    expect(eta.stderr).not.toContain('SAMPLER_KIND');
    const name = await gen('--class', 'Boot', '--out', join(dir, 'boot'));
    expect(name.code).toBe(1);
    expect(name.stderr).toContain('--class Boot: not a class of dit-tiny-named (classes: 0 T-shirt/top (T-shirt_top), 1 Trouser,');
    const index = await gen('--class', '10', '--out', join(dir, 'ten'));
    expect(index.stderr).toContain('--class 10: not a class of dit-tiny-named (classes 0..9)');
    const model = await gen('--model', 'nope', '--class', '1', '--out', join(dir, 'nope'));
    expect(model.stderr).toContain(`--model nope: not served by ${pipeline.address} (serving: dit-tiny-named)`);
    // Nothing was written for a refused request (a folder made for it stays empty, so it can be reused).
    for (const d of ['many', 'eta', 'boot', 'ten', 'nope'])
      expect(existsSync(join(dir, d)) ? readdirSync(join(dir, d)) : [], d).toEqual([]);
  });
});

describe('the command line', () => {
  it('prints its version', async () => {
    const r = await ditpipe(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(`ditpipe ${VERSION}`);
  });

  it('runs a denoiser configured by environment variables alone', async () => {
    const nats = await startNatsServer();
    const [port] = await freePorts(1);
    const p = spawnService('denoiser', ['denoiser'], {
      NATS_URL: nats.url,
      DITPIPE_MODEL_DIR: testModels().ditDir,
      DITPIPE_NAME: 'from-env',
      DITPIPE_GRPC_PORT: String(port),
      DITPIPE_METRICS_PORT: '-1',
      DITPIPE_THREADS: '1',
    });
    try {
      const line = await p.waitFor(/^serving /);
      expect(line).toMatchObject({ model: 'from-env', grpcPort: port });
      expect(await healthStatus(`127.0.0.1:${port}`)).toBe(1);
    } finally {
      expect(await p.stop()).toBe(0);
      await nats.stop();
    }
    expect(liveServiceProcesses()).toBe(0);
    assertNoNatsServersRunning();
  });
});
