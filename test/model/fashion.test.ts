// The committed default model (models/fashion-mnist): its weights compile with ditpipe's own
// compiler (the same way `model build` does from the committed files), it serves the dataset's
// 28×28 images, and a fixed-seed generation through the real pipeline is identical across runs.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { execFile } from 'node:child_process';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { compileDecoderConfig } from '../../services/decoder/config.ts';
import { startDecoderService } from '../../services/decoder/service.ts';
import { compileDenoiserConfig } from '../../services/denoiser/config.ts';
import { startDenoiserService } from '../../services/denoiser/service.ts';
import { compileSchedulerConfig } from '../../services/scheduler/config.ts';
import { startSchedulerService } from '../../services/scheduler/service.ts';
import { GrpcServer } from '../../shared/server/grpc.ts';
import { SamplerApi } from '../../shared/client.ts';
import { PreviewMethod, SamplerKind, type GenerateEvent, type ModelInfo } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { decodePng } from '../../shared/image/png.ts';
import { GRAPH_REVISION, readDitModelDir, readModelDir, readVaeModelDir } from '../../shared/model/modeldir.ts';
import { InProcBus } from '../../shared/transport/inproc.ts';
import { ensureDefaultModels } from '../../cli/default-model.ts';

const ROOT = resolve(import.meta.dirname, '../..');
const cache = mkdtempSync(join(tmpdir(), 'ditpipe-fashion-'));

function ditpipe(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done) => {
    execFile(process.execPath, ['bin/ditpipe.js', ...args], { cwd: ROOT, timeout: 120_000 }, (err, stdout, stderr) => {
      done({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}
afterAll(() => rmSync(cache, { recursive: true, force: true }));

// The committed autoencoder's latent scaling factor (1/std of its encoded training set), not SD's 0.18215.
const SCALING = (JSON.parse(readFileSync(join(ROOT, 'models/fashion-mnist/vae.json'), 'utf8')) as { scaling_factor: number })
  .scaling_factor;
const FASHION = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'];

async function generateOnce(ditDir: string, vaeDir: string): Promise<{ pngs: Uint8Array[]; models: ModelInfo[] }> {
  const bus = new InProcBus();
  const transports = ['denoiser', 'decoder', 'scheduler'].map((n) => bus.connect(n));
  const denoiser = await startDenoiserService(compileDenoiserConfig({ modelDir: ditDir, intraOpThreads: 1 }), transports[0]);
  const decoder = await startDecoderService(compileDecoderConfig({ modelDir: vaeDir, intraOpThreads: 1 }), transports[1]);
  const name = readDitModelDir(ditDir).meta.name;
  const grpc = new GrpcServer({ host: '127.0.0.1', port: 0 });
  const scheduler = await startSchedulerService(compileSchedulerConfig({ models: [name] }), transports[2], { grpc });
  await grpc.listen();
  const api = new SamplerApi(grpc.address);
  try {
    const res = await api.generate({
      model: name,
      classLabels: [{ name: 'Sandal' }, { index: 1 }, { name: 'bag' }],
      sampler: SamplerKind.SAMPLER_KIND_DDIM,
      numSteps: 10,
      cfgScale: 4,
      seed: 42n,
    });
    for (const img of res.images) expect([img.width, img.height]).toEqual([28, 28]);
    return { pngs: res.images.map((i) => i.png), models: await api.listModels() };
  } finally {
    api.close();
    await scheduler.stop(1000);
    await grpc.stop(1000);
    await Promise.all([denoiser.stop(1000), decoder.stop(1000)]);
    await Promise.all(transports.map((t) => t.close()));
  }
}

describe('the committed Fashion-MNIST model', () => {
  let dirs: { ditDir: string; vaeDir: string };

  it('compiles from the committed weights with its class names and VAE pairing', () => {
    const built: string[] = [];
    dirs = ensureDefaultModels({ cacheDir: cache, log: (l) => built.push(l) });
    expect(built).toEqual([expect.stringMatching(/^building the VAE decoder/), expect.stringMatching(/^building the DiT/)]);
    const dit = readDitModelDir(dirs.ditDir).meta;
    const vae = readVaeModelDir(dirs.vaeDir).meta;
    expect(dit.classNames).toEqual(FASHION);
    expect(dit.config).toMatchObject({ input_size: 8, in_channels: 4, num_classes: 10, learn_sigma: true });
    expect(dit.vae).toBe(vae.name);
    expect(vae.config.out_channels).toBe(1);
    expect(vae.scalingFactor).toBe(SCALING);
    expect(SCALING).not.toBe(0.18215);
    expect(vae.outputCrop).toEqual({ top: 2, right: 2, bottom: 2, left: 2 });
    expect(dit.graphRevision).toBe(GRAPH_REVISION);
    // Rebuilding is skipped while the weights and the compiler's graphs are unchanged...
    const again: string[] = [];
    expect(ensureDefaultModels({ cacheDir: cache, log: (l) => again.push(l) })).toEqual(dirs);
    expect(again).toEqual([]);
    // ...and a model built by an older compiler (no graphRevision) is rebuilt.
    const metaPath = join(dirs.ditDir, 'model.json');
    const { graphRevision: _, ...old } = JSON.parse(readFileSync(metaPath, 'utf8')) as Record<string, unknown>;
    writeFileSync(metaPath, JSON.stringify(old));
    const stale: string[] = [];
    ensureDefaultModels({ cacheDir: cache, log: (l) => stale.push(l) });
    expect(stale).toEqual([expect.stringMatching(/^building the DiT/)]);
    expect(readDitModelDir(dirs.ditDir).meta.graphRevision).toBe(GRAPH_REVISION);
    // So is one built before the step-cache graphs.
    const { cacheGraphs: ___, ...uncached } = JSON.parse(readFileSync(metaPath, 'utf8')) as Record<string, unknown>;
    writeFileSync(metaPath, JSON.stringify(uncached));
    const recached: string[] = [];
    ensureDefaultModels({ cacheDir: cache, log: (l) => recached.push(l) });
    expect(recached).toEqual([expect.stringMatching(/^building the DiT/)]);
    expect(readDitModelDir(dirs.ditDir).meta.cacheGraphs?.skip.onnx).toBe('model.skip.onnx');
    // A VAE built before vae.json declared its output crop is rebuilt too.
    const vaeMetaPath = join(dirs.vaeDir, 'model.json');
    const { outputCrop: __, ...uncropped } = JSON.parse(readFileSync(vaeMetaPath, 'utf8')) as Record<string, unknown>;
    writeFileSync(vaeMetaPath, JSON.stringify(uncropped));
    const recropped: string[] = [];
    ensureDefaultModels({ cacheDir: cache, log: (l) => recropped.push(l) });
    expect(recropped).toEqual([expect.stringMatching(/^building the VAE/)]);
    expect(readVaeModelDir(dirs.vaeDir).meta.outputCrop).toEqual({ top: 2, right: 2, bottom: 2, left: 2 });
  });

  it('rebuilds by hand from the committed files with `model build` to the same model directories', async () => {
    const vaeOut = join(cache, 'by-hand-vae');
    const ditOut = join(cache, 'by-hand-dit');
    const vae = await ditpipe([
      'model',
      'build',
      'vae',
      '--weights',
      'models/fashion-mnist/vae.safetensors',
      '--name',
      'fashion-mnist-vae',
      '--out',
      vaeOut,
    ]);
    expect(vae.code, vae.stderr).toBe(0);
    expect(vae.stderr).toContain(`scaling factor: ${SCALING} (models/fashion-mnist/vae.json)`);
    const dit = await ditpipe([
      'model',
      'build',
      'dit',
      '--weights',
      'models/fashion-mnist/dit.safetensors',
      '--config',
      'models/fashion-mnist/dit.json',
      '--name',
      'fashion-mnist',
      '--vae',
      'fashion-mnist-vae',
      '--quiet',
      '--out',
      ditOut,
    ]);
    expect(dit.code, dit.stderr).toBe(0);
    const same = (a: string, b: string): void => {
      const strip = (d: string): unknown => readModelDir(d).meta;
      expect(strip(a)).toEqual(strip(b));
      expect(readFileSync(join(a, 'model.onnx')).equals(readFileSync(join(b, 'model.onnx')))).toBe(true);
    };
    same(vaeOut, dirs.vaeDir);
    same(ditOut, dirs.ditDir);
  });

  it("generates the same grayscale 28×28 images (the dataset's size) for a fixed seed, run after run", async () => {
    const { pngs: a, models } = await generateOnce(dirs.ditDir, dirs.vaeDir);
    const { pngs: b } = await generateOnce(dirs.ditDir, dirs.vaeDir);
    expect(a).toHaveLength(3);
    a.forEach((png, i) => expect(Buffer.from(png).equals(b[i])).toBe(true));
    const px = decodePng(a[0]);
    // The VAE decodes 32×32 (the padded training size); its model.json crops 2 px from each edge.
    expect([px.width, px.height, px.channels]).toEqual([28, 28, 1]);
    expect(models.map((m) => [m.name, m.imageSize, m.imageChannels])).toEqual([['fashion-mnist', 28, 1]]);
    expect(new Set(px.data).size).toBeGreaterThan(8);
  });

  it('projection previews resemble the image they lead to (near the end of sampling, averaged to latent pixels)', async () => {
    const bus = new InProcBus();
    const transports = ['denoiser', 'decoder', 'scheduler'].map((n) => bus.connect(n));
    const denoiser = await startDenoiserService(compileDenoiserConfig({ modelDir: dirs.ditDir, intraOpThreads: 1 }), transports[0]);
    const decoder = await startDecoderService(compileDecoderConfig({ modelDir: dirs.vaeDir, intraOpThreads: 1 }), transports[1]);
    const name = readDitModelDir(dirs.ditDir).meta.name;
    const grpc = new GrpcServer({ host: '127.0.0.1', port: 0 });
    const scheduler = await startSchedulerService(compileSchedulerConfig({ models: [name] }), transports[2], { grpc });
    try {
      const events: GenerateEvent[] = [];
      const res = await scheduler.scheduler.generate(
        {
          model: name,
          classLabels: FASHION.map((n) => ({ name: n })),
          sampler: SamplerKind.SAMPLER_KIND_DDIM,
          numSteps: 20,
          cfgScale: 4,
          seed: 1n,
          guidanceChannels: 0,
          outputFormat: 0,
          cachePolicy: 0,
          preview: { everySteps: 19, method: PreviewMethod.PREVIEW_METHOD_PROJECTION },
        },
        { onEvent: (e) => events.push(e) },
      );
      const previews = events.filter((e) => e.preview).map((e) => e.preview!);
      expect(previews).toHaveLength(10);
      // Pearson correlation over all latent pixels of the 10 images: projection vs final image pooled
      // over each latent pixel's 4×4 footprint (what survived the 2 px output crop of the 28×28 image).
      const a: number[] = [];
      const b: number[] = [];
      for (const pv of previews) {
        const img = decodePng(pv.png);
        const fin = decodePng(res.images[pv.sampleIndex].png);
        expect([img.width, img.height, img.channels]).toEqual([8, 8, 1]);
        expect([fin.width, fin.height]).toEqual([28, 28]);
        for (let i = 0; i < 64; i++) {
          let m = 0;
          let seen = 0;
          for (let k = 0; k < 16; k++) {
            const y = Math.floor(i / 8) * 4 + Math.floor(k / 4) - 2;
            const x = (i % 8) * 4 + (k % 4) - 2;
            if (y < 0 || y >= 28 || x < 0 || x >= 28) continue;
            m += fin.data[y * 28 + x];
            seen++;
          }
          a.push(img.data[i]);
          b.push(m / seen);
        }
      }
      const mean = (v: number[]): number => v.reduce((x, y) => x + y, 0) / v.length;
      const [ma, mb] = [mean(a), mean(b)];
      const cov = a.reduce((s, x, i) => s + (x - ma) * (b[i] - mb), 0);
      const r = cov / Math.sqrt(a.reduce((s, x) => s + (x - ma) ** 2, 0) * b.reduce((s, y) => s + (y - mb) ** 2, 0));
      expect(r).toBeGreaterThan(0.7); // 0.84 when written
    } finally {
      await scheduler.stop(1000);
      await Promise.all([denoiser.stop(1000), decoder.stop(1000)]);
      await Promise.all(transports.map((t) => t.close()));
    }
  });
});
