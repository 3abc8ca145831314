// The committed default model (models/fashion-mnist): its weights compile with ditpipe's own
// compiler, and a fixed-seed generation through the real pipeline is identical across runs.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { compileDecoderConfig } from '../../services/decoder/config.ts';
import { startDecoderService } from '../../services/decoder/service.ts';
import { compileDenoiserConfig } from '../../services/denoiser/config.ts';
import { startDenoiserService } from '../../services/denoiser/service.ts';
import { compileSchedulerConfig } from '../../services/scheduler/config.ts';
import { startSchedulerService } from '../../services/scheduler/service.ts';
import { GrpcServer } from '../../shared/server/grpc.ts';
import { SamplerApi } from '../../shared/client.ts';
import { SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { decodePng } from '../../shared/image/png.ts';
import { GRAPH_REVISION, readDitModelDir, readVaeModelDir } from '../../shared/model/modeldir.ts';
import { InProcBus } from '../../shared/transport/inproc.ts';
import { ensureDefaultModels } from '../../cli/default-model.ts';

const cache = mkdtempSync(join(tmpdir(), 'ditpipe-fashion-'));
afterAll(() => rmSync(cache, { recursive: true, force: true }));

const FASHION = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'];

async function generateOnce(ditDir: string, vaeDir: string): Promise<Uint8Array[]> {
  const bus = new InProcBus();
  const transports = ['denoiser', 'decoder', 'scheduler'].map((n) => bus.connect(n));
  const denoiser = await startDenoiserService(compileDenoiserConfig({ modelDir: ditDir, intraOpThreads: 1 }), transports[0]);
  const decoder = await startDecoderService(compileDecoderConfig({ modelDir: vaeDir, intraOpThreads: 1 }), transports[1]);
  const name = readDitModelDir(ditDir).meta.name;
  const grpc = new GrpcServer({ host: '127.0.0.1', port: 0 });
  const scheduler = startSchedulerService(compileSchedulerConfig({ models: [name] }), transports[2], { grpc });
  await grpc.listen();
  const api = new SamplerApi(grpc.address);
  try {
    const res = await api.generate({ model: name, classLabels: [{ name: 'Sandal' }, { index: 1 }, { name: 'bag' }], sampler: SamplerKind.SAMPLER_KIND_DDIM, numSteps: 10, cfgScale: 4, seed: 42n });
    return res.images.map((i) => i.png);
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
    expect(vae.scalingFactor).toBeGreaterThan(0);
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
  });

  it('generates the same grayscale images for a fixed seed, run after run', async () => {
    const a = await generateOnce(dirs.ditDir, dirs.vaeDir);
    const b = await generateOnce(dirs.ditDir, dirs.vaeDir);
    expect(a).toHaveLength(3);
    a.forEach((png, i) => expect(Buffer.from(png).equals(b[i])).toBe(true));
    const px = decodePng(a[0]);
    expect([px.width, px.height, px.channels]).toEqual([32, 32, 1]);
    expect(new Set(px.data).size).toBeGreaterThan(8);
  });
});
