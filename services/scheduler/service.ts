// Serves the public Sampler API over gRPC — and, unless turned off, the OpenAI-compatible HTTP API
// with the playground — on one scheduler that talks to the pools over `transport`.
// Shutdown order: health NOT_SERVING → refuse new requests and let those in flight finish within
// the grace period → close gRPC and HTTP (forced after the grace period).
import type { SchedulerMetrics } from '../../shared/metrics.ts';
import { SamplerService } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { startGrpcServer, type RunningGrpcServer } from '../../shared/server/grpc.ts';
import { SERVICE_NAMES } from '../../shared/transport/grpc.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { SchedulerConfig } from './config.ts';
import { samplerGrpcImpl } from './grpc.ts';
import type { HttpConfig } from './http/config.ts';
import { startHttpApi, type HttpApiOptions, type RunningHttpApi } from './http/server.ts';
import { Scheduler } from './scheduler.ts';

export interface RunningScheduler {
  scheduler: Scheduler;
  grpc: RunningGrpcServer;
  /** The HTTP API and playground; null when turned off. */
  http: RunningHttpApi | null;
  stop(graceMs?: number): Promise<void>;
}

export async function startSchedulerService(
  config: SchedulerConfig,
  transport: Transport,
  opts: { grpcPort: number; host?: string; metrics?: SchedulerMetrics; queueSettings?: Partial<QueueSettings>; http?: ({ config: HttpConfig } & HttpApiOptions) | null },
): Promise<RunningScheduler> {
  const scheduler = new Scheduler(config, transport, opts.metrics, { queueSettings: opts.queueSettings });
  const grpc = await startGrpcServer([{ fullName: SERVICE_NAMES.sampler, definition: SamplerService, impl: samplerGrpcImpl(scheduler) }], {
    port: opts.grpcPort,
    host: opts.host,
  });
  let http: RunningHttpApi | null = null;
  if (opts.http) {
    try {
      const host = !opts.host || opts.host === '0.0.0.0' || opts.host === '::' ? '127.0.0.1' : opts.host;
      http = await startHttpApi(scheduler, opts.http.config, { grpcAddress: `${host}:${grpc.port}`, ...opts.http });
    } catch (err) {
      await grpc.stop(0);
      throw err;
    }
  }
  let stopped: Promise<void> | null = null;
  return {
    scheduler,
    grpc,
    http,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        grpc.health.setStatus('', 'NOT_SERVING');
        grpc.health.setStatus(SERVICE_NAMES.sampler, 'NOT_SERVING');
        // The HTTP server keeps its open streams while the scheduler drains them.
        await Promise.all([scheduler.drain(graceMs), http?.stop(graceMs)]);
        await grpc.stop(1_000);
      })();
      return stopped;
    },
  };
}
