// `ditpipe scheduler|denoiser|decoder`: one service per process, talking over NATS.
import type { Logger } from 'pino';
import { Command, Option } from 'commander';
import type { Registry } from 'prom-client';
import { compileDecoderConfig, decoderConfigDefault } from '../services/decoder/config.ts';
import { startDecoderService } from '../services/decoder/service.ts';
import { compileDenoiserConfig, denoiserConfigDefault, parseSimulate } from '../services/denoiser/config.ts';
import { startDenoiserService } from '../services/denoiser/service.ts';
import { compileSchedulerConfig, schedulerConfigDefault } from '../services/scheduler/config.ts';
import { compileHttpConfig } from '../services/scheduler/http/config.ts';
import { startSchedulerService } from '../services/scheduler/service.ts';
import { decoderMetrics, denoiserMetrics, schedulerMetrics } from '../shared/metrics.ts';
import { GRAPH_REVISION, graphRevisionOf, type ModelJson } from '../shared/model/modeldir.ts';
import type { GrpcServer } from '../shared/server/grpc.ts';
import type { Transport } from '../shared/transport/types.ts';
import { userSet } from './config-flags.ts';
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
  numberArg,
  queueFromFlags,
  repeatCacheOption,
  serveUntilSignal,
  type GrpcServerFlags,
  type NatsFlags,
  type ServiceFlags as CommonServiceFlags,
} from './common.ts';

interface ServiceFlags extends NatsFlags, CommonServiceFlags, GrpcServerFlags {
  natsUrl: string;
}

function list(v: string): string[] {
  return v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
}

const scheduler = addGrpcServerOptions(addServiceOptions(addNatsOptions(new Command('scheduler'), true), { metricsPort: 9464 }), {
  port: 50051,
  portHelp: 'gRPC port of the Sampler API (0 = any free port)',
})
  .description(
    "Serve the public Sampler gRPC API (and the OpenAI-compatible HTTP API with the playground); run the sampling loops and put steps on the denoisers' work queue over NATS.",
  )
  .addOption(
    new Option('--models <names>', 'DiT model names to serve, comma-separated (denoisers serve them)')
      .env('DITPIPE_MODELS')
      .makeOptionMandatory()
      .argParser(list),
  )
  .addOption(new Option('--vae <model=vae,...>', 'VAE per model when its model.json names none').env('DITPIPE_VAE'))
  .addOption(httpPortOption(8080))
  .addOption(
    new Option('--http-host <addr>', "address to bind the HTTP API to (default: --host); it uses the gRPC server's TLS and tokens").env(
      'DITPIPE_HTTP_HOST',
    ),
  )
  .addOption(
    new Option(
      '--max-samples-in-flight <n>',
      'admission limit: images sampled at once, then RESOURCE_EXHAUSTED (with a retry hint); a request for more is INVALID_ARGUMENT',
    )
      .env('DITPIPE_MAX_SAMPLES_IN_FLIGHT')
      .default(schedulerConfigDefault('maxSamplesInFlight'))
      .argParser(intArg('--max-samples-in-flight', 1)),
  )
  .addOption(
    new Option('--max-images-per-request <n>', 'most images one request may ask for')
      .env('DITPIPE_MAX_IMAGES_PER_REQUEST')
      .default(schedulerConfigDefault('maxImagesPerRequest'))
      .argParser(intArg('--max-images-per-request', 1, 1024)),
  )
  .addOption(
    new Option('--step-timeout <ms>', 'longest one denoiser may hold a step before the work queue gives it to another replica')
      .env('DITPIPE_STEP_TIMEOUT_MS')
      .default(schedulerConfigDefault('stepTimeoutMs'))
      .argParser(intArg('--step-timeout', 1)),
  )
  .addOption(
    new Option('--decode-timeout <ms>', 'longest one decoder may hold a decode before the work queue gives it to another replica')
      .env('DITPIPE_DECODE_TIMEOUT_MS')
      .default(schedulerConfigDefault('decodeTimeoutMs'))
      .argParser(intArg('--decode-timeout', 1)),
  )
  .addOption(
    new Option('--default-cfg <scale>', 'guidance scale when a request sets none')
      .env('DITPIPE_DEFAULT_CFG')
      .default(schedulerConfigDefault('defaultCfgScale'))
      .argParser(numberArg('--default-cfg', 1)),
  )
  .addOption(repeatCacheOption())
  .action(
    async (
      o: ServiceFlags & {
        models: string[];
        vae?: string;
        httpPort: number;
        httpHost?: string;
        maxSamplesInFlight: number;
        maxImagesPerRequest: number;
        stepTimeout: number;
        decodeTimeout: number;
        defaultCfg: number;
        repeatCacheMib: number;
      },
      cmd: Command,
    ) => {
      const log = logger('scheduler', o);
      guardProcess(log);
      const vae = Object.fromEntries((o.vae ? list(o.vae) : []).map((kv) => kv.split('=') as [string, string]));
      const config = compileSchedulerConfig({
        models: o.models,
        vae,
        maxSamplesInFlight: userSet(cmd, o, 'maxSamplesInFlight'),
        maxImagesPerRequest: userSet(cmd, o, 'maxImagesPerRequest'),
        stepTimeoutMs: userSet(cmd, o, 'stepTimeout'),
        decodeTimeoutMs: userSet(cmd, o, 'decodeTimeout'),
        defaultCfgScale: userSet(cmd, o, 'defaultCfg'),
        repeatCacheMiB: userSet(cmd, o, 'repeatCacheMib'),
      });
      const grpc = grpcServerFromFlags(o, log);
      const transport = await natsFromFlags(o, 'ditpipe-scheduler', log, 'scheduler');
      const metrics = schedulerMetrics();
      const http =
        o.httpPort < 0 ? null : { config: compileHttpConfig({ port: o.httpPort, host: o.httpHost ?? o.host }), log, ...httpSecurity(grpc) };
      const svc = await startSchedulerService(config, transport, { grpc, metrics, log, http, queueSettings: queueFromFlags(o) });
      await listenGrpc(grpc, log, 'Sampler API');
      if (svc.http) log.info({ port: svc.http.port }, `HTTP API (OpenAI-compatible) and playground on ${svc.http.url}/`);
      await serveUntilSignal({
        log,
        parts: [
          { name: 'scheduler', stop: (g) => svc.stop(g) },
          { name: 'gRPC', stop: () => grpc.stop(1_000) },
        ],
        transports: [transport],
        registries: [metrics.registry],
        metricsPort: o.metricsPort,
        metricsHost: o.metricsHost,
        graceMs: o.shutdownGrace,
      });
    },
  );

const replicaOptions = (cmd: Command, grpcPort: number): Command =>
  addGrpcServerOptions(addServiceOptions(addNatsOptions(cmd, true), { metricsPort: 9464 }), {
    port: grpcPort,
    portHelp: 'gRPC port for health checks and direct calls (0 = any free port, -1 = off)',
    minPort: -1,
  })
    .addOption(new Option('--model-dir <dir>', 'model directory (model.json + model.onnx)').env('DITPIPE_MODEL_DIR').makeOptionMandatory())
    .addOption(new Option('--name <name>', 'name to serve the model under (default: model.json name)').env('DITPIPE_NAME'))
    .addOption(
      new Option('--execution-provider <ep>', 'onnxruntime execution provider')
        .choices(['cpu', 'cuda'])
        .env('DITPIPE_EXECUTION_PROVIDER')
        .default(denoiserConfigDefault('executionProvider')),
    )
    .addOption(
      new Option('--threads <n>', 'onnxruntime intra-op threads (0 = all cores)')
        .env('DITPIPE_THREADS')
        .default(denoiserConfigDefault('intraOpThreads'))
        .argParser(intArg('--threads', 0, 1024)),
    );

const denoiser = replicaOptions(new Command('denoiser'), 50052)
  .description(
    "Serve denoise steps of one DiT model: pull them from the model's work queue over NATS when a forward pass can start, batching steps of many requests into each pass.",
  )
  .addOption(
    new Option('--max-batch-rows <n>', 'rows per forward pass (guidance rows count)')
      .env('DITPIPE_MAX_BATCH_ROWS')
      .default(denoiserConfigDefault('maxBatchRows'))
      .argParser(intArg('--max-batch-rows', 1, 4096)),
  )
  .addOption(
    new Option('--max-wait <ms>', 'longest wait for more steps before a forward pass')
      .env('DITPIPE_MAX_WAIT_MS')
      .default(denoiserConfigDefault('maxWaitMs'))
      .argParser(numberArg('--max-wait', 0)),
  )
  .addOption(
    new Option(
      '--step-cache-mib <n>',
      'MiB of step-cache state (block-stack residuals of requests that ask for step caching) kept between their steps; fractions allowed, 0 = off',
    )
      .env('DITPIPE_STEP_CACHE_MIB')
      .default(denoiserConfigDefault('stepCacheMib'))
      .argParser(numberArg('--step-cache-mib', 0, 1024 * 1024)),
  )
  .addOption(
    new Option(
      '--simulate <base+perRow>',
      'do not run the model: sleep base + perRow × rows ms per pass and answer zeros (capacity tests)',
    ).env('DITPIPE_SIMULATE'),
  )
  .action(
    async (
      o: ServiceFlags & {
        modelDir: string;
        name?: string;
        executionProvider: 'cpu' | 'cuda';
        threads: number;
        maxBatchRows: number;
        maxWait: number;
        stepCacheMib: number;
        simulate?: string;
      },
      cmd: Command,
    ) => {
      const log = logger('denoiser', o);
      guardProcess(log);
      const config = compileDenoiserConfig({
        modelDir: o.modelDir,
        name: o.name,
        executionProvider: userSet(cmd, o, 'executionProvider'),
        intraOpThreads: userSet(cmd, o, 'threads'),
        maxBatchRows: userSet(cmd, o, 'maxBatchRows'),
        maxWaitMs: userSet(cmd, o, 'maxWait'),
        stepCacheMib: userSet(cmd, o, 'stepCacheMib'),
        simulate: o.simulate ? parseSimulate(o.simulate) : undefined,
      });
      const grpc = o.grpcPort < 0 && o.healthPort < 0 ? null : grpcServerFromFlags(o, log);
      const transport = await natsFromFlags(o, 'ditpipe-denoiser', log, 'denoiser');
      const metrics = denoiserMetrics();
      const svc = await startDenoiserService(config, transport, { grpc, metrics, log, queueSettings: queueFromFlags(o) });
      await serveReplica({
        o,
        log,
        grpc,
        transport,
        registry: metrics.registry,
        kind: 'denoiser',
        what: 'gRPC (health, Denoiser)',
        served: svc.denoiser,
        queue: svc.server.queues.denoise,
        stop: (g) => svc.stop(g),
      });
    },
  );

const decoder = replicaOptions(new Command('decoder'), 50053)
  .description(
    "Serve VAE decoding of sampled latents into PNGs: pull decodes from the VAE's work queue over NATS, batching latents of many requests.",
  )
  .addOption(
    new Option('--max-batch <n>', 'images per decode pass')
      .env('DITPIPE_MAX_BATCH')
      .default(decoderConfigDefault('maxBatch'))
      .argParser(intArg('--max-batch', 1, 1024)),
  )
  .addOption(
    new Option('--max-wait <ms>', 'longest wait for more latents before a decode')
      .env('DITPIPE_MAX_WAIT_MS')
      .default(decoderConfigDefault('maxWaitMs'))
      .argParser(numberArg('--max-wait', 0)),
  )
  .action(
    async (
      o: ServiceFlags & {
        modelDir: string;
        name?: string;
        executionProvider: 'cpu' | 'cuda';
        threads: number;
        maxBatch: number;
        maxWait: number;
      },
      cmd: Command,
    ) => {
      const log = logger('decoder', o);
      guardProcess(log);
      const config = compileDecoderConfig({
        modelDir: o.modelDir,
        name: o.name,
        executionProvider: userSet(cmd, o, 'executionProvider'),
        intraOpThreads: userSet(cmd, o, 'threads'),
        maxBatch: userSet(cmd, o, 'maxBatch'),
        maxWaitMs: userSet(cmd, o, 'maxWait'),
      });
      const grpc = o.grpcPort < 0 && o.healthPort < 0 ? null : grpcServerFromFlags(o, log);
      const transport = await natsFromFlags(o, 'ditpipe-decoder', log, 'decoder');
      const metrics = decoderMetrics();
      const svc = await startDecoderService(config, transport, { grpc, metrics, log, queueSettings: queueFromFlags(o) });
      await serveReplica({
        o,
        log,
        grpc,
        transport,
        registry: metrics.registry,
        kind: 'decoder',
        what: 'gRPC (health, Decoder)',
        served: svc.decoder,
        queue: svc.server.queues.decode,
        stop: (g) => svc.stop(g),
      });
    },
  );

/**
 * The end of a replica's start-up, the same for denoiser and decoder: listen on gRPC, log the
 * "serving" line (what the tests and `up` wait for), warn about an older model directory, then
 * serve until a signal stops the replica and then its gRPC server.
 */
async function serveReplica(r: {
  o: ServiceFlags & { modelDir: string };
  log: Logger;
  grpc: GrpcServer | null;
  transport: Transport;
  registry: Registry;
  kind: 'denoiser' | 'decoder';
  what: string;
  served: { name: string; info: { instanceId: string }; meta: ModelJson };
  queue: { stream: string; consumer: string } | undefined;
  stop: (graceMs: number) => Promise<void>;
}): Promise<void> {
  const { o, log, grpc, served } = r;
  if (grpc) await listenGrpc(grpc, log, r.what);
  log.info(
    {
      model: served.name,
      instance: served.info.instanceId,
      stream: r.queue?.stream,
      consumer: r.queue?.consumer,
      grpcPort: grpc?.port ?? undefined,
    },
    `serving ${served.name}`,
  );
  warnOlderGraphs(log, o.modelDir, graphRevisionOf(served.meta));
  await serveUntilSignal({
    log,
    parts: [{ name: r.kind, stop: r.stop }, ...(grpc ? [{ name: 'gRPC', stop: () => grpc.stop(1_000) }] : [])],
    transports: [r.transport],
    registries: [r.registry],
    metricsPort: o.metricsPort,
    metricsHost: o.metricsHost,
    graceMs: o.shutdownGrace,
  });
}

/** A model directory compiled by an older ditpipe serves the same numbers, only slower: say so. */
function warnOlderGraphs(log: Logger, modelDir: string, revision: number): void {
  if (revision >= GRAPH_REVISION) return;
  log.warn(
    { modelDir, graphRevision: revision, current: GRAPH_REVISION },
    `${modelDir} was built by an older ditpipe (graph revision ${revision}, this one writes ${GRAPH_REVISION}): same numbers, but rebuilding it with "ditpipe model build" gives faster forward passes`,
  );
}

export const commands = [scheduler, denoiser, decoder];
