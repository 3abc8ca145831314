// `ditpipe start` (what `npm start` runs): the whole pipeline in one process — scheduler, denoiser
// and decoder on an in-process bus (or on NATS when NATS_URL is set) — serving the public gRPC API,
// then a first sample grid so a new user sees images at once.
import { join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { compileDecoderConfig } from '../services/decoder/config.ts';
import { startDecoderService } from '../services/decoder/service.ts';
import { compileDenoiserConfig } from '../services/denoiser/config.ts';
import { startDenoiserService } from '../services/denoiser/service.ts';
import { compileSchedulerConfig } from '../services/scheduler/config.ts';
import { compileHttpConfig } from '../services/scheduler/http/config.ts';
import { startSchedulerService } from '../services/scheduler/service.ts';
import { request, SamplerApi } from '../shared/client.ts';
import { SamplerKind } from '../shared/gen/ditpipe/v1/sampler.ts';
import { decoderMetrics, denoiserMetrics, schedulerMetrics } from '../shared/metrics.ts';
import { readDitModelDir, readVaeModelDir } from '../shared/model/modeldir.ts';
import { InProcBus } from '../shared/transport/inproc.ts';
import type { Transport } from '../shared/transport/types.ts';
import {
  addGrpcServerOptions,
  addNatsOptions,
  addServiceOptions,
  guardProcess,
  grpcServerFromFlags,
  httpPortOption,
  httpSecurity,
  intArg,
  listenGrpc,
  logger,
  natsFromFlags,
  queueFromFlags,
  repeatCacheOption,
  serveUntilSignal,
  tokensFromFlags,
  type GrpcServerFlags,
  type NatsFlags,
  type ServiceFlags,
} from './common.ts';
import { userSet } from './config-flags.ts';
import { ensureDefaultModels } from './default-model.ts';
import { defaultTitle, generateToDir } from './generate.ts';

interface Flags extends NatsFlags, ServiceFlags, GrpcServerFlags {
  modelDir?: string;
  vaeDir?: string;
  httpPort: number;
  repeatCacheMib: number;
  threads: number;
  grid: boolean;
  gridOut: string;
  gridSamples: number;
  gridSteps: number;
  exitAfterGrid?: boolean;
}

export const command = addGrpcServerOptions(addServiceOptions(addNatsOptions(new Command('start'), false), { metricsPort: 9464 }), {
  port: 50051,
  portHelp: 'gRPC port of the Sampler API (0 = any free port)',
})
  .description(
    'Run scheduler, denoiser and decoder in one process on the default (or given) model, serve gRPC and the HTTP API with the playground, and write a sample grid.',
  )
  .addOption(
    new Option(
      '--model-dir <dir>',
      'DiT model directory (default: the Fashion-MNIST model, built from models/fashion-mnist on first start)',
    ).env('DITPIPE_MODEL_DIR'),
  )
  .addOption(new Option('--vae-dir <dir>', 'VAE model directory (default: the Fashion-MNIST VAE)').env('DITPIPE_VAE_DIR'))
  .addOption(httpPortOption(8080))
  .addOption(repeatCacheOption())
  .addOption(
    new Option('--threads <n>', 'onnxruntime intra-op threads per model (0 = all cores)')
      .env('DITPIPE_THREADS')
      .default(0)
      .argParser(intArg('--threads', 0, 1024)),
  )
  .addOption(new Option('--no-grid', 'do not write the sample grid at start').env('DITPIPE_NO_GRID'))
  .addOption(
    new Option('--grid-out <dir>', 'folder of the sample grid (its earlier grid and samples are replaced)')
      .env('DITPIPE_GRID_OUT')
      .default('out/samples'),
  )
  .addOption(
    new Option('--grid-samples <n>', 'samples per class in the grid')
      .env('DITPIPE_GRID_SAMPLES')
      .default(4)
      .argParser(intArg('--grid-samples', 1, 16)),
  )
  .addOption(
    new Option('--grid-steps <n>', 'DDIM steps for the grid')
      .env('DITPIPE_GRID_STEPS')
      .default(50)
      .argParser(intArg('--grid-steps', 1, 1000)),
  )
  .addOption(new Option('--exit-after-grid', 'stop once the grid is written (smoke tests)').env('DITPIPE_EXIT_AFTER_GRID'))
  .action(async (o: Flags, cmd: Command) => {
    const log = logger('ditpipe', o);
    guardProcess(log);
    const grpc = grpcServerFromFlags(o, log);
    let ditDir = o.modelDir;
    let vaeDir = o.vaeDir;
    if (!ditDir || !vaeDir) {
      const d = ensureDefaultModels({ log: (l) => log.info(l) });
      ditDir ??= d.ditDir;
      vaeDir ??= d.vaeDir;
    }
    const dit = readDitModelDir(ditDir).meta;
    const vae = readVaeModelDir(vaeDir).meta;

    const bus = o.natsUrl ? null : new InProcBus({ maxPayload: 8 * 1024 * 1024 });
    const connect = (name: string): Promise<Transport> =>
      bus ? Promise.resolve(bus.connect(name)) : natsFromFlags({ ...o, natsUrl: o.natsUrl as string }, `ditpipe-${name}`, log);
    log.info(bus ? 'transport: in-process bus (set NATS_URL to use NATS)' : `transport: NATS at ${o.natsUrl}`);

    const dm = denoiserMetrics();
    const vm = decoderMetrics();
    const sm = schedulerMetrics();
    const denoiserT = await connect('denoiser');
    const decoderT = await connect('decoder');
    const schedulerT = await connect('scheduler');
    const queueSettings = queueFromFlags(o);
    const denoiser = await startDenoiserService(compileDenoiserConfig({ modelDir: ditDir, intraOpThreads: o.threads }), denoiserT, {
      metrics: dm,
      log,
      queueSettings,
    });
    const decoder = await startDecoderService(compileDecoderConfig({ modelDir: vaeDir, intraOpThreads: o.threads }), decoderT, {
      metrics: vm,
      log,
      queueSettings,
    });
    const scheduler = await startSchedulerService(
      compileSchedulerConfig({
        models: [dit.name],
        vae: { [dit.name]: dit.vae ?? vae.name },
        repeatCacheMiB: userSet(cmd, o, 'repeatCacheMib'),
      }),
      schedulerT,
      {
        grpc,
        metrics: sm,
        log,
        queueSettings,
        http: o.httpPort < 0 ? null : { config: compileHttpConfig({ port: o.httpPort, host: o.host }), log, ...httpSecurity(grpc) },
      },
    );
    await listenGrpc(grpc, log, 'Sampler API');
    const playground = scheduler.http ? `${scheduler.http.url}/` : null;
    if (playground)
      console.log(`playground: open ${playground} (OpenAI-compatible images API at ${scheduler.http!.url}/v1/images/generations)`);
    log.info({ model: dit.name, vae: vae.name, params: dit.params, gflops: dit.gflops }, `serving ${dit.name} (VAE ${vae.name})`);
    // Where a client on this machine reaches the server: a wildcard bind is reachable on loopback.
    const address = `${grpc.host === '0.0.0.0' ? '127.0.0.1' : grpc.host === '::' ? '[::1]' : grpc.host.includes(':') ? `[${grpc.host}]` : grpc.host}:${grpc.port}`;

    const parts = [
      { name: 'scheduler', stop: (g: number) => scheduler.stop(g) },
      { name: 'denoiser', stop: (g: number) => denoiser.stop(g) },
      { name: 'decoder', stop: (g: number) => decoder.stop(g) },
      { name: 'gRPC', stop: () => grpc.stop(1_000) },
    ];
    const closeAll = async (): Promise<void> => {
      for (const p of parts) await p.stop(o.shutdownGrace);
      await Promise.all([denoiserT, decoderT, schedulerT].map((t) => t.close({ graceMs: o.shutdownGrace })));
    };

    if (o.grid) {
      const classes = dit.config.num_classes;
      const shown = Math.min(classes, 10);
      const labels = Array.from({ length: shown }, (_, c) => Array.from({ length: o.gridSamples }, () => ({ index: c }))).flat();
      const out = resolve(o.gridOut);
      log.info(`sampling a grid: ${shown} classes × ${o.gridSamples} samples, DDIM ${o.gridSteps} steps, cfg 4`);
      // Through the gRPC API as any client would, unless TLS or tokens guard it (this process holds
      // no client credentials then): in-process through the scheduler.
      const api = o.tlsCert || tokensFromFlags(o) ? null : new SamplerApi(address);
      try {
        const started = Date.now();
        const res = await generateToDir({
          stream: api ? (req, opts) => api.generateStream(req, opts) : (req) => scheduler.scheduler.generateEvents(request(req)),
          out,
          // The grid folder belongs to `start`: each start replaces the grid and samples it wrote.
          overwrite: true,
          title: (r) => defaultTitle(r, 'DDIM'),
          request: {
            model: dit.name,
            classLabels: labels,
            sampler: SamplerKind.SAMPLER_KIND_DDIM,
            numSteps: o.gridSteps,
            cfgScale: 4,
            seed: 0n,
          },
          onProgress: (step, total) => {
            if (step % 10 === 0 || step === total) log.info(`grid: step ${step}/${total}`);
          },
        });
        log.info(`wrote ${res.images.length} samples in ${((Date.now() - started) / 1000).toFixed(1)} s`);
        console.log(`sample grid: ${res.grid}`);
      } finally {
        api?.close();
      }
      if (o.exitAfterGrid) {
        await closeAll();
        return;
      }
    }
    console.log(
      `serving ditpipe.v1.Sampler on ${address} — try: node bin/ditpipe.js generate --server ${address} --class ${dit.classNames?.[5] ?? 5} --num 4 --out ${join('out', 'generate')}`,
    );
    if (playground) console.log(`playground: open ${playground}`);
    await serveUntilSignal({
      log,
      parts,
      transports: [denoiserT, decoderT, schedulerT],
      registries: [sm.registry, dm.registry, vm.registry],
      metricsPort: o.metricsPort,
      metricsHost: o.metricsHost,
      graceMs: o.shutdownGrace,
    });
  });
