// The transport-neutral RPC API: what services see, whichever bus carries their calls.
//
// A service is described by its ts-proto *generic definition* (e.g. `DenoiserDefinition` from
// shared/gen). `Transport.serve()` mounts an implementation of its unary methods; and
// `Transport.client()` gives a typed promise client. Two transports implement it with the same
// semantics: NATS (shared/transport/nats.ts) and an in-process bus (shared/transport/inproc.ts).
//
//   const server = await transport.serve(DenoiserDefinition, {
//     async denoise(req, ctx) { ...; return DenoiseResponse.create({ out }); },
//     async info() { return DenoiserInfo.create({ model: 'dit-s2' }); },
//   }, { scope: 'dit-s2' });
//   const denoiser = transport.client(DenoiserDefinition, { scope: 'dit-s2', timeoutMs: 30_000 });
//   const res = await denoiser.denoise(req, { signal, timeoutMs: 5_000 });
//   const all = await denoiser.collect('info', {}, { waitMs: 200 }); // one reply per replica
//
// Subjects: `<prefix>.<service>.<scope>.<method>` with prefix `ditpipe.v1`, service and method
// lower-cased proto names, scope a model (or other) name chosen by the caller, e.g.
// `ditpipe.v1.denoiser.dit-s2.denoise`. All replicas of a service subscribe in one queue group,
// so each call reaches exactly one of them. Methods marked `idempotency_level = NO_SIDE_EFFECTS`
// are also served on `<subject>.all` without a queue group, for `collect()` (e.g. counting
// replicas). Only unary methods travel over a bus; streaming methods are gRPC-only.
import type { BinaryReader, BinaryWriter } from '@bufbuild/protobuf/wire';

/** Encoder/decoder of one message type, as ts-proto generates it (`MessageFns<T>`). */
export interface MessageType<T> {
  encode(message: T, writer?: BinaryWriter): BinaryWriter;
  decode(input: BinaryReader | Uint8Array, length?: number): T;
}

/** One method of a ts-proto generic definition. */
export interface MethodDefinition<Req = unknown, Res = unknown> {
  readonly name: string;
  readonly requestType: MessageType<Req>;
  readonly requestStream: boolean;
  readonly responseType: MessageType<Res>;
  readonly responseStream: boolean;
  readonly options: { readonly idempotencyLevel?: 'IDEMPOTENT' | 'NO_SIDE_EFFECTS' | 'IDEMPOTENCY_UNKNOWN' };
}

/** A ts-proto generic service definition (`outputServices=generic-definitions`). */
export interface ServiceDefinition {
  readonly name: string;
  readonly fullName: string;
  // Concrete definitions assign to this (method-syntax parameters are bivariant); the mapped
  // types below recover their exact request/response types.
  readonly methods: { readonly [key: string]: MethodDefinition };
}

export type RequestOf<M> = M extends { requestType: MessageType<infer R> } ? R : never;
export type ResponseOf<M> = M extends { responseType: MessageType<infer R> } ? R : never;

/** Keys of the unary methods of a definition (the ones a bus can carry). */
export type UnaryMethodKey<D extends ServiceDefinition> = {
  [K in keyof D['methods'] & string]: D['methods'][K]['requestStream'] extends false
    ? D['methods'][K]['responseStream'] extends false
      ? K
      : never
    : never;
}[keyof D['methods'] & string];

/** Keys of the methods marked NO_SIDE_EFFECTS (served for `collect()`). */
export type CollectableMethodKey<D extends ServiceDefinition> = {
  [K in UnaryMethodKey<D>]: D['methods'][K]['options'] extends { idempotencyLevel: 'NO_SIDE_EFFECTS' } ? K : never;
}[UnaryMethodKey<D>];

/** What a handler learns about the call besides the request. */
export interface CallContext {
  /** Aborted when the caller's deadline passes or the server stops past its grace period. */
  readonly signal: AbortSignal;
  /** Epoch milliseconds after which the caller no longer waits (Infinity when none was sent). */
  readonly deadline: number;
  /** The subject (or method path) the call arrived on. */
  readonly subject: string;
  /** Proto method name, e.g. "Denoise". */
  readonly method: string;
}

/** Implementation of a definition's unary methods. Throw DitpipeErrors to answer with a status. */
export type ServiceImpl<D extends ServiceDefinition> = {
  [K in UnaryMethodKey<D>]: (
    request: RequestOf<D['methods'][K]>,
    ctx: CallContext,
  ) => Promise<ResponseOf<D['methods'][K]>> | ResponseOf<D['methods'][K]>;
};

/** Per-call options. */
export interface CallOptions {
  /** Overall time for the call, retries included (default: the client's timeoutMs). */
  timeoutMs?: number;
  /** Time for one attempt; an attempt that runs out is retried while time is left (default: the whole timeout). */
  attemptTimeoutMs?: number;
  /** Retries after UNAVAILABLE or an attempt timeout; ignored (0) for methods not marked idempotent. */
  retries?: number;
  /** Cancels the call: it rejects with CancelledError at once (the server may still finish). */
  signal?: AbortSignal;
  /** Called before each retry with the error that caused it and the retry number (1-based). */
  onRetry?: (err: Error, retry: number) => void;
}

export interface CollectOptions {
  /** How long to gather replies, in milliseconds (default 250). */
  waitMs?: number;
  signal?: AbortSignal;
}

/** Typed client: one promise method per unary method, plus `collect()` for NO_SIDE_EFFECTS methods. */
export type RpcClient<D extends ServiceDefinition> = {
  readonly [K in UnaryMethodKey<D>]: (
    request: RequestOf<D['methods'][K]>,
    opts?: CallOptions,
  ) => Promise<ResponseOf<D['methods'][K]>>;
} & {
  /** Calls a NO_SIDE_EFFECTS method on every replica; resolves with the replies that came within waitMs. */
  collect<K extends CollectableMethodKey<D>>(
    method: K,
    request: RequestOf<D['methods'][K]>,
    opts?: CollectOptions,
  ): Promise<Array<ResponseOf<D['methods'][K]>>>;
  /** Subject a method is called on. */
  subjectOf(method: UnaryMethodKey<D>): string;
};

export interface SubjectOptions {
  /**
   * Scope token in the subject: the model (denoiser), VAE (decoder) or other name that clients
   * and servers agree on. Must not contain '.', '*', '>' or whitespace.
   */
  scope: string;
  /** Subject prefix (default "ditpipe.v1"). */
  subjectPrefix?: string;
}

export interface ServeOptions extends SubjectOptions {
  /** Queue group shared by the replicas (default "ditpipe.<service>.<scope>"). */
  queue?: string;
  /** Largest reply to send, bytes incl. headers; capped by the bus limit. Larger replies become PayloadTooLargeError. */
  maxPayload?: number;
  /** Called with errors that cannot be answered to a caller (reply publish failed, handler threw after deadline). */
  onError?: (err: unknown, method: string) => void;
  /**
   * A replica stops answering liveness probes (so retries avoid it) while one of its calls has
   * run this many milliseconds past its caller's deadline: a stuck model, not a slow one
   * (default 1 000).
   */
  stuckGraceMs?: number;
}

export interface ClientOptions extends SubjectOptions {
  /** Default overall timeout per call in milliseconds (default 30 000). */
  timeoutMs?: number;
  /** Default per-attempt timeout (default: the whole timeout). */
  attemptTimeoutMs?: number;
  /** Default retries for idempotent methods (default 2). */
  retries?: number;
  /** Largest request to send, bytes incl. headers; capped by the bus limit (default: the bus limit). */
  maxPayload?: number;
  /** First retry backoff in milliseconds; doubles per retry with full jitter (default 25, max 1 000). */
  backoffMs?: number;
}

/** A service mounted on a transport. */
export interface RpcServer {
  /**
   * Subjects served: the queue-group subjects first, then for each method the `.all` subject
   * (NO_SIDE_EFFECTS methods), the `.live` probe and the `.at.<instance>` direct subject
   * (idempotent methods), in that order.
   */
  readonly subjects: readonly string[];
  /** Random id of this replica, the last token of its direct subjects. */
  readonly instance: string;
  /** Whether it answers liveness probes: not stopping, and no call stuck past its deadline (see ServeOptions.stuckGraceMs). */
  readonly live: boolean;
  /** Calls being handled right now. */
  readonly inFlight: number;
  /**
   * Stops taking calls (unsubscribes), then waits up to graceMs (default 10 000) for calls in
   * flight; those still running then get their signal aborted and are answered UNAVAILABLE so
   * the caller retries elsewhere. Idempotent.
   */
  stop(graceMs?: number): Promise<void>;
}

/** Carries RPCs: one per process (NATS connection) or per in-process bus member. */
export interface Transport {
  readonly kind: 'nats' | 'inproc';
  serve<D extends ServiceDefinition>(definition: D, impl: ServiceImpl<D>, opts: ServeOptions): Promise<RpcServer>;
  client<D extends ServiceDefinition>(definition: D, opts: ClientOptions): RpcClient<D>;
  /**
   * Ordered shutdown: stops every server mounted here (each waits up to graceMs for its calls in
   * flight), then drains and closes the connection. Idempotent.
   */
  close(opts?: { graceMs?: number }): Promise<void>;
  /** Resolves when closed: null after close(), the error when the connection failed for good. */
  readonly closed: Promise<Error | null>;
}
