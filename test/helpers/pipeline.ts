// Starts the three services in this process on a real transport (in-process bus or a real
// nats-server), each on its own connection like separate processes, with gRPC on port 0.
import { compileDecoderConfig } from '../../services/decoder/config.ts';
import { startDecoderService } from '../../services/decoder/service.ts';
import { compileDenoiserConfig, type DenoiserConfigInput } from '../../services/denoiser/config.ts';
import type { Denoiser } from '../../services/denoiser/denoiser.ts';
import { startDenoiserService } from '../../services/denoiser/service.ts';
import { compileSchedulerConfig, type SchedulerConfigInput } from '../../services/scheduler/config.ts';
import { compileHttpConfig, type HttpConfigInput } from '../../services/scheduler/http/config.ts';
import type { HttpApiOptions, RunningHttpApi } from '../../services/scheduler/http/server.ts';
import { startSchedulerService } from '../../services/scheduler/service.ts';
import { SamplerApi, type SamplerApiOptions } from '../../shared/client.ts';
import type { Logger } from '../../shared/log.ts';
import {
  decoderMetrics,
  denoiserMetrics,
  schedulerMetrics,
  type DecoderMetrics,
  type DenoiserMetrics,
  type SchedulerMetrics,
} from '../../shared/metrics.ts';
import { readModelDir } from '../../shared/model/modeldir.ts';
import { GrpcServer, type GrpcServerOptions } from '../../shared/server/grpc.ts';
import type { RunningReplica } from '../../shared/server/replica.ts';
import { InProcBus } from '../../shared/transport/inproc.ts';
import { connectNats, type NatsConnectOptions, natsTransport } from '../../shared/transport/nats.ts';
import { NATS_SERVICES, type NatsService } from '../../shared/transport/nats-permissions.ts';
import type { Transport } from '../../shared/transport/types.ts';
import { testModels } from './models.ts';

/**
 * With `connect`, NATS connections get each service's own options (credentials, TLS; the service
 * name sets the inbox prefix its permissions allow).
 */
export type TransportKind =
  { kind: 'inproc'; bus?: InProcBus } | { kind: 'nats'; url: string; connect?: (service: NatsService) => Partial<NatsConnectOptions> };

export interface PipelineOptions {
  transport: TransportKind;
  denoisers?: number;
  decoders?: number;
  /**
   * The repeat cache is off unless asked for (repeatCacheMiB), so a test repeating a request
   * really samples it again (a determinism check stays one).
   */
  scheduler?: Partial<SchedulerConfigInput>;
  denoiser?: Partial<DenoiserConfigInput>;
  /** Also serve the HTTP API (on a free loopback port unless the config says otherwise). */
  http?: HttpConfigInput & Omit<HttpApiOptions, 'log'>;
  /** Model directories other than the default test models (names from their model.json). */
  models?: { ditDir?: string; vaeDir?: string };
  /** The scheduler's gRPC server (TLS, tokens, ...); host and port default to 127.0.0.1:0. */
  grpc?: Partial<GrpcServerOptions>;
  /** Give each denoiser a gRPC server on 127.0.0.1:0 (health probes, direct calls). */
  denoiserGrpc?: boolean;
  /** How `api` connects (TLS, token). */
  client?: SamplerApiOptions;
  log?: Logger;
}

export interface Pipeline {
  api: SamplerApi;
  address: string;
  grpc: GrpcServer;
  schedulerMetrics: SchedulerMetrics;
  denoiserMetrics: DenoiserMetrics[];
  decoderMetrics: DecoderMetrics[];
  denoisers: Array<RunningReplica & { denoiser: Denoiser }>;
  decoders: RunningReplica[];
  /** The denoisers' gRPC servers, with denoiserGrpc. */
  denoiserGrpc: GrpcServer[];
  /** The HTTP API, when asked for. */
  http: RunningHttpApi | null;
  connect(name: string): Promise<Transport>;
  /** Stops everything; the scheduler drains its requests for up to schedulerGraceMs (2 s) first. */
  stop(schedulerGraceMs?: number): Promise<void>;
}

export async function startPipeline(opts: PipelineOptions): Promise<Pipeline> {
  const ditDir = opts.models?.ditDir ?? testModels().ditDir;
  const vaeDir = opts.models?.vaeDir ?? testModels().vaeDir;
  const ditName = readModelDir(ditDir).meta.name;
  const vaeName = readModelDir(vaeDir).meta.name;
  const bus = opts.transport.kind === 'inproc' ? (opts.transport.bus ?? new InProcBus()) : null;
  const url = opts.transport.kind === 'nats' ? opts.transport.url : '';
  const transports: Transport[] = [];
  const connect = async (name: string): Promise<Transport> => {
    const service = NATS_SERVICES.find((x) => name.startsWith(x));
    const extra =
      opts.transport.kind === 'nats' && opts.transport.connect && service ? { service, ...opts.transport.connect(service) } : {};
    const t = bus ? bus.connect(name) : natsTransport(await connectNats({ servers: url, name, ...extra }));
    transports.push(t);
    return t;
  };
  const dMetrics: DenoiserMetrics[] = [];
  const denoisers: Array<RunningReplica & { denoiser: Denoiser }> = [];
  const denoiserGrpc: GrpcServer[] = [];
  for (let i = 0; i < (opts.denoisers ?? 1); i++) {
    const m = denoiserMetrics();
    dMetrics.push(m);
    const grpc = opts.denoiserGrpc ? new GrpcServer({ host: '127.0.0.1', port: 0 }) : null;
    denoisers.push(
      await startDenoiserService(
        compileDenoiserConfig({ modelDir: ditDir, intraOpThreads: 1, ...opts.denoiser }),
        await connect(`denoiser-${i}`),
        { metrics: m, grpc },
      ),
    );
    if (grpc) {
      await grpc.listen();
      denoiserGrpc.push(grpc);
    }
  }
  const decoders: RunningReplica[] = [];
  const vMetrics: DecoderMetrics[] = [];
  for (let i = 0; i < (opts.decoders ?? 1); i++) {
    const m = decoderMetrics();
    vMetrics.push(m);
    decoders.push(
      await startDecoderService(compileDecoderConfig({ modelDir: vaeDir, intraOpThreads: 1 }), await connect(`decoder-${i}`), {
        metrics: m,
      }),
    );
  }
  const sMetrics = schedulerMetrics();
  const grpc = new GrpcServer({ host: '127.0.0.1', port: 0, ...opts.grpc });
  const scheduler = await startSchedulerService(
    compileSchedulerConfig({ models: [ditName], vae: { [ditName]: vaeName }, repeatCacheMiB: 0, ...opts.scheduler }),
    await connect('scheduler'),
    {
      grpc,
      metrics: sMetrics,
      log: opts.log,
      http: opts.http
        ? { config: compileHttpConfig({ port: 0, host: '127.0.0.1', ...opts.http }), tls: opts.http.tls, authorize: opts.http.authorize }
        : null,
    },
  );
  await grpc.listen();
  const address = grpc.address;
  const api = new SamplerApi(address, opts.client);
  return {
    api,
    address,
    grpc,
    schedulerMetrics: sMetrics,
    denoiserMetrics: dMetrics,
    decoderMetrics: vMetrics,
    denoisers,
    decoders,
    denoiserGrpc,
    http: scheduler.http,
    connect,
    async stop(schedulerGraceMs = 2_000) {
      api.close();
      await scheduler.stop(schedulerGraceMs);
      await grpc.stop(1_000);
      await Promise.all([...denoisers, ...decoders].map((r) => r.stop(2_000)));
      await Promise.all(denoiserGrpc.map((g) => g.stop(500)));
      await Promise.all(transports.map((t) => t.close({ graceMs: 1_000 })));
    },
  };
}
