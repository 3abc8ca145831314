// The public Sampler API: maps gRPC calls onto the Scheduler (client cancellation and deadlines
// onto an AbortSignal, typed errors onto gRPC statuses) and adds itself to a gRPC server the caller
// built; unless turned off, the OpenAI-compatible HTTP API with the playground runs beside it on the
// same Scheduler. Shutdown order: health NOT_SERVING → refuse new requests and let those in flight
// (gRPC and HTTP streams) finish within the grace period → close HTTP; the caller then closes its
// gRPC server.
import { setMaxListeners } from 'node:events';
import type { ServerUnaryCall, ServerWritableStream, sendUnaryData } from '@grpc/grpc-js';
import { InvalidArgumentError, toServiceError } from '../../shared/errors.ts';
import {
  GenerateRequest,
  SamplerService,
  type GenerateEvent,
  type GenerateResponse,
  type ListModelsRequest,
  type ListModelsResponse,
  type SamplerServer,
} from '../../shared/gen/ditpipe/v1/sampler.ts';
import type { Logger } from '../../shared/log.ts';
import type { SchedulerMetrics } from '../../shared/metrics.ts';
import { countField, SERVICE_NAMES, type GrpcServer } from '../../shared/server/grpc.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { SchedulerConfig } from './config.ts';
import type { HttpConfig } from './http/config.ts';
import { startHttpApi, type HttpApiOptions, type RunningHttpApi } from './http/server.ts';
import { DRAIN_ABORT_MS, MAX_CLASS_NAME_LENGTH, Scheduler } from './scheduler.ts';

export interface RunningScheduler {
  scheduler: Scheduler;
  /** The HTTP API and playground; null when turned off. */
  http: RunningHttpApi | null;
  stop(graceMs?: number): Promise<void>;
}

type AnyCall = ServerUnaryCall<GenerateRequest, GenerateResponse> | ServerWritableStream<GenerateRequest, GenerateEvent>;

/** An AbortSignal that fires when the client cancels or its deadline passes, and the deadline (epoch ms). */
function callSignal(call: AnyCall): { signal: AbortSignal; deadline: number | undefined; dispose: () => void } {
  const ac = new AbortController();
  // Every step and decode call of the request listens on it (one per image for decodes).
  setMaxListeners(0, ac.signal);
  const onCancel = (): void => ac.abort(new Error('cancelled by the client'));
  call.on('cancelled', onCancel);
  const d = call.getDeadline();
  const deadline = d instanceof Date ? d.getTime() : Number.isFinite(d) ? Number(d) : undefined;
  let timer: NodeJS.Timeout | undefined;
  if (deadline !== undefined) {
    timer = setTimeout(() => ac.abort(new Error('deadline exceeded')), Math.max(0, deadline - Date.now()));
  }
  return {
    signal: ac.signal,
    deadline,
    dispose: () => {
      clearTimeout(timer);
      call.removeListener('cancelled', onCancel);
    },
  };
}

export function samplerGrpcImpl(scheduler: Scheduler): SamplerServer {
  return {
    generate(call: ServerUnaryCall<GenerateRequest, GenerateResponse>, callback: sendUnaryData<GenerateResponse>): void {
      const { signal, deadline, dispose } = callSignal(call);
      scheduler
        .generate(call.request, { signal, deadline })
        .then(
          (res) => callback(null, res),
          (err: unknown) => callback(toServiceError(err)),
        )
        .finally(dispose);
    },

    generateStream(call: ServerWritableStream<GenerateRequest, GenerateEvent>): void {
      const { signal, deadline, dispose } = callSignal(call);
      scheduler
        .generate(call.request, {
          signal,
          deadline,
          onEvent: (e) => {
            if (!call.cancelled) call.write(e);
          },
        })
        .then(
          () => call.end(),
          // grpc-js sends the status of a stream only through an 'error' event (destroy() would not).
          (err: unknown) => {
            if (!call.cancelled) call.emit('error', toServiceError(err));
          },
        )
        .finally(dispose);
    },

    listModels(_call: ServerUnaryCall<ListModelsRequest, ListModelsResponse>, callback: sendUnaryData<ListModelsResponse>): void {
      scheduler.catalog.list().then(
        (models) => callback(null, { models }),
        (err: unknown) => callback(toServiceError(err)),
      );
    },
  };
}

/**
 * The largest GenerateRequest a scheduler with this config can accept: every field set, the
 * longest served model name, the most class labels, each by a name of the longest allowed length.
 * Anything larger is refused by gRPC before it is decoded.
 */
export function maxGenerateRequestBytes(config: SchedulerConfig): number {
  const name = 'x'.repeat(Math.max(...config.models.map((m) => m.length)));
  // Class names are counted in UTF-16 units; each takes at most 3 bytes of UTF-8.
  const label = { name: '\u{800}'.repeat(MAX_CLASS_NAME_LENGTH) };
  const req = GenerateRequest.encode({
    model: name,
    classLabels: Array.from({ length: config.maxImagesPerRequest }, () => label),
    numSteps: -1,
    sampler: -1,
    cfgScale: Number.MAX_VALUE,
    guidanceChannels: -1,
    eta: Number.MAX_VALUE,
    seed: 2n ** 64n - 1n,
    outputFormat: -1,
    preview: { everySteps: 2 ** 32 - 1, method: -1 },
    cachePolicy: -1,
  }).finish();
  return req.byteLength;
}

/** Adds the Sampler API for `scheduler` to a gRPC server the caller built (before it listens). */
export function addSamplerService(server: GrpcServer, scheduler: Scheduler): void {
  const max = scheduler.config.maxImagesPerRequest;
  const countLabels = (bytes: Buffer): void => {
    // Counting is a skip per label; decoding would build an object per label first.
    const n = countField(bytes, 2);
    if (n > max) {
      const e = new InvalidArgumentError(`class_labels asks for ${n} images; at most ${max} per request`, { field: 'class_labels' });
      scheduler.refused(e);
      throw e;
    }
  };
  server.addService({
    fullName: SERVICE_NAMES.sampler,
    definition: SamplerService,
    impl: samplerGrpcImpl(scheduler),
    maxRequestBytes: maxGenerateRequestBytes(scheduler.config),
    precheck: { generate: countLabels, generateStream: countLabels },
  });
}

/**
 * A scheduler serving the Sampler API on `grpc` (the caller listens on it), and the HTTP API when
 * asked, talking to the pools over `transport`.
 */
export async function startSchedulerService(
  config: SchedulerConfig,
  transport: Transport,
  opts: {
    grpc: GrpcServer;
    metrics?: SchedulerMetrics;
    log?: Logger;
    queueSettings?: Partial<QueueSettings>;
    http?: ({ config: HttpConfig } & HttpApiOptions) | null;
  },
): Promise<RunningScheduler> {
  const scheduler = new Scheduler(config, transport, opts.metrics, { log: opts.log, queueSettings: opts.queueSettings });
  addSamplerService(opts.grpc, scheduler);
  const grpcAddress = (): string | undefined => {
    const port = opts.grpc.port;
    if (port === null) return undefined;
    const host = opts.grpc.host === '0.0.0.0' || opts.grpc.host === '::' ? '127.0.0.1' : opts.grpc.host;
    return `${host}:${port}`;
  };
  const http = opts.http ? await startHttpApi(scheduler, opts.http.config, { grpcAddress, ...opts.http }) : null;
  let stopped: Promise<void> | null = null;
  return {
    scheduler,
    http,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        opts.grpc.setServing(false, [SERVICE_NAMES.sampler]);
        // The HTTP server keeps its open streams while the scheduler drains them, and long enough
        // after to send the answers of requests the drain's end stopped.
        await Promise.all([scheduler.drain(graceMs), http?.stop(graceMs + DRAIN_ABORT_MS)]);
      })();
      return stopped;
    },
  };
}
