// The pipeline as deployed: nats-server plus scheduler, denoisers and decoder as separate
// `ditpipe` processes, driven over gRPC; including a denoiser killed in the middle of a request
// (more faults, under load, in faults.test.ts).
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SamplerApi } from '../../shared/client.ts';
import { Code } from '../../shared/errors.ts';
import { GRAPH_REVISION } from '../../shared/model/modeldir.ts';
import { startNatsServer, assertNoNatsServersRunning, type NatsServerHandle } from '../helpers/nats.ts';
import { DIT_NAME, testModels, VAE_NAME } from '../helpers/models.ts';
import { startPipeline } from '../helpers/pipeline.ts';
import { liveServiceProcesses, spawnService, type ServiceProcess } from '../helpers/processes.ts';

let nats: NatsServerHandle;
let procs: ServiceProcess[] = [];
let denoisers: ServiceProcess[] = [];
let api: SamplerApi;

const request = { model: DIT_NAME, classLabels: [{ index: 3 }, { name: 'seven' }], numSteps: 6, cfgScale: 4, seed: 1234n };

beforeAll(async () => {
  const { ditDir, vaeDir } = testModels();
  nats = await startNatsServer();
  const common = ['--nats-url', nats.url, '--metrics-port', '-1', '--shutdown-grace', '2000'];
  denoisers = [0, 1].map((i) =>
    spawnService(`denoiser-${i}`, ['denoiser', ...common, '--model-dir', ditDir, '--grpc-port', '-1', '--threads', '1', '--max-wait', '1']),
  );
  const decoder = spawnService('decoder', ['decoder', ...common, '--model-dir', vaeDir, '--grpc-port', '-1', '--threads', '1']);
  const scheduler = spawnService('scheduler', [
    'scheduler',
    '--nats-url',
    nats.url,
    '--models',
    DIT_NAME,
    '--vae',
    `${DIT_NAME}=${VAE_NAME}`,
    '--grpc-port',
    '0',
    '--host',
    '127.0.0.1',
    '--http-port',
    '-1',
    '--metrics-port',
    '0',
    // Off: the tests repeat a request to compare bytes, and a cache hit would run no step.
    '--repeat-cache-mib',
    '0',
  ]);
  procs = [...denoisers, decoder, scheduler];
  await Promise.all([...denoisers, decoder].map((p) => p.waitFor(/^serving /)));
  const ready = await scheduler.waitFor(/^Sampler API on/);
  api = new SamplerApi(`127.0.0.1:${Number(ready.port)}`);
}, 180_000);

afterAll(async () => {
  api?.close();
  const codes = await Promise.all(procs.map((p) => p.stop()));
  await nats?.stop();
  assertNoNatsServersRunning();
  expect(liveServiceProcesses()).toBe(0);
  // Every process that was not killed on purpose shut down cleanly on SIGTERM.
  procs.forEach((p, i) => {
    if (p !== denoisers[0]) expect(codes[i], `${p.name}: ${p.log()}`).toBe(0);
  });
});

describe('separate processes over NATS', () => {
  it('serve a request end to end, byte-identical to the in-process pipeline', async () => {
    const res = await api.generate(request, { timeoutMs: 60_000 });
    expect(res.images).toHaveLength(2);
    const inproc = await startPipeline({ transport: { kind: 'inproc' } });
    try {
      const ref = await inproc.api.generate(request);
      res.images.forEach((img, i) => expect(Buffer.from(img.png).equals(ref.images[i].png)).toBe(true));
    } finally {
      await inproc.stop();
    }
    const models = await api.listModels();
    expect(models[0].replicas).toBe(2);
  });

  it('finish a request whose denoiser replica is killed mid-request', async () => {
    const ref = await api.generate({ ...request, numSteps: 60 });
    let steps = 0;
    let killed = false;
    const images = [];
    for await (const ev of api.generateStream({ ...request, numSteps: 60 }, { timeoutMs: 120_000 })) {
      if (ev.progress && ++steps === 10 && !killed) {
        killed = true;
        denoisers[0].proc.kill('SIGKILL');
      }
      if (ev.image?.image) images.push(ev.image.image);
    }
    expect(killed).toBe(true);
    expect(steps).toBe(60);
    images.sort((a, b) => a.sampleIndex - b.sampleIndex);
    images.forEach((img, i) => expect(Buffer.from(img.png).equals(ref.images[i].png)).toBe(true));
    expect((await api.listModels())[0].replicas).toBe(1);
    // The pool kept serving: a new request needs no retry.
    expect((await api.generate(request)).images).toHaveLength(2);
  });

  it('a replica serving a model directory built by an older compiler warns that a rebuild is faster', async () => {
    const { ditDir, vaeDir } = testModels();
    const old = mkdtempSync(join(tmpdir(), 'ditpipe-old-graphs-'));
    try {
      const args = ['--nats-url', nats.url, '--metrics-port', '-1', '--grpc-port', '-1', '--threads', '1'];
      const started = (['denoiser', 'decoder'] as const).map((kind) => {
        const dir = join(old, kind);
        cpSync(kind === 'denoiser' ? ditDir : vaeDir, dir, { recursive: true });
        const metaPath = join(dir, 'model.json');
        const { graphRevision: _, ...meta } = JSON.parse(readFileSync(metaPath, 'utf8')) as Record<string, unknown>;
        writeFileSync(metaPath, JSON.stringify(meta));
        const p = spawnService(`${kind}-old-graphs`, [kind, ...args, '--model-dir', dir]);
        procs.push(p);
        return { p, dir };
      });
      for (const { p, dir } of started) {
        const warning = await p.waitFor(/built by an older ditpipe/);
        expect(warning).toMatchObject({ level: 40, modelDir: dir, graphRevision: 1, current: GRAPH_REVISION });
        await p.stop();
      }
      // The current build says nothing of the kind.
      expect(denoisers[0].log()).not.toMatch(/built by an older ditpipe/);
    } finally {
      rmSync(old, { recursive: true, force: true });
    }
  });

  it('answer bad requests with INVALID_ARGUMENT over the wire and keep serving', async () => {
    await expect(api.generate({ ...request, numSteps: 0 })).rejects.toMatchObject({ code: Code.INVALID_ARGUMENT });
    expect((await api.generate(request)).images).toHaveLength(2);
  });
});
