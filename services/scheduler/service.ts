// Serves the public Sampler API over gRPC on a scheduler that talks to the pools over `transport`.
// Shutdown order: health NOT_SERVING → refuse new requests and let those in flight finish within
// the grace period → close gRPC (forced after the grace period).
import type { SchedulerMetrics } from '../../shared/metrics.ts';
import { SamplerService } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { startGrpcServer, type RunningGrpcServer } from '../../shared/server/grpc.ts';
import { SERVICE_NAMES } from '../../shared/transport/grpc.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { SchedulerConfig } from './config.ts';
import { samplerGrpcImpl } from './grpc.ts';
import { Scheduler } from './scheduler.ts';

export interface RunningScheduler {
  scheduler: Scheduler;
  grpc: RunningGrpcServer;
  stop(graceMs?: number): Promise<void>;
}

export async function startSchedulerService(
  config: SchedulerConfig,
  transport: Transport,
  opts: { grpcPort: number; host?: string; metrics?: SchedulerMetrics; queueSettings?: Partial<QueueSettings> },
): Promise<RunningScheduler> {
  const scheduler = new Scheduler(config, transport, opts.metrics, { queueSettings: opts.queueSettings });
  const grpc = await startGrpcServer([{ fullName: SERVICE_NAMES.sampler, definition: SamplerService, impl: samplerGrpcImpl(scheduler) }], {
    port: opts.grpcPort,
    host: opts.host,
  });
  let stopped: Promise<void> | null = null;
  return {
    scheduler,
    grpc,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        grpc.health.setStatus('', 'NOT_SERVING');
        grpc.health.setStatus(SERVICE_NAMES.sampler, 'NOT_SERVING');
        await scheduler.drain(graceMs);
        await grpc.stop(1_000);
      })();
      return stopped;
    },
  };
}
