// Mounts one replica of an internal service (Denoiser, Decoder) on a transport, and optionally on
// a gRPC server the caller built (for health probes and direct calls; the caller listens on it and
// closes it after stop()). Shutdown order: health NOT_SERVING → stop taking work (no more pulls,
// unsubscribe) and let what it holds finish within the grace period, giving the rest back to the
// queue → release the service's resources (`close`).
//
// While running, the gRPC health status (overall and the service's) follows the bus server's
// liveness: a replica holding work stuck past its attempt time reports NOT_SERVING, so the
// Kubernetes liveness probe restarts it, and SERVING again once that work returns. A replica whose
// `dead()` says it can no longer serve (its inference worker exited) reports NOT_SERVING for good
// and stops taking work at once (what it holds goes back to the queue).
import type { ServiceDefinition as GrpcServiceDefinition } from '@grpc/grpc-js';
import { codeName, toDitpipeError } from '../errors.ts';
import { RateLimitedLog, silentLogger, type Logger } from '../log.ts';
import type { QueueSettings, RpcServer, ServiceDefinition, ServiceImpl, Transport, WorkEvent, WorkSource } from '../transport/types.ts';
import { grpcHandlers, type GrpcServer } from './grpc.ts';

/** How often the health status is brought in line with the bus server's liveness. */
const HEALTH_SYNC_MS = 500;

export interface RunningReplica {
  server: RpcServer;
  grpc: GrpcServer | null;
  stop(graceMs?: number): Promise<void>;
}

export interface ReplicaSpec<D extends ServiceDefinition> {
  definition: D;
  grpcDefinition: GrpcServiceDefinition;
  impl: ServiceImpl<D>;
  /** Subject scope: the model or VAE name. */
  scope: string;
  /** The replica's identifier on the bus (its Info's instance_id); see ServeOptions.instance. */
  instance?: string;
  /** gRPC server (built and listened on by the caller) to add the service to; null or undefined: none. */
  grpc?: GrpcServer | null;
  /** Largest valid request over gRPC, in bytes (sizes the server's receive limit). */
  maxRequestBytes?: number;
  /** True once the replica can never serve again (e.g. its inference worker died). */
  dead?: () => boolean;
  /** Registers a callback for the moment it dies: the replica then stops taking work at once. */
  onDead?: (fn: () => void) => void;
  /** Who takes work for each work method (e.g. the service's batcher); see ServeOptions.drivers. */
  drivers?: Record<string, (source: WorkSource) => void>;
  queueSettings?: Partial<QueueSettings>;
  onWorkEvent?: (event: WorkEvent) => void;
  /** Where errors no caller can be told of go (a reply that could not be sent, a malformed work message dropped, a failed pull); default: nowhere. */
  log?: Logger;
  close: () => Promise<void>;
}

export async function mountReplica<D extends ServiceDefinition>(transport: Transport, spec: ReplicaSpec<D>): Promise<RunningReplica> {
  // Rate-limited per method and code: a storm of bad messages or a NATS outage gives a line now and a count later.
  const events = new RateLimitedLog(spec.log ?? silentLogger());
  const server = await transport.serve(spec.definition, spec.impl, {
    scope: spec.scope,
    instance: spec.instance,
    drivers: spec.drivers,
    queueSettings: spec.queueSettings,
    onWorkEvent: spec.onWorkEvent,
    onError: (err, method) => {
      const e = toDitpipeError(err);
      const code = codeName(e.code);
      events.event(
        'warn',
        `${method}|${code}`,
        { method, code, err: e.message },
        `${spec.definition.name}.${method}: ${e.message} (no caller to answer)`,
      );
    },
  });
  const grpc = spec.grpc ?? null;
  grpc?.addService({
    fullName: spec.definition.fullName,
    definition: spec.grpcDefinition,
    impl: grpcHandlers(spec.definition, spec.impl),
    maxRequestBytes: spec.maxRequestBytes ?? 0,
  });
  let stopped: Promise<void> | null = null;
  let serving = true;
  // A dead replica takes no more work (it would fail): what it holds goes back to the queue for the others.
  spec.onDead?.(() => {
    serving = false;
    grpc?.setServing(false, [spec.definition.fullName]);
    void server.stop(0);
  });
  const sync = grpc
    ? setInterval(() => {
        const live = server.live && !spec.dead?.();
        if (stopped || live === serving) return;
        serving = live;
        grpc.setServing(serving, [spec.definition.fullName]);
      }, HEALTH_SYNC_MS).unref()
    : undefined;
  return {
    server,
    grpc,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        clearInterval(sync);
        grpc?.setServing(false, [spec.definition.fullName]);
        await server.stop(graceMs);
        events.flush();
        await spec.close();
      })();
      return stopped;
    },
  };
}
