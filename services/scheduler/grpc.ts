// The public Sampler API on grpc-js: maps calls onto the Scheduler, client cancellation and
// deadlines onto an AbortSignal, and typed errors onto gRPC statuses.
import { setMaxListeners } from 'node:events';
import type { ServerUnaryCall, ServerWritableStream, sendUnaryData } from '@grpc/grpc-js';
import { toServiceError } from '../../shared/errors.ts';
import type {
  GenerateEvent,
  GenerateRequest,
  GenerateResponse,
  ListModelsRequest,
  ListModelsResponse,
  SamplerServer,
} from '../../shared/gen/ditpipe/v1/sampler.ts';
import type { Scheduler } from './scheduler.ts';

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
      scheduler.generate(call.request, { signal, deadline }).then(
        (res) => callback(null, res),
        (err: unknown) => callback(toServiceError(err)),
      ).finally(dispose);
    },

    generateStream(call: ServerWritableStream<GenerateRequest, GenerateEvent>): void {
      const { signal, deadline, dispose } = callSignal(call);
      scheduler
        .generate(call.request, { signal, deadline, onEvent: (e) => { if (!call.cancelled) call.write(e); } })
        .then(
          () => call.end(),
          // grpc-js sends the status of a stream only through an 'error' event (destroy() would not).
          (err: unknown) => { if (!call.cancelled) call.emit('error', toServiceError(err)); },
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
