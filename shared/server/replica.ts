// Mounts one replica of an internal service (Denoiser, Decoder) on a transport, and optionally on
// a gRPC server for health probes and direct calls. Shutdown order: health NOT_SERVING → stop
// taking work (no more pulls, unsubscribe) and let what it holds finish within the grace period,
// giving the rest back to the queue → release the service's resources (`close`) → close gRPC.
//
// While running, the gRPC health status (overall and the service's) follows the bus server's
// liveness: a replica holding work stuck past its attempt time reports NOT_SERVING, so the
// Kubernetes liveness probe restarts it, and SERVING again once that work returns.
import type { ServiceDefinition as GrpcServiceDefinition } from '@grpc/grpc-js';
import type { QueueSettings, RpcServer, ServiceDefinition, ServiceImpl, Transport, WorkEvent, WorkSource } from '../transport/types.ts';
import { grpcHandlers, startGrpcServer, type RunningGrpcServer } from './grpc.ts';

/** How often the health status is brought in line with the bus server's liveness. */
const HEALTH_SYNC_MS = 500;

export interface RunningReplica {
  server: RpcServer;
  grpc: RunningGrpcServer | null;
  stop(graceMs?: number): Promise<void>;
}

export interface ReplicaSpec<D extends ServiceDefinition> {
  definition: D;
  grpcDefinition: GrpcServiceDefinition;
  impl: ServiceImpl<D>;
  /** Subject scope: the model or VAE name. */
  scope: string;
  /** gRPC port; null or undefined serves no gRPC. */
  grpcPort?: number | null;
  /** Who takes work for each work method (e.g. the service's batcher); see ServeOptions.drivers. */
  drivers?: Record<string, (source: WorkSource) => void>;
  queueSettings?: Partial<QueueSettings>;
  onWorkEvent?: (event: WorkEvent) => void;
  close: () => Promise<void>;
}

export async function mountReplica<D extends ServiceDefinition>(transport: Transport, spec: ReplicaSpec<D>): Promise<RunningReplica> {
  const server = await transport.serve(spec.definition, spec.impl, {
    scope: spec.scope,
    drivers: spec.drivers,
    queueSettings: spec.queueSettings,
    onWorkEvent: spec.onWorkEvent,
  });
  const grpc =
    spec.grpcPort === null || spec.grpcPort === undefined
      ? null
      : await startGrpcServer([{ fullName: spec.definition.fullName, definition: spec.grpcDefinition, impl: grpcHandlers(spec.definition, spec.impl) }], {
          port: spec.grpcPort,
        });
  let stopped: Promise<void> | null = null;
  let serving = true;
  const sync = grpc
    ? setInterval(() => {
        if (stopped || server.live === serving) return;
        serving = server.live;
        const status = serving ? 'SERVING' : 'NOT_SERVING';
        grpc.health.setStatus('', status);
        grpc.health.setStatus(spec.definition.fullName, status);
      }, HEALTH_SYNC_MS).unref()
    : undefined;
  return {
    server,
    grpc,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        clearInterval(sync);
        grpc?.health.setStatus('', 'NOT_SERVING');
        await server.stop(graceMs);
        await spec.close();
        await grpc?.stop(1_000);
      })();
      return stopped;
    },
  };
}
