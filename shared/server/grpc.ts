// The gRPC server of every ditpipe process. The caller builds it — address, TLS (mutual TLS when a
// client CA is given), bearer tokens, a plaintext health-only port for probes — and services add
// themselves to it, as grpc-health-check's `addToServer` does; then the caller calls listen().
//
//   const server = new GrpcServer({ host: '127.0.0.1', port: 50051, tls, tokens, healthPort: 50061 });
//   addSamplerService(server, scheduler);      // services register, with their largest request
//   await server.listen();                     // binds; server.address is what was bound
//   ...on SIGTERM: the services set their health NOT_SERVING and drain, then server.stop(grace)
//
// Every server also answers grpc.health.v1 (no token needed: probes carry none) and server
// reflection (from shared/gen/descriptor.binpb; behind the token unless `reflection: 'public'`).
// The receive limit is the largest request a registered service accepts, so a hostile client
// cannot make the server buffer and decode 64 MiB; bytes that do not decode are INVALID_ARGUMENT.
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import {
  type Metadata,
  Server,
  ServerCredentials,
  ServerInterceptingCall,
  type ServerInterceptor,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceDefinition as GrpcServiceDefinition,
  type UntypedServiceImplementation,
  type sendUnaryData,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import { HealthImplementation } from 'grpc-health-check';
import { codeName, DitpipeError, InvalidArgumentError, toServiceError, truncate } from '../errors.ts';
import { RateLimitedLog, silentLogger, type Logger } from '../log.ts';
import type { CallContext, ServiceDefinition, ServiceImpl } from '../transport/types.ts';
import type { TokenSet } from './auth.ts';

const DESCRIPTOR_URL = new URL('../gen/descriptor.binpb', import.meta.url);

/** Fully-qualified names of the services in ditpipe's protos (e.g. "ditpipe.v1.Sampler"). */
export const SERVICE_NAMES = {
  sampler: 'ditpipe.v1.Sampler',
  denoiser: 'ditpipe.v1.Denoiser',
  decoder: 'ditpipe.v1.Decoder',
} as const;

const HEALTH_PREFIX = '/grpc.health.v1.Health/';
const REFLECTION_PREFIXES = ['/grpc.reflection.v1.ServerReflection/', '/grpc.reflection.v1alpha.ServerReflection/'];

/** Receive limit floor: health checks, reflection requests and small RPCs fit in it. */
const MIN_RECEIVE_BYTES = 64 * 1024;

type PackageDefinition = ConstructorParameters<typeof ReflectionService>[0];

let descriptorFiles: Uint8Array[] | undefined;

/** The encoded FileDescriptorProtos of shared/gen/descriptor.binpb (field 1 of a FileDescriptorSet). */
export function descriptorFileProtos(): Uint8Array[] {
  if (descriptorFiles) return descriptorFiles;
  const reader = new BinaryReader(readFileSync(DESCRIPTOR_URL));
  const files: Uint8Array[] = [];
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) files.push(reader.bytes());
    else reader.skip(wireType);
  }
  descriptorFiles = files;
  return files;
}

/** The standard services a ditpipe gRPC server serves beside its own (reflection lists them). */
export const STANDARD_SERVICES = [
  'grpc.health.v1.Health',
  'grpc.reflection.v1.ServerReflection',
  'grpc.reflection.v1alpha.ServerReflection',
] as const;

let standardFiles: Uint8Array[] | undefined;

/**
 * FileDescriptorProtos of the health and reflection protos, from the .proto files the packages
 * implementing them ship (so reflection can describe them, as `grpcurl describe` expects).
 */
function standardFileProtos(): Uint8Array[] {
  if (standardFiles) return standardFiles;
  const require = createRequire(import.meta.url);
  const health = join(dirname(require.resolve('grpc-health-check/package.json')), 'proto');
  const reflection = join(dirname(require.resolve('@grpc/reflection/package.json')), 'build/proto');
  const pkg = loadSync(['health/v1/health.proto', 'grpc/reflection/v1/reflection.proto', 'grpc/reflection/v1alpha/reflection.proto'], {
    includeDirs: [health, reflection],
  });
  const seen = new Set<string>();
  standardFiles = [];
  for (const def of Object.values(pkg)) {
    for (const f of (def as { fileDescriptorProtos?: Uint8Array[] }).fileDescriptorProtos ?? []) {
      const key = Buffer.from(f).toString('base64');
      if (!seen.has(key)) standardFiles.push(f);
      seen.add(key);
    }
  }
  return standardFiles;
}

/** PEM material of a TLS server; with `clientCa`, clients must present a certificate it signed. */
export interface GrpcTls {
  cert: Buffer;
  key: Buffer;
  clientCa?: Buffer;
}

/** Reads and checks TLS files (certificate parses, key matches it); errors name the flag. */
export function loadGrpcTls(
  files: { certFile?: string; keyFile?: string; clientCaFile?: string },
  flags = { cert: '--tls-cert', key: '--tls-key', clientCa: '--tls-client-ca' },
): GrpcTls | null {
  if (!files.certFile && !files.keyFile && !files.clientCaFile) return null;
  if (!files.certFile || !files.keyFile) {
    throw new InvalidArgumentError(`TLS needs both ${flags.cert} and ${flags.key}`, { field: files.certFile ? 'tls.key' : 'tls.cert' });
  }
  const read = (path: string, flag: string, field: string): Buffer => {
    try {
      return readFileSync(path);
    } catch (err) {
      throw new InvalidArgumentError(
        `${flag} ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`,
        { field },
      );
    }
  };
  const cert = read(files.certFile, flags.cert, 'tls.cert');
  const key = read(files.keyFile, flags.key, 'tls.key');
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch (err) {
    throw new InvalidArgumentError(`${flags.cert} ${files.certFile}: not a PEM certificate (${(err as Error).message})`, {
      field: 'tls.cert',
    });
  }
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    throw new InvalidArgumentError(`${flags.key} ${files.keyFile}: not a PEM private key (${(err as Error).message})`, {
      field: 'tls.key',
    });
  }
  if (!x509.checkPrivateKey(privateKey)) {
    throw new InvalidArgumentError(`${flags.key} ${files.keyFile} is not the key of the certificate in ${files.certFile}`, {
      field: 'tls.key',
    });
  }
  const tls: GrpcTls = { cert, key };
  if (files.clientCaFile) {
    const ca = read(files.clientCaFile, flags.clientCa, 'tls.clientCa');
    try {
      new X509Certificate(ca);
    } catch (err) {
      throw new InvalidArgumentError(`${flags.clientCa} ${files.clientCaFile}: not a PEM certificate (${(err as Error).message})`, {
        field: 'tls.clientCa',
      });
    }
    tls.clientCa = ca;
  }
  return tls;
}

export type ReflectionMode = 'on' | 'public' | 'off';

export interface GrpcServerOptions {
  /** Address to bind (default 127.0.0.1: nothing listens beyond what it was told). */
  host?: string;
  /** API port (0 = any free port); null = no API listener, only the health port. */
  port: number | null;
  /** TLS for the API port; mutual TLS with `clientCa`. Null: plaintext. */
  tls?: GrpcTls | null;
  /** Bearer tokens every call must carry (health checks excepted). Null: no token needed. */
  tokens?: TokenSet | null;
  /** on: served (behind the token when there are tokens); public: served without a token; off: not served. */
  reflection?: ReflectionMode;
  /**
   * A plaintext port answering only grpc.health.v1, for probes that speak neither TLS nor tokens
   * (Kubernetes' gRPC probes). Null: none.
   */
  healthPort?: number | null;
  /** Address of the health port (default: host). */
  healthHost?: string;
  /** Where refused calls are logged (rate-limited; tokens never appear). */
  log?: Logger;
}

export interface GrpcServiceSpec {
  /** Fully qualified name, e.g. "ditpipe.v1.Sampler" (health and reflection use it). */
  fullName: string;
  definition: GrpcServiceDefinition;
  impl: UntypedServiceImplementation;
  /** Largest valid request of any method, in bytes: the server's receive limit is the largest of these. */
  maxRequestBytes: number;
  /**
   * Checks of a method's raw request bytes before they are decoded (by method key), e.g. counting a
   * repeated field so an oversized request is refused without decoding it. Throw DitpipeErrors.
   */
  precheck?: Record<string, (bytes: Buffer) => void>;
}

/** What a request decoder returns instead of throwing, so the handler can answer INVALID_ARGUMENT. */
class UndecodableRequest {
  constructor(readonly error: DitpipeError) {}
}

function decodeFailure(err: unknown, what: string): UndecodableRequest {
  if (err instanceof DitpipeError) return new UndecodableRequest(err);
  return new UndecodableRequest(
    new InvalidArgumentError(`request is not a valid ${what}: ${truncate((err as Error)?.message ?? String(err), 200)}`),
  );
}

/** The definition and implementation with decoding that never throws (grpc-js would answer INTERNAL). */
function guarded(spec: GrpcServiceSpec): { definition: GrpcServiceDefinition; impl: UntypedServiceImplementation } {
  const definition: Record<string, GrpcServiceDefinition[string]> = {};
  const impl: UntypedServiceImplementation = {};
  for (const [key, method] of Object.entries(spec.definition)) {
    const check = spec.precheck?.[key];
    const what = `${method.path.slice(1)} request`;
    definition[key] = {
      ...method,
      requestDeserialize: (bytes: Buffer): unknown => {
        try {
          check?.(bytes);
          return method.requestDeserialize(bytes);
        } catch (err) {
          return decodeFailure(err, what);
        }
      },
    };
    const handler = spec.impl[key] as ((...args: unknown[]) => void) | undefined;
    if (!handler) continue;
    if (method.requestStream) {
      impl[key] = handler as UntypedServiceImplementation[string];
    } else if (method.responseStream) {
      impl[key] = ((call: ServerWritableStream<unknown, unknown>) => {
        if (call.request instanceof UndecodableRequest) call.emit('error', toServiceError(call.request.error));
        else handler(call);
      }) as UntypedServiceImplementation[string];
    } else {
      impl[key] = ((call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => {
        if (call.request instanceof UndecodableRequest) callback(toServiceError(call.request.error));
        else handler(call, callback);
      }) as UntypedServiceImplementation[string];
    }
  }
  return { definition: definition as GrpcServiceDefinition, impl };
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

/** Counts the occurrences of a field in an encoded message without decoding them (fields are skipped). */
export function countField(bytes: Uint8Array, field: number): number {
  const r = new BinaryReader(bytes);
  let n = 0;
  while (r.pos < r.len) {
    const [f, wt] = r.tag();
    if (f === field) n++;
    r.skip(wt);
  }
  return n;
}

function bindAddress(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

export class GrpcServer {
  readonly health = new HealthImplementation({ '': 'SERVING' });
  private readonly specs: GrpcServiceSpec[] = [];
  private api: Server | null = null;
  private healthServer: Server | null = null;
  private boundPort: number | null = null;
  private boundHealthPort: number | null = null;
  private stopped: Promise<void> | null = null;
  private readonly refused: RateLimitedLog;

  constructor(readonly options: GrpcServerOptions) {
    this.refused = new RateLimitedLog(options.log ?? silentLogger());
  }

  /** Registers a service (before listen). Its health status starts SERVING. */
  addService(spec: GrpcServiceSpec): void {
    if (this.api || this.healthServer) throw new Error(`cannot add ${spec.fullName}: the gRPC server is already listening`);
    if (!/^[A-Za-z_][\w.]*$/.test(spec.fullName)) {
      throw new InvalidArgumentError(`service name must be fully qualified like ditpipe.v1.Sampler, got ${JSON.stringify(spec.fullName)}`, {
        field: 'fullName',
      });
    }
    this.specs.push(spec);
    this.health.setStatus(spec.fullName, 'SERVING');
  }

  /** Sets the overall status and that of the given services (default: all of them). */
  setServing(serving: boolean, names: readonly string[] = this.specs.map((s) => s.fullName)): void {
    const status = serving ? 'SERVING' : 'NOT_SERVING';
    this.health.setStatus('', status);
    for (const n of names) this.health.setStatus(n, status);
  }

  /** The receive limit: the largest request a registered service accepts. */
  get maxReceiveBytes(): number {
    return Math.max(MIN_RECEIVE_BYTES, ...this.specs.map((s) => s.maxRequestBytes));
  }

  /** API port bound by listen(); null when there is none. */
  get port(): number | null {
    return this.boundPort;
  }

  get healthPort(): number | null {
    return this.boundHealthPort;
  }

  get host(): string {
    return this.options.host ?? '127.0.0.1';
  }

  /** host:port as bound (what to print and connect to). */
  get address(): string {
    if (this.boundPort === null) throw new Error('the gRPC server has no API listener');
    return bindAddress(this.host, this.boundPort);
  }

  /** "TLS (mutual)", "TLS" or "plaintext", plus whether tokens are required: for the start-up log. */
  get security(): string {
    const t = this.options.tls;
    const tls = t ? (t.clientCa ? 'mutual TLS' : 'TLS') : 'plaintext';
    return this.options.tokens ? `${tls}, bearer tokens (${this.options.tokens.size})` : tls;
  }

  async listen(): Promise<void> {
    if (this.api || this.healthServer) throw new Error('the gRPC server is already listening');
    const o = this.options;
    if (o.port !== null) {
      const interceptors = o.tokens ? [this.authInterceptor(o.tokens)] : [];
      const server = new Server({
        'grpc.max_receive_message_length': this.maxReceiveBytes,
        'grpc.max_send_message_length': 256 * 1024 * 1024,
        interceptors,
      });
      for (const spec of this.specs) {
        const g = guarded(spec);
        server.addService(g.definition, g.impl);
      }
      this.health.addToServer(server);
      if ((o.reflection ?? 'on') !== 'off') {
        // @grpc/reflection only reads `fileDescriptorProtos` from the package definition's entries.
        // It lists every service this server serves: its own plus health and reflection.
        const pkg = {
          ditpipe: { fileDescriptorProtos: descriptorFileProtos() },
          standard: { fileDescriptorProtos: standardFileProtos() },
        } as unknown as PackageDefinition;
        new ReflectionService(pkg, { services: [...this.specs.map((s) => s.fullName), ...STANDARD_SERVICES] }).addToServer(server);
      }
      const creds = o.tls
        ? ServerCredentials.createSsl(o.tls.clientCa ?? null, [{ cert_chain: o.tls.cert, private_key: o.tls.key }], Boolean(o.tls.clientCa))
        : ServerCredentials.createInsecure();
      this.api = server;
      this.boundPort = await bind(server, bindAddress(this.host, o.port), creds);
    }
    if (o.healthPort !== null && o.healthPort !== undefined) {
      const hs = new Server({ 'grpc.max_receive_message_length': MIN_RECEIVE_BYTES });
      this.health.addToServer(hs);
      this.healthServer = hs;
      this.boundHealthPort = await bind(hs, bindAddress(o.healthHost ?? this.host, o.healthPort), ServerCredentials.createInsecure());
    }
  }

  /** Health → NOT_SERVING, then a graceful shutdown bounded by graceMs, then forced. Idempotent. */
  stop(graceMs = 10_000): Promise<void> {
    this.stopped ??= (async () => {
      this.setServing(false);
      this.refused.flush();
      await Promise.all([this.api, this.healthServer].map((s) => (s ? shutdown(s, graceMs) : Promise.resolve())));
    })();
    return this.stopped;
  }

  private authInterceptor(tokens: TokenSet): ServerInterceptor {
    const publicReflection = this.options.reflection === 'public';
    return (method, call) =>
      new ServerInterceptingCall(call, {
        start: (next) =>
          next({
            onReceiveMetadata: (metadata: Metadata, nextMetadata: (m: Metadata) => void) => {
              const path = method.path;
              if (path.startsWith(HEALTH_PREFIX) || (publicReflection && REFLECTION_PREFIXES.some((p) => path.startsWith(p)))) {
                nextMetadata(metadata);
                return;
              }
              const verdict = tokens.check(path, metadata);
              if (!verdict) {
                nextMetadata(metadata);
                return;
              }
              const code = codeName(verdict.code);
              this.refused.event(
                'warn',
                `${code}|${path}`,
                { code, method: path, peer: call.getPeer() },
                `refused a call to ${path}: ${code} (${verdict.details})`,
              );
              call.sendStatus({ code: verdict.code, details: verdict.details });
            },
          }),
      });
  }
}

function bind(server: Server, address: string, creds: ServerCredentials): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    server.bindAsync(address, creds, (err, p) => (err ? reject(new Error(`cannot listen on ${address}: ${err.message}`)) : resolve(p)));
  });
}

function shutdown(server: Server, graceMs: number): Promise<void> {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}
