// Promise/async-iterator client of the public Sampler API (used by `ditpipe generate`, the load
// tester and the tests). gRPC errors come back as ditpipe's typed errors; a failure to reach the
// server carries a hint saying what to check.
//
//   const api = new SamplerApi('sampler.example:50051', { tls: { caFile: 'ca.pem' }, token });
//   const res = await api.generate({ model: 'dit-xl-2-256', classLabels: [{ name: 'goldfish' }] });
import { readFileSync } from 'node:fs';
import { credentials, Metadata, type ChannelCredentials, type ServiceError } from '@grpc/grpc-js';
import { Code, GRPC_KIND_KEY, InvalidArgumentError, fromServiceError, type DitpipeError } from './errors.ts';
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

/** TLS to the server: a CA to verify it with (default: the system's), a client certificate for mutual TLS. */
export interface ClientTlsFiles {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

export interface SamplerApiOptions {
  /** true: TLS with the system CAs; files: TLS with these; credentials: used as given; false/unset: plaintext. */
  tls?: boolean | ClientTlsFiles | ChannelCredentials;
  /** Bearer token sent with every call (`authorization: Bearer <token>`). */
  token?: string;
}

const ADDRESS = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$/;

/**
 * Checks a host:port address (IPv6 in brackets). A host alone is refused: grpc-js would quietly
 * use port 443.
 */
export function checkAddress(address: string, what = 'server address'): string {
  const m = ADDRESS.exec(address);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) {
    const hint = /^[^:]+$/.test(address) || /^\[[^\]]+\]$/.test(address) ? `; a port is required (e.g. ${address}:50051)` : '';
    throw new InvalidArgumentError(`${what} ${JSON.stringify(address)} is not host:port${hint}`, { field: 'address' });
  }
  return address;
}

function readPem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new InvalidArgumentError(
      `${what} ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`,
      { field: what },
    );
  }
}

/** Channel credentials for the options; errors name the file. */
export function channelCredentials(tls: SamplerApiOptions['tls']): ChannelCredentials {
  if (tls === undefined || tls === false) return credentials.createInsecure();
  if (tls === true) return credentials.createSsl();
  if (tls instanceof Object && 'compose' in tls) return tls;
  const files = tls;
  if (Boolean(files.certFile) !== Boolean(files.keyFile)) {
    throw new InvalidArgumentError('a client certificate needs both --tls-cert and --tls-key', {
      field: files.certFile ? 'tls.key' : 'tls.cert',
    });
  }
  return credentials.createSsl(
    files.caFile ? readPem(files.caFile, '--tls-ca') : null,
    files.keyFile ? readPem(files.keyFile, '--tls-key') : null,
    files.certFile ? readPem(files.certFile, '--tls-cert') : null,
  );
}

/** What to check when a call could not reach the server, judged from grpc-js's message. */
export function connectionHint(details: string, address: string, tls: boolean): string {
  if (/wrong version number|packet length too long|WRONG_VERSION_NUMBER/i.test(details)) {
    return `the server at ${address} does not speak TLS: drop --tls`;
  }
  if (/certificate|self[- ]signed|unable to verify|CERT_/i.test(details)) {
    return /required|handshake failure|alert/i.test(details)
      ? `the server at ${address} wants a client certificate it trusts: give --tls-cert and --tls-key`
      : `the server's certificate is not trusted: give the CA that signed it with --tls-ca`;
  }
  if (!tls && /Protocol error|Connection dropped|ECONNRESET|Received RST_STREAM|EPROTO/i.test(details)) {
    return `the server at ${address} may require TLS: add --tls (and --tls-ca)`;
  }
  // A TLS server drops a plaintext client just as silently as a closed port refuses it.
  return `is a server listening on ${address}? try npm start (or ditpipe up)${tls ? '' : '; if it serves TLS, add --tls (and --tls-ca)'}`;
}

export class SamplerApi {
  readonly raw: SamplerClient;
  private readonly token: string | undefined;
  private readonly tls: boolean;

  constructor(
    readonly address: string,
    opts: SamplerApiOptions = {},
  ) {
    checkAddress(address);
    this.tls = opts.tls !== undefined && opts.tls !== false;
    this.token = opts.token;
    this.raw = new SamplerClient(address, channelCredentials(opts.tls), { 'grpc.max_receive_message_length': 256 * 1024 * 1024 });
  }

  private options(o: CallOpts): { deadline?: Date } {
    return o.timeoutMs === undefined ? {} : { deadline: new Date(Date.now() + o.timeoutMs) };
  }

  private metadata(): Metadata {
    const md = new Metadata();
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  /** The typed error, with a hint when the server could not be reached. */
  private error(err: ServiceError): DitpipeError {
    const e = fromServiceError(err);
    // A status from a ditpipe server carries its kind; a bare UNAVAILABLE is the connection.
    if (e.code === Code.UNAVAILABLE && !err.metadata?.get(GRPC_KIND_KEY).length) {
      e.message = `${e.message} (${connectionHint(e.message, this.address, this.tls)})`;
    }
    return e;
  }

  generate(req: Partial<GenerateRequest>, o: CallOpts = {}): Promise<GenerateResponse> {
    return new Promise((resolve, reject) => {
      const onAbort = (): void => call.cancel();
      const call = this.raw.generate(request(req), this.metadata(), this.options(o), (err: ServiceError | null, res?: GenerateResponse) => {
        o.signal?.removeEventListener('abort', onAbort);
        if (err) reject(this.error(err));
        else resolve(res as GenerateResponse);
      });
      o.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Events of one request; ends after `completed`, throws the typed error on failure. */
  async *generateStream(req: Partial<GenerateRequest>, o: CallOpts = {}): AsyncGenerator<GenerateEvent> {
    const call = this.raw.generateStream(request(req), this.metadata(), this.options(o));
    const onAbort = (): void => call.cancel();
    o.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const ev of call as AsyncIterable<GenerateEvent>) yield ev;
    } catch (err) {
      throw this.error(err as ServiceError);
    } finally {
      o.signal?.removeEventListener('abort', onAbort);
      call.cancel();
    }
  }

  listModels(o: CallOpts = {}): Promise<ModelInfo[]> {
    return new Promise((resolve, reject) => {
      this.raw.listModels({}, this.metadata(), this.options(o), (err: ServiceError | null, res) =>
        err ? reject(this.error(err)) : resolve(res?.models ?? []),
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
    cachePolicy: 0,
    ...req,
  };
}
