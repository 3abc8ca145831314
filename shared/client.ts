// Promise/async-iterator client of the public Sampler API (used by `ditpipe generate`, the load
// tester and the tests). gRPC errors come back as ditpipe's typed errors.
import { credentials, Metadata, type ChannelCredentials, type ServiceError } from '@grpc/grpc-js';
import { fromServiceError } from './errors.ts';
import {
  SamplerClient,
  type GenerateEvent,
  type GenerateRequest,
  type GenerateResponse,
  type ModelInfo,
} from './gen/ditpipe/v1/sampler.ts';

export interface CallOpts {
  /** Milliseconds the call may take (sent as the gRPC deadline). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export class SamplerApi {
  readonly raw: SamplerClient;

  constructor(address: string, opts: { tls?: boolean | ChannelCredentials } = {}) {
    const creds = opts.tls === true ? credentials.createSsl() : opts.tls ? opts.tls : credentials.createInsecure();
    this.raw = new SamplerClient(address, creds, { 'grpc.max_receive_message_length': 64 * 1024 * 1024 });
  }

  private options(o: CallOpts): { deadline?: Date } {
    return o.timeoutMs === undefined ? {} : { deadline: new Date(Date.now() + o.timeoutMs) };
  }

  generate(req: Partial<GenerateRequest>, o: CallOpts = {}): Promise<GenerateResponse> {
    return new Promise((resolve, reject) => {
      const onAbort = (): void => call.cancel();
      const call = this.raw.generate(request(req), new Metadata(), this.options(o), (err: ServiceError | null, res?: GenerateResponse) => {
        o.signal?.removeEventListener('abort', onAbort);
        if (err) reject(fromServiceError(err));
        else resolve(res as GenerateResponse);
      });
      o.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Events of one request; ends after `completed`, throws the typed error on failure. */
  async *generateStream(req: Partial<GenerateRequest>, o: CallOpts = {}): AsyncGenerator<GenerateEvent> {
    const call = this.raw.generateStream(request(req), new Metadata(), this.options(o));
    const onAbort = (): void => call.cancel();
    o.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const ev of call as AsyncIterable<GenerateEvent>) yield ev;
    } catch (err) {
      throw fromServiceError(err as ServiceError);
    } finally {
      o.signal?.removeEventListener('abort', onAbort);
      call.cancel();
    }
  }

  listModels(o: CallOpts = {}): Promise<ModelInfo[]> {
    return new Promise((resolve, reject) => {
      this.raw.listModels({}, new Metadata(), this.options(o), (err: ServiceError | null, res) =>
        err ? reject(fromServiceError(err)) : resolve(res?.models ?? []),
      );
    });
  }

  close(): void {
    this.raw.close();
  }
}

/** A full request from the fields given (proto3 defaults for the rest). */
export function request(req: Partial<GenerateRequest>): GenerateRequest {
  return {
    model: '',
    classLabels: [],
    sampler: 0,
    guidanceChannels: 0,
    outputFormat: 0,
    ...req,
  };
}
