// Mounts one replica of an internal service (Denoiser, Decoder) on a transport, and optionally on
// a gRPC server for health probes and direct calls. Shutdown order: health NOT_SERVING → stop
// taking calls (unsubscribe) and let those in flight finish within the grace period → release the
// service's resources (`close`) → close gRPC.
import type { ServiceDefinition as GrpcServiceDefinition } from '@grpc/grpc-js';
import type { RpcServer, ServiceDefinition, ServiceImpl, Transport } from '../transport/types.ts';
import { grpcHandlers, startGrpcServer, type RunningGrpcServer } from './grpc.ts';

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
  close: () => Promise<void>;
}

export async function mountReplica<D extends ServiceDefinition>(transport: Transport, spec: ReplicaSpec<D>): Promise<RunningReplica> {
  const server = await transport.serve(spec.definition, spec.impl, { scope: spec.scope });
  const grpc =
    spec.grpcPort === null || spec.grpcPort === undefined
      ? null
      : await startGrpcServer([{ fullName: spec.definition.fullName, definition: spec.grpcDefinition, impl: grpcHandlers(spec.definition, spec.impl) }], {
          port: spec.grpcPort,
        });
  let stopped: Promise<void> | null = null;
  return {
    server,
    grpc,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        grpc?.health.setStatus('', 'NOT_SERVING');
        await server.stop(graceMs);
        await spec.close();
        await grpc?.stop(1_000);
      })();
      return stopped;
    },
  };
}
