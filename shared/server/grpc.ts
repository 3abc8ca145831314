// A grpc-js server with ditpipe's services, standard health and reflection, and ordered shutdown.
// Internal services (Denoiser, Decoder) are served here too, from their transport-neutral
// implementation, so a replica can be probed and called directly over gRPC as well as over NATS.
import {
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  type ServiceDefinition as GrpcServiceDefinition,
  type UntypedServiceImplementation,
  type sendUnaryData,
} from '@grpc/grpc-js';
import type { HealthImplementation } from 'grpc-health-check';
import { toServiceError } from '../errors.ts';
import { addHealthAndReflection } from '../transport/grpc.ts';
import type { CallContext, ServiceDefinition, ServiceImpl } from '../transport/types.ts';

export interface GrpcService {
  /** Fully qualified name, e.g. "ditpipe.v1.Sampler" (health and reflection use it). */
  fullName: string;
  definition: GrpcServiceDefinition;
  impl: UntypedServiceImplementation;
}

/** grpc-js handlers for a transport-neutral implementation of a generic definition's unary methods. */
export function grpcHandlers<D extends ServiceDefinition>(definition: D, impl: ServiceImpl<D>): UntypedServiceImplementation {
  const handlers: UntypedServiceImplementation = {};
  for (const [key, method] of Object.entries(definition.methods)) {
    if (method.requestStream || method.responseStream) continue;
    const fn = (impl as Record<string, (req: unknown, ctx: CallContext) => unknown>)[key];
    handlers[key] = (call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => {
      const ac = new AbortController();
      call.on('cancelled', () => ac.abort());
      const d = call.getDeadline();
      const deadline = d instanceof Date ? d.getTime() : Number.isFinite(d) ? Number(d) : Infinity;
      const ctx: CallContext = { signal: ac.signal, deadline, subject: `/${definition.fullName}/${method.name}`, method: method.name };
      Promise.resolve()
        .then(() => fn(call.request, ctx))
        .then(
          (res) => callback(null, res),
          (err: unknown) => callback(toServiceError(err)),
        );
    };
  }
  return handlers;
}

export interface RunningGrpcServer {
  port: number;
  health: HealthImplementation;
  /** Health → NOT_SERVING, then a graceful shutdown bounded by graceMs, then forced. */
  stop(graceMs?: number): Promise<void>;
}

export async function startGrpcServer(services: GrpcService[], opts: { port: number; host?: string }): Promise<RunningGrpcServer> {
  const server = new Server({ 'grpc.max_receive_message_length': 64 * 1024 * 1024, 'grpc.max_send_message_length': 64 * 1024 * 1024 });
  for (const s of services) server.addService(s.definition, s.impl);
  const health = addHealthAndReflection(server, services.map((s) => s.fullName));
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${opts.host ?? '0.0.0.0'}:${opts.port}`, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  let stopped: Promise<void> | null = null;
  return {
    port,
    health,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        health.setStatus('', 'NOT_SERVING');
        for (const s of services) health.setStatus(s.fullName, 'NOT_SERVING');
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            server.forceShutdown();
            resolve();
          }, graceMs);
          server.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          });
        });
      })();
      return stopped;
    },
  };
}
