// The transport-neutral RPC API: what services see, whichever bus carries their calls.
//
// A service is described by its ts-proto *generic definition* (e.g. `DenoiserDefinition` from
// shared/gen). `Transport.serve()` mounts an implementation of its unary methods; and
// `Transport.client()` gives a typed promise client. Two transports implement it with the same
// semantics: NATS with JetStream (shared/transport/nats.ts) and an in-process bus
// (shared/transport/inproc.ts).
//
//   const server = await transport.serve(DenoiserDefinition, {
//     async denoise(req, ctx) { ...; return DenoiseResponse.create({ out }); },
//     async info() { return DenoiserInfo.create({ model: 'dit-s2' }); },
//   }, { scope: 'dit-s2', drivers: { denoise: (source) => batcher.attach(source) } });
//   const denoiser = transport.client(DenoiserDefinition, { scope: 'dit-s2', timeoutMs: 30_000 });
//   const res = await denoiser.denoise(req, { signal, timeoutMs: 5_000, cost: 2, maxBatchCost: 64 });
//   const all = await denoiser.collect('info', {}, { waitMs: 200 }); // one reply per replica
//
// Two kinds of method, told apart by their proto idempotency_level:
// - IDEMPOTENT methods (Denoise, Decode) are *work*: calls go through a JetStream work-queue stream
//   per method and scope, which the service's replicas pull from when they can take work
//   (shared/transport/work.ts has the protocol; proto/ditpipe/v1/work.proto the envelope). A call
//   a replica took but did not answer (it died, froze, or held it past the attempt time) is
//   delivered to another replica by the server: redelivery is the retry mechanism for work.
// - Every other unary method is a *control call* by request/reply (retried after UNAVAILABLE or a
//   timeout). NO_SIDE_EFFECTS ones (Info) are asked on `<subject>.all`, which every replica
//   answers: a call takes the first answer (a frozen replica cannot stall it), `collect()` all of
//   them. Any other control method would go to one replica of a queue group on `<subject>`.
// Subjects: prefix `ditpipe.v1`, service and method lower-cased proto names, scope a model (or other)
// name chosen by the caller, e.g. `ditpipe.v1.denoiser.dit-s2.denoise`. Only unary methods travel
// over a bus; streaming methods are gRPC-only.
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

/** Keys of the methods marked IDEMPOTENT: work, carried by work queues. */
export type WorkMethodKey<D extends ServiceDefinition> = {
  [K in UnaryMethodKey<D>]: D['methods'][K]['options'] extends { idempotencyLevel: 'IDEMPOTENT' } ? K : never;
}[UnaryMethodKey<D>];

/** What a handler learns about the call besides the request. */
export interface CallContext {
  /** Aborted when the caller stops waiting (deadline, cancellation) or the server stops past its grace period. */
  readonly signal: AbortSignal;
  /** Epoch milliseconds after which the caller no longer waits (Infinity when it sent none). */
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
  /** Overall time the caller waits for the answer, retries and redeliveries included (default: the client's timeoutMs). */
  timeoutMs?: number;
  /**
   * Control calls: time for one attempt, retried while time is left. Work: the longest one
   * replica may hold the call before the queue gives it to another (default: the client's
   * attemptTimeoutMs, else the whole timeout).
   */
  attemptTimeoutMs?: number;
  /** Control calls: retries after UNAVAILABLE or an attempt timeout (ignored for methods not marked idempotent). */
  retries?: number;
  /** Cancels the call: it rejects with CancelledError at once; replicas drop work not yet started. */
  signal?: AbortSignal;
  /**
   * Work: what the call costs the replica (e.g. forward-pass rows). Calls that become ready in the
   * same event-loop turn travel in one message while their costs add up to at most maxBatchCost.
   */
  cost?: number;
  /**
   * Work: the most cost one message may carry (e.g. a replica's row budget). Default: the call's
   * own cost, so it travels alone — a message goes to one replica, and calls packed together
   * cannot be shared by idle replicas.
   */
  maxBatchCost?: number;
  /**
   * Work: the instance of the replica to send this call to directly (it holds state the call can
   * reuse, e.g. a request's step cache), on core NATS subject `<method subject>.to.<instance>`.
   * The call falls back to the queue when that replica gives it back or says nothing of it for an
   * ack wait, so a target that died or froze costs at most that wait, never the call.
   */
  target?: string;
}

export interface CollectOptions {
  /** How long to gather replies, in milliseconds (default 250). */
  waitMs?: number;
  signal?: AbortSignal;
}

/** Typed client: one promise method per unary method, plus `collect()` for NO_SIDE_EFFECTS methods. */
export type RpcClient<D extends ServiceDefinition> = {
  readonly [K in UnaryMethodKey<D>]: (request: RequestOf<D['methods'][K]>, opts?: CallOptions) => Promise<ResponseOf<D['methods'][K]>>;
} & {
  /** Calls a NO_SIDE_EFFECTS method on every replica; resolves with the replies that came within waitMs. */
  collect<K extends CollectableMethodKey<D>>(
    method: K,
    request: RequestOf<D['methods'][K]>,
    opts?: CollectOptions,
  ): Promise<Array<ResponseOf<D['methods'][K]>>>;
  /** Subject a method is called on (for work: the subject its queue's stream captures). */
  subjectOf(method: UnaryMethodKey<D>): string;
  /** Work queue of a work method: its stream and consumer names (e.g. for autoscalers) and live counts. */
  queueOf(method: WorkMethodKey<D>): WorkQueue;
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

/**
 * Settings of the work queues (one JetStream stream and durable pull consumer per work method and
 * scope). The caller (the scheduler) creates them when it first sends work and updates them to its
 * settings; a replica connected as its service (NatsConnectOptions.service) may not and only waits
 * for them, otherwise the first to start creates them. Every service of a deployment must use the
 * same settings (the DITPIPE_QUEUE_* variables; see
 * shared/transport/work.ts for the defaults).
 */
export interface QueueSettings {
  /** A message a replica took and stopped confirming (in-progress acks) is redelivered after this many ms. */
  ackWaitMs: number;
  /** Deliveries of one message before the queue gives up on it (first delivery included). */
  maxDeliver: number;
  /** Most messages the stream holds; a caller gets RESOURCE_EXHAUSTED beyond it. */
  maxMessages: number;
  /** Most bytes the stream holds (memory of the NATS server); RESOURCE_EXHAUSTED beyond it. */
  maxBytes: number;
  /** Messages older than this are dropped, in ms. */
  maxAgeMs: number;
  /** Re-sent messages with the same id within this many ms are stored once. */
  duplicateWindowMs: number;
  /** Most messages delivered to replicas and not yet acknowledged, all replicas together. */
  maxAckPending: number;
}

/** A work queue's names and live counts. */
export interface WorkQueue {
  /** JetStream stream name, e.g. "ditpipe_v1_denoiser_dit-s2". */
  readonly stream: string;
  /** Durable pull consumer shared by the replicas, e.g. "denoiser". */
  readonly consumer: string;
  /** Subject the stream captures. */
  readonly subject: string;
  /** Messages waiting for a replica, and messages taken by one and not yet acknowledged. */
  info(): Promise<{ pending: number; ackPending: number; waitingPulls: number }>;
}

/** Where a replica takes work from: a work queue's pull consumer, seen by the code that batches it. */
export interface WorkSource {
  /**
   * Takes work for the next pass: waits up to waitMs for up to `expect` messages (default 1; with
   * waitMs 0 it does not wait), then takes what else is queued without waiting. Each call it takes
   * is handed to the method's handler (which queues it for a pass) before the promise resolves
   * (direct calls, CallOptions.target, reach the handler without a take(), whatever the room);
   * `room()` says how much more the next pass can take (in the handler's units, e.g. rows), and
   * taking stops at 0. Resolves with the number of messages still waiting in the queue (0 when it
   * is empty, -1 when unknown).
   */
  take(room: () => number, waitMs: number, expect?: number): Promise<number>;
  /** True once the server is stopping: drivers stop calling take(). */
  readonly closed: boolean;
}

export interface ServeOptions extends SubjectOptions {
  /** Queue group shared by the replicas for control calls (default "ditpipe.<service>.<scope>"). */
  queue?: string;
  /** Largest reply to send, bytes incl. headers; capped by the bus limit. Larger replies become PayloadTooLargeError. */
  maxPayload?: number;
  /** Called with errors that cannot be answered to a caller (reply publish failed, handler threw after deadline). */
  onError?: (err: unknown, method: string) => void;
  /**
   * Who takes work for each work method: receives the method's WorkSource and calls take() when
   * it can start a pass (shared/batching.ts `Batcher.attach`). Methods without a driver are
   * pulled by a simple loop that keeps `concurrency` calls in flight.
   */
  drivers?: Record<string, (source: WorkSource) => void>;
  /** Calls in flight per work method without a driver (default 1). */
  concurrency?: number;
  /**
   * This replica's identifier: answers carry it (WorkResult.instance) and callers address direct
   * calls to it (CallOptions.target). Services pass their Info's instance_id, so what a replica
   * reports is what reaches it. Default: a random one. Letters, digits, "-" and "_" only.
   */
  instance?: string;
  /** Work queue settings (default: shared/transport/work.ts DEFAULT_QUEUE_SETTINGS). */
  queueSettings?: Partial<QueueSettings>;
  /**
   * The replica counts as stuck (`live` false) while a call it holds has run this many
   * milliseconds past its attempt time: a model that hangs, not a slow one (default 1 000).
   */
  stuckGraceMs?: number;
  /** Called for events a metric counts (work taken again after a redelivery, work dropped unstarted). */
  onWorkEvent?: (event: WorkEvent) => void;
}

export type WorkEvent =
  { kind: 'redelivered'; method: string; calls: number } | { kind: 'dropped'; method: string; reason: DropReason; calls: number };

/** Why a replica gave back work it had taken without computing it. */
export const DROP_REASONS = ['cancelled', 'deadline', 'stopping'] as const;
export type DropReason = (typeof DROP_REASONS)[number];

export interface ClientOptions extends SubjectOptions {
  /** Default overall timeout per call in milliseconds (default 30 000). */
  timeoutMs?: number;
  /** Default per-attempt timeout (default: the whole timeout); see CallOptions.attemptTimeoutMs. */
  attemptTimeoutMs?: number;
  /** Default retries of control calls (default 2). */
  retries?: number;
  /** Largest request to send, bytes incl. headers; capped by the bus limit (default: the bus limit). */
  maxPayload?: number;
  /** First retry backoff of control calls in milliseconds; doubles per retry with full jitter (default 25, max 1 000). */
  backoffMs?: number;
  /** Work queue settings (default: shared/transport/work.ts DEFAULT_QUEUE_SETTINGS). */
  queueSettings?: Partial<QueueSettings>;
  /** Called for events a metric counts (answers discarded, work re-sent after a reconnect, direct calls and their fallbacks). */
  onWorkEvent?: (event: ClientWorkEvent) => void;
}

/** Why a caller dropped an answer: already answered (a redelivered copy) or no longer awaited. */
export const DISCARD_REASONS = ['duplicate', 'late'] as const;
export type DiscardReason = (typeof DISCARD_REASONS)[number];

/**
 * Why a direct call (CallOptions.target) went to the queue after all: its replica said nothing of
 * it for an ack wait (silent), gave it back (given-back), or it could not be sent or may have been
 * lost with the connection (unsent).
 */
export const FALLBACK_REASONS = ['silent', 'given-back', 'unsent'] as const;
export type FallbackReason = (typeof FALLBACK_REASONS)[number];

export type ClientWorkEvent =
  | { kind: 'discarded'; method: string; reason: DiscardReason }
  | { kind: 'resent'; method: string; messages: number }
  /** Calls sent directly to their target replica (one event per message). */
  | { kind: 'direct'; method: string; calls: number }
  /** A direct call sent through the queue instead (one event per call). */
  | { kind: 'fallback'; method: string; reason: FallbackReason };

/** A service mounted on a transport. */
export interface RpcServer {
  /** Subjects served by request/reply: the queue-group subjects first, then the `.all` subjects. */
  readonly subjects: readonly string[];
  /** Work queues this server takes work from, by method key. */
  readonly queues: Readonly<Record<string, WorkQueue>>;
  /** Random id of this replica (answers carry it). */
  readonly instance: string;
  /** Not stopping, and no call it holds is stuck past its attempt time (see ServeOptions.stuckGraceMs). */
  readonly live: boolean;
  /** Calls being handled right now (control calls, and work taken and not yet answered). */
  readonly inFlight: number;
  /**
   * Stops taking calls (unsubscribes, no more pulls), then waits up to graceMs (default 10 000)
   * for calls in flight; work still unanswered then goes back to the queue for another replica,
   * and control calls are answered UNAVAILABLE. Idempotent.
   */
  stop(graceMs?: number): Promise<void>;
}

/** How a transport's connection ended on close(). */
export interface CloseResult {
  readonly drained: boolean;
  /** Why it was not drained (e.g. the NATS server was unreachable). */
  readonly reason?: string;
}

/** Carries RPCs: one per process (NATS connection) or per in-process bus member. */
export interface Transport {
  readonly kind: 'nats' | 'inproc';
  /** Whether the connection is up right now (false while NATS reconnects). */
  readonly connected: boolean;
  serve<D extends ServiceDefinition>(definition: D, impl: ServiceImpl<D>, opts: ServeOptions): Promise<RpcServer>;
  client<D extends ServiceDefinition>(definition: D, opts: ClientOptions): RpcClient<D>;
  /**
   * Ordered shutdown: stops every server mounted here (each waits up to graceMs for its calls in
   * flight), then drains and closes the connection. Idempotent. Resolves with whether the
   * connection was drained: one whose server is unreachable is closed without draining (nothing
   * more can be delivered on it), and `reason` says why.
   */
  close(opts?: { graceMs?: number }): Promise<CloseResult>;
  /** Resolves when closed: null after close(), the error when the connection failed for good. */
  readonly closed: Promise<Error | null>;
}
