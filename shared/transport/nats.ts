// NATS binding: proto services over NATS (@nats-io/transport-node 3.x) — control calls by
// request/reply, work through JetStream work-queue streams (@nats-io/jetstream for creating
// streams and consumers; the pull and ack protocol is written here, see NatsPuller).
//
//   const nc = await connectNats({ servers: 'nats://127.0.0.1:4222', name: 'denoiser-0' });
//   const transport = natsTransport(nc);              // a Transport (shared/transport/types.ts)
//   await transport.serve(DenoiserDefinition, impl, { scope: 'dit-s2', drivers: { denoise: ... } });
//   const denoiser = transport.client(DenoiserDefinition, { scope: 'dit-s2', timeoutMs: 10_000 });
//   ...
//   await transport.close();                          // stop servers (finish calls in flight), drain
//
// Subjects, queue groups, headers, retries and limits are described in shared/transport/types.ts,
// rpc.ts and work.ts. NATS specifics: "no responders" (status 503) → UnavailableError (NoQueueError
// for a subject no stream captures), request timeout → DeadlineExceededError, closed/draining
// connection → UnavailableError; the payload limit is min(configured maxPayload, the server's
// max_payload from the INFO it sent). The server must run JetStream (`nats-server -js`, or a
// `jetstream {}` block): work queues live in its memory store.
//
// Security: connectNats authenticates with user/password, a token, an nkey seed file or a creds
// file (operator/JWT mode), over TLS or mutual TLS. Given `service`, the connection takes that
// service's inbox prefix (its replies come only there) and its least-privilege permissions apply
// (nats-permissions.ts): a replica then waits for the scheduler to create its work queue instead
// of creating it, and a refused publish of work fails its calls with PERMISSION_DENIED naming the
// credential.
//
// Why not the library's consumer.fetch(): it opens a subscription per fetch, enforces expires of at
// least 1 s and cannot end a fetch early, so a replica would hold work it did not ask for. A pull
// here is one request to $JS.API.CONSUMER.MSG.NEXT on a long-lived inbox: batch 1 with a short
// expiry while idle, no_wait batches while the queue has work.
import { readFile } from 'node:fs/promises';

import {
  ClosedConnectionError,
  connect,
  createInbox,
  credsAuthenticator,
  DrainingConnectionError,
  nkeyAuthenticator,
  PermissionViolationError,
  headers as natsHeaders,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type NodeConnectionOptions,
  NoRespondersError,
  RequestError,
  TimeoutError,
} from '@nats-io/transport-node';
import {
  AckPolicy,
  type ConsumerConfig,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiError,
  type JetStreamManager,
  jetstreamManager,
  ReplayPolicy,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from '@nats-io/jetstream';

import {
  DeadlineExceededError,
  FailedPreconditionError,
  InvalidArgumentError,
  type DitpipeError,
  NoQueueError,
  ResourceExhaustedError,
  UnavailableError,
  toDitpipeError,
} from '../errors.ts';
import { type Logger, silentLogger } from '../log.ts';
import type { Bus, BusMessage, BusSubscription, ConnectionEvent, Headers, PullEnd, Puller, QueuedMessage, QueueSpec } from './bus.ts';
import { diagnoseConnectError } from './nats-diagnose.ts';
import { inboxPrefixOf, type NatsService, permissionDenied } from './nats-permissions.ts';
import { BusTransport } from './rpc.ts';
import type { CloseResult, Transport } from './types.ts';

/** The NATS default max_payload, used until the server's INFO says otherwise. */
const NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024;
/** How long a stored-message acknowledgement may take before the message counts as not stored. */
const PUBACK_TIMEOUT_MS = 5_000;
/** A long pull the server does not end within its expiry plus this is taken as lost (e.g. the server restarted). */
const PULL_GUARD_MS = 2_000;
/**
 * A short pull (a wait for the next pass's company) ends on our side this long after its expiry
 * even without the server's 408: nats-server 2.9 sent none for about a third of the 2 ms pulls
 * that lapsed in a lone-request run. Ending early is harmless (a late delivery is still handled).
 */
const SHORT_PULL_MS = 500;
const SHORT_PULL_GRACE_MS = 2;
const ACK = new TextEncoder().encode('+ACK');
const WORKING = new TextEncoder().encode('+WPI');
const NAK = new TextEncoder().encode('-NAK');
const nanos = (ms: number): number => Math.round(ms * 1e6);

export interface NatsConnectOptions {
  /** One or more server URLs, e.g. "nats://10.0.0.1:4222" (comma-separated string allowed). */
  servers: string | string[];
  /** Connection name shown by the server's monitoring (e.g. "ditpipe-denoiser-0"). */
  name?: string;
  /** User and password authentication (both required together). */
  user?: string;
  password?: string;
  /** Token authentication. */
  token?: string;
  /** Path of a NATS credentials file (JWT + nkey seed), as made by `nsc` (operator/JWT mode). */
  credsFile?: string;
  /** Path of a file holding an nkey seed (`SU...`), for a server that lists the user's public nkey. */
  nkeyFile?: string;
  /**
   * The ditpipe service this connection is (shared/transport/nats-permissions.ts): its replies come
   * on that service's inbox prefix (which its permissions confine it to), permission errors name
   * it, and a replica waits for the scheduler to create its work queue instead of creating it.
   */
  service?: NatsService;
  /** TLS: CA to verify the server with; client certificate and key for mutual TLS. */
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
  /** Reconnect attempts after a lost connection; -1 = forever (default -1). */
  maxReconnectAttempts?: number;
  /** Wait between reconnect attempts in milliseconds (default 2 000). */
  reconnectTimeWaitMs?: number;
  /** Timeout of one connection attempt in milliseconds (default 5 000). */
  connectTimeoutMs?: number;
  /**
   * Keep retrying the initial connection while the server is not reachable (refused, timed out)
   * instead of failing at once (default false), for at most firstConnectTimeoutMs. Credential and
   * TLS mismatches fail at once either way: waiting does not fix them.
   */
  waitOnFirstConnect?: boolean;
  /** How long waitOnFirstConnect keeps trying, in milliseconds (default 30 000). */
  firstConnectTimeoutMs?: number;
}

/**
 * Connects to NATS. Options are checked first (errors name the field); a failed connection
 * rejects with UnauthenticatedError (credentials refused), FailedPreconditionError (a TLS
 * mismatch, explained) or UnavailableError (nothing reachable in time), each naming the URL.
 */
export async function connectNats(opts: NatsConnectOptions): Promise<NatsConnection> {
  const servers = (Array.isArray(opts.servers) ? opts.servers : opts.servers.split(',')).map((s) => s.trim()).filter((s) => s.length > 0);
  if (servers.length === 0) throw new InvalidArgumentError('nats servers: at least one server URL is required', { field: 'servers' });
  if ((opts.user === undefined) !== (opts.password === undefined)) {
    throw new InvalidArgumentError('nats user and password must be given together', {
      field: opts.user === undefined ? 'user' : 'password',
    });
  }
  const methods = [opts.user !== undefined, opts.token !== undefined, opts.credsFile !== undefined, opts.nkeyFile !== undefined].filter(
    Boolean,
  ).length;
  if (methods > 1) {
    throw new InvalidArgumentError('nats authentication: give only one of user/password, token, credsFile or nkeyFile', {
      field: opts.nkeyFile !== undefined ? 'nkeyFile' : 'credsFile',
    });
  }
  const options: NodeConnectionOptions = {
    servers,
    name: opts.name,
    maxReconnectAttempts: opts.maxReconnectAttempts ?? -1,
    reconnectTimeWait: opts.reconnectTimeWaitMs ?? 2_000,
    timeout: opts.connectTimeoutMs ?? 5_000,
    // Retried here instead (nats.js would retry forever, even when TLS or credentials can never work).
    waitOnFirstConnect: false,
    // Without this nats.js builds two Error objects (with stack traces) per request: a quarter of
    // the scheduler's CPU per step in the capacity benchmark.
    noAsyncTraces: true,
  };
  if (opts.user !== undefined) {
    options.user = opts.user;
    options.pass = opts.password;
  }
  if (opts.token !== undefined) options.token = opts.token;
  if (opts.credsFile !== undefined) {
    let creds: Uint8Array;
    try {
      creds = await readFile(opts.credsFile);
    } catch (err) {
      throw new InvalidArgumentError(`nats credsFile ${opts.credsFile}: ${(err as Error).message}`, {
        field: 'credsFile',
        cause: err,
      });
    }
    options.authenticator = credsAuthenticator(creds);
  }
  if (opts.nkeyFile !== undefined) options.authenticator = nkeyAuthenticator(await readSeedFile(opts.nkeyFile));
  if (opts.service !== undefined) options.inboxPrefix = inboxPrefixOf(opts.service);
  if (opts.tls) {
    options.tls = { caFile: opts.tls.caFile, certFile: opts.tls.certFile, keyFile: opts.tls.keyFile };
  }
  const where = servers.join(', ');
  const ctx = { where, first: servers[0], tls: opts.tls };
  const waitMs = opts.waitOnFirstConnect ? (opts.firstConnectTimeoutMs ?? 30_000) : 0;
  const deadline = Date.now() + waitMs;
  for (let attempt = 1; ; attempt++) {
    try {
      const perAttempt = options.timeout ?? 5_000;
      const nc = await connect({
        ...options,
        timeout: waitMs > 0 ? Math.max(250, Math.min(perAttempt, deadline - Date.now())) : perAttempt,
      });
      if (opts.service !== undefined) services.set(nc, opts.service);
      return nc;
    } catch (err) {
      const fatal = await diagnoseConnectError(err, ctx);
      if (fatal) throw fatal;
      const pause = Math.min(250 * attempt, 2_000);
      if (Date.now() + pause >= deadline) {
        const reason = (err as Error).message || String(err);
        const tried = waitMs > 0 ? ` within ${Math.round(waitMs / 1000)} s (${attempt} attempts)` : '';
        throw new UnavailableError(
          `cannot connect to NATS at ${where}${tried}: ${reason}; is a nats-server running there and reachable from here?`,
          { cause: err },
        );
      }
      await new Promise((r) => setTimeout(r, pause));
    }
  }
}

/** The service each connection made with `service` is (natsTransport reads it). */
const services = new WeakMap<NatsConnection, NatsService>();

/** An nkey seed from a file: one line `SU…` (a user seed), surrounding whitespace ignored. */
async function readSeedFile(file: string): Promise<Uint8Array> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new InvalidArgumentError(`nats nkeyFile ${file}: ${(err as Error).message}`, { field: 'nkeyFile', cause: err });
  }
  const seed = text.trim();
  if (!/^SU[A-Z2-7]{56}$/.test(seed)) {
    throw new InvalidArgumentError(
      `nats nkeyFile ${file} does not hold a user nkey seed (one line starting with SU, 58 characters; make one with \`ditpipe nats-config --nkeys <dir>\` or \`nk -gen user\`)`,
      {
        field: 'nkeyFile',
      },
    );
  }
  return new TextEncoder().encode(seed);
}

function toNatsHeaders(h: Headers): MsgHdrs | undefined {
  const keys = Object.keys(h);
  if (keys.length === 0) return undefined;
  const out = natsHeaders();
  for (const k of keys) out.set(k, h[k]);
  return out;
}

function fromNatsMsg(m: Msg): BusMessage {
  const headers: Headers = {};
  if (m.headers) {
    for (const k of m.headers.keys()) headers[k] = m.headers.get(k);
  }
  return { data: m.data, headers };
}

function mapRequestError(err: unknown, subject: string, timeoutMs: number, service?: NatsService): DitpipeError {
  const cause = (err as Error | undefined)?.cause;
  if (err instanceof PermissionViolationError) return permissionDenied(err, service);
  if (cause instanceof PermissionViolationError) return permissionDenied(cause, service);
  if (err instanceof NoRespondersError || (err instanceof RequestError && err.isNoResponders())) {
    return new UnavailableError(`no responders on ${subject}`, { cause: err });
  }
  if (err instanceof TimeoutError) {
    return new DeadlineExceededError(`no reply on ${subject} within ${Math.round(timeoutMs)} ms`, { cause: err });
  }
  if (err instanceof ClosedConnectionError || err instanceof DrainingConnectionError || err instanceof RequestError) {
    return new UnavailableError(`NATS request on ${subject} failed: ${err.message}`, { cause: err });
  }
  return toDitpipeError(err);
}

/** Delivery count and pending count from a JetStream ack subject ($JS.ACK.…, v1 or v2 layout). */
function ackInfo(reply: string): { deliveries: number; pending: number } {
  const t = reply.split('.');
  // v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
  // v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>.<token>
  const base = t.length === 9 ? 2 : 4;
  return { deliveries: Number(t[base + 2]) || 1, pending: Number(t[base + 6]) || 0 };
}

function streamConfig(spec: QueueSpec): Partial<StreamConfig> & { name: string } {
  const s = spec.settings;
  return {
    name: spec.stream,
    subjects: [spec.subject],
    retention: RetentionPolicy.Workqueue,
    storage: StorageType.Memory,
    discard: DiscardPolicy.New,
    max_msgs: s.maxMessages,
    max_bytes: s.maxBytes,
    max_age: nanos(s.maxAgeMs),
    duplicate_window: nanos(s.duplicateWindowMs),
    num_replicas: 1,
  };
}

function consumerConfig(spec: QueueSpec): Partial<ConsumerConfig> {
  const s = spec.settings;
  return {
    durable_name: spec.consumer,
    ack_policy: AckPolicy.Explicit,
    ack_wait: nanos(s.ackWaitMs),
    max_deliver: s.maxDeliver,
    max_ack_pending: s.maxAckPending,
    deliver_policy: DeliverPolicy.All,
    replay_policy: ReplayPolicy.Instant,
  };
}

/** Whether an existing stream differs from what we manage. */
function streamDiffers(have: StreamConfig, want: Partial<StreamConfig>): boolean {
  return (
    have.max_msgs !== want.max_msgs ||
    have.max_bytes !== want.max_bytes ||
    have.max_age !== want.max_age ||
    have.duplicate_window !== want.duplicate_window ||
    have.discard !== want.discard ||
    have.subjects?.length !== 1 ||
    have.subjects[0] !== want.subjects?.[0]
  );
}

interface PubAckWait {
  resolve: () => void;
  reject: (err: DitpipeError) => void;
  at: number;
  subject: string;
}

/** The Bus primitives on a NATS connection. */
export class NatsBus implements Bus {
  private jsm: Promise<JetStreamManager> | undefined;
  private readonly ensured = new Map<string, Promise<void>>();
  private readonly listeners = new Set<(event: ConnectionEvent) => void>();
  private up = true;
  private ackInbox: string | undefined;
  private readonly acks = new Map<string, PubAckWait>();
  private ackSeq = 0;
  private sweeper: NodeJS.Timeout | undefined;

  private readonly inboxPrefix: string | undefined;
  /** The service this connection is, when known: a replica waits for its queue instead of creating it. */
  readonly service: NatsService | undefined;
  /** Where errors this bus handles itself (and so never throws) are told; silent by default. */
  private readonly log: Logger;

  constructor(
    readonly nc: NatsConnection,
    opts: { inboxPrefix?: string; service?: NatsService; log?: Logger } = {},
  ) {
    this.service = opts.service;
    this.log = opts.log ?? silentLogger();
    this.inboxPrefix = opts.inboxPrefix ?? (opts.service ? inboxPrefixOf(opts.service) : undefined);
    void (async () => {
      for await (const s of nc.status()) {
        if (s.type === 'error' && s.error instanceof PermissionViolationError) {
          this.onPermissionError(s.error);
        } else if (s.type === 'disconnect') {
          this.up = false;
          this.emit('disconnected');
        } else if (s.type === 'reconnect') {
          this.up = true;
          // A restarted server may have lost the (memory-stored) queues: check them again.
          this.ensured.clear();
          this.jsm = undefined;
          this.emit('reconnected');
        }
      }
    })().catch((err: unknown) => this.log.warn({ err: String(err) }, 'the NATS status stream ended: connection events are no longer seen'));
    void nc.closed().then(() => {
      this.up = false;
      clearInterval(this.sweeper);
      for (const w of this.acks.values()) w.reject(new UnavailableError(`NATS connection closed before ${w.subject} confirmed a message`));
      this.acks.clear();
      this.emit('closed');
    });
  }

  /** A refused publish of work fails its calls at once, saying which credential lacks what. */
  private onPermissionError(err: PermissionViolationError): void {
    if (err.operation !== 'publish') return;
    for (const [token, w] of this.acks) {
      if (w.subject !== err.subject) continue;
      this.acks.delete(token);
      w.reject(permissionDenied(err, this.service));
    }
  }

  private emit(event: ConnectionEvent): void {
    for (const l of [...this.listeners]) {
      try {
        l(event);
      } catch (err) {
        // A listener's failure is its own: the others still hear of the event.
        this.log.error({ err: String(err), event }, `a NATS connection listener threw on '${event}'`);
      }
    }
  }

  get connected(): boolean {
    return this.up && !this.nc.isClosed();
  }

  maxPayload(): number {
    return this.nc.info?.max_payload ?? NATS_DEFAULT_MAX_PAYLOAD;
  }

  inbox(): string {
    return createInbox(this.inboxPrefix);
  }

  onConnection(listener: (event: ConnectionEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async request(subject: string, msg: BusMessage, timeoutMs: number): Promise<BusMessage> {
    try {
      const reply = await this.nc.request(subject, msg.data, {
        timeout: Math.max(1, Math.ceil(timeoutMs)),
        headers: toNatsHeaders(msg.headers),
      });
      return fromNatsMsg(reply);
    } catch (err) {
      throw mapRequestError(err, subject, timeoutMs, this.service);
    }
  }

  async requestMany(subject: string, msg: BusMessage, waitMs: number): Promise<BusMessage[]> {
    const out: BusMessage[] = [];
    try {
      const replies = await this.nc.requestMany(subject, msg.data, {
        strategy: 'timer',
        maxWait: Math.max(1, Math.ceil(waitMs)),
        headers: toNatsHeaders(msg.headers),
      });
      for await (const m of replies) out.push(fromNatsMsg(m));
    } catch (err) {
      const mapped = mapRequestError(err, subject, waitMs, this.service);
      // Nobody listening is an empty answer for a scatter-gather, not a failure.
      if (!(mapped instanceof UnavailableError && /no responders/.test(mapped.message))) throw mapped;
    }
    return out;
  }

  publish(subject: string, msg: BusMessage): void {
    try {
      this.nc.publish(subject, msg.data, { headers: toNatsHeaders(msg.headers) });
    } catch (err) {
      throw mapRequestError(err, subject, 0, this.service);
    }
  }

  async subscribe(
    subject: string,
    queue: string | undefined,
    handler: (msg: BusMessage, reply: (msg: BusMessage) => void) => void,
  ): Promise<BusSubscription> {
    let denied: Error | undefined;
    const sub = this.nc.subscribe(subject, {
      queue,
      callback: (err, m) => {
        if (err) {
          denied ??= err; // a refused subscription (permissions); also reported on the connection's status
          return;
        }
        handler(fromNatsMsg(m), (r) => {
          m.respond(r.data, { headers: toNatsHeaders(r.headers) });
        });
      },
    });
    // The server must know the interest before a client can be served. While the connection is
    // down the subscription takes effect when it comes back. The server refuses a subscription
    // before it answers the flush, so a refused one fails here.
    await this.flushed(subject);
    if (denied instanceof PermissionViolationError) throw permissionDenied(denied, this.service);
    return {
      drain: async () => {
        if (this.nc.isClosed() || sub.isClosed()) return;
        await sub.drain();
      },
    };
  }

  private manager(): Promise<JetStreamManager> {
    this.jsm ??= jetstreamManager(this.nc).catch((err: unknown) => {
      this.jsm = undefined;
      const e = err as Error;
      if (/not enabled|no responders/i.test(e.message)) {
        throw new FailedPreconditionError(
          `the NATS server at ${this.nc.getServer()} has no JetStream, which ditpipe's work queues need: start nats-server with -js (or a jetstream {} block in its config)`,
          { cause: err },
        );
      }
      throw mapRequestError(err, '$JS.API.INFO', 0, this.service);
    });
    return this.jsm;
  }

  ensureQueue(spec: QueueSpec): Promise<void> {
    let p = this.ensured.get(spec.stream);
    if (!p) {
      p = this.createQueue(spec).catch((err: unknown) => {
        this.ensured.delete(spec.stream);
        throw err;
      });
      this.ensured.set(spec.stream, p);
    }
    return p;
  }

  private async createQueue(spec: QueueSpec): Promise<void> {
    if (this.service === 'denoiser' || this.service === 'decoder') {
      // Replicas may not create or change streams (nats-permissions.ts): the scheduler creates
      // the queue when it first sends work; until then the replica finds none and waits.
      await this.queueInfo(spec);
      return;
    }
    const jsm = await this.manager();
    const want = streamConfig(spec);
    const explain = (err: unknown): DitpipeError => {
      const e = err as Error;
      if (err instanceof JetStreamApiError && /insufficient (memory|storage) resources/i.test(e.message)) {
        return new FailedPreconditionError(
          `the NATS server cannot hold work queue ${spec.stream} (max_bytes ${spec.settings.maxBytes}): ${e.message}; raise its jetstream max_memory_store or lower DITPIPE_QUEUE_MAX_BYTES`,
          { cause: err },
        );
      }
      if (err instanceof JetStreamApiError) return new FailedPreconditionError(`work queue ${spec.stream}: ${e.message}`, { cause: err });
      return mapRequestError(err, `$JS.API (${spec.stream})`, 0, this.service);
    };
    try {
      let info;
      try {
        info = await jsm.streams.info(spec.stream);
      } catch (err) {
        if (!(err instanceof JetStreamApiError && err.status === 404)) throw err;
      }
      if (!info) {
        try {
          await jsm.streams.add(want);
        } catch (err) {
          // Another service created it at the same time, with other settings: ours win below.
          if (!(err instanceof JetStreamApiError && /already in use/.test(err.message))) throw err;
          info = await jsm.streams.info(spec.stream);
        }
      }
      if (info && streamDiffers(info.config, want)) await jsm.streams.update(spec.stream, want);
      await jsm.consumers.add(spec.stream, consumerConfig(spec));
    } catch (err) {
      throw explain(err);
    }
  }

  enqueue(spec: QueueSpec, msg: BusMessage, id: string): Promise<void> {
    if (!this.connected) return Promise.reject(new UnavailableError(`not connected to NATS; ${spec.subject} not sent`));
    if (this.ackInbox === undefined) {
      const inbox = this.inbox();
      this.nc.subscribe(`${inbox}.*`, { callback: (err, m) => this.onPubAck(err, m) });
      this.ackInbox = inbox;
      this.sweeper = setInterval(() => this.sweepAcks(), 1_000);
      this.sweeper.unref();
    }
    const token = String(++this.ackSeq);
    const headers = toNatsHeaders({ ...msg.headers, 'Nats-Msg-Id': id });
    return new Promise<void>((resolve, reject) => {
      this.acks.set(token, { resolve, reject, at: Date.now(), subject: spec.subject });
      try {
        this.nc.publish(spec.subject, msg.data, { reply: `${this.ackInbox}.${token}`, headers });
      } catch (err) {
        this.acks.delete(token);
        reject(mapRequestError(err, spec.subject, 0, this.service));
      }
    });
  }

  private onPubAck(err: Error | null, m: Msg): void {
    if (err) return;
    const token = m.subject.slice(m.subject.lastIndexOf('.') + 1);
    const w = this.acks.get(token);
    if (!w) return;
    this.acks.delete(token);
    if (m.headers?.code === 503) {
      for (const [stream] of this.ensured) if (w.subject.length > 0) this.ensured.delete(stream);
      w.reject(new NoQueueError(`no work queue captures ${w.subject} on the NATS server (not created yet, or lost in a server restart)`));
      return;
    }
    let body: { error?: { code?: number; description?: string } };
    try {
      body = JSON.parse(new TextDecoder().decode(m.data)) as typeof body;
    } catch {
      w.reject(new UnavailableError(`unreadable acknowledgement from the NATS server for ${w.subject}`));
      return;
    }
    if (body.error) {
      const what = body.error.description ?? 'unknown error';
      w.reject(
        /maximum (messages|bytes)|exceeded/i.test(what)
          ? new ResourceExhaustedError(`work queue for ${w.subject} is full (${what}); retry later`)
          : new UnavailableError(`NATS server refused a message on ${w.subject}: ${what}`),
      );
      return;
    }
    w.resolve();
  }

  private sweepAcks(): void {
    const old = Date.now() - PUBACK_TIMEOUT_MS;
    for (const [token, w] of this.acks) {
      if (w.at > old) continue;
      this.acks.delete(token);
      w.reject(new UnavailableError(`the NATS server did not confirm a message on ${w.subject} within ${PUBACK_TIMEOUT_MS} ms`));
    }
  }

  async puller(spec: QueueSpec, onMessage: (msg: QueuedMessage) => void): Promise<Puller> {
    const p = new NatsPuller(this.nc, spec, this.inbox(), onMessage, this.log);
    await this.flushed(spec.subject);
    return p;
  }

  private async flushed(subject: string): Promise<void> {
    try {
      await this.nc.flush();
    } catch (err) {
      if (this.nc.isClosed()) throw new UnavailableError(`cannot subscribe to ${subject}: the NATS connection is closed`, { cause: err });
    }
  }

  async queueInfo(spec: QueueSpec): Promise<{ pending: number; ackPending: number; waitingPulls: number }> {
    const jsm = await this.manager();
    try {
      const info = await jsm.consumers.info(spec.stream, spec.consumer);
      return { pending: info.num_pending, ackPending: info.num_ack_pending, waitingPulls: info.num_waiting };
    } catch (err) {
      if (err instanceof JetStreamApiError && err.status === 404) {
        const who =
          this.service === 'denoiser' || this.service === 'decoder' ? ' yet (the scheduler creates it when it first sends work)' : '';
        throw new NoQueueError(`work queue ${spec.stream} does not exist on the NATS server${who}`, { cause: err });
      }
      throw mapRequestError(err, `$JS.API (${spec.stream})`, 0, this.service);
    }
  }
}

interface PullInProgress {
  readonly token: string;
  readonly batch: number;
  delivered: number;
  pending: number;
  readonly resolve: (end: PullEnd) => void;
  readonly guard: NodeJS.Timeout;
}

/**
 * One replica's pull consumer: pull requests to $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer> with
 * reply subjects `<inbox>.<n>`; the server delivers messages to that inbox (their subject is the
 * stream's) and ends a request with a status message on `<inbox>.<n>` (404 nothing queued for a
 * no_wait pull, 408 expired or no_wait partly filled, 409 limits or a deleted consumer).
 */
class NatsPuller implements Puller {
  private readonly sub;
  private seq = 0;
  private current: PullInProgress | null = null;
  private readonly next: string;

  constructor(
    private readonly nc: NatsConnection,
    spec: QueueSpec,
    private readonly inbox: string,
    private readonly onMessage: (msg: QueuedMessage) => void,
    private readonly log: Logger,
  ) {
    this.next = `$JS.API.CONSUMER.MSG.NEXT.${spec.stream}.${spec.consumer}`;
    this.sub = nc.subscribe(`${inbox}.*`, { callback: (err, m) => this.onMsg(err, m) });
  }

  pull(batch: number, waitMs: number): Promise<PullEnd> {
    if (this.current) return Promise.reject(new UnavailableError('a pull is already in progress'));
    const token = String(++this.seq);
    const body = waitMs > 0 ? { batch, expires: nanos(waitMs) } : { batch, no_wait: true };
    return new Promise<PullEnd>((resolve) => {
      const short = waitMs < SHORT_PULL_MS;
      const guard = setTimeout(() => this.end(token, !short), waitMs + (short ? SHORT_PULL_GRACE_MS : PULL_GUARD_MS));
      this.current = { token, batch, delivered: 0, pending: 0, resolve, guard };
      try {
        this.nc.publish(this.next, JSON.stringify(body), { reply: `${this.inbox}.${token}` });
      } catch (err) {
        // The connection is gone or closing: the pull ends at once and the replica asks again.
        this.log.debug({ err: String(err), subject: this.next }, 'a pull request could not be sent');
        this.end(token, true);
      }
    });
  }

  private end(token: string, lost: boolean): void {
    const c = this.current;
    if (!c || c.token !== token) return;
    this.current = null;
    clearTimeout(c.guard);
    c.resolve({ delivered: c.delivered, pending: lost ? 0 : c.pending, lost });
  }

  private onMsg(err: Error | null, m: Msg): void {
    if (err) {
      // The subscription failed (a permission refusal is also reported on the status stream).
      this.log.warn({ err: err.message, subject: this.next }, 'the pull inbox subscription failed');
      return;
    }
    if (m.reply?.startsWith('$JS.ACK.')) {
      const { deliveries, pending } = ackInfo(m.reply);
      const reply = m.reply;
      const nc = this.nc;
      const send = (body: Uint8Array): void => {
        try {
          nc.publish(reply, body);
        } catch (err) {
          // Connection gone: the server redelivers after the ack wait.
          this.log.debug({ err: String(err) }, 'an acknowledgement could not be sent; the server redelivers the message');
        }
      };
      const msg = fromNatsMsg(m);
      this.onMessage({
        data: msg.data,
        headers: msg.headers,
        deliveries,
        pending,
        ack: () => send(ACK),
        working: () => send(WORKING),
        nak: () => send(NAK),
      });
      const c = this.current;
      if (c) {
        c.delivered++;
        c.pending = pending;
        if (c.delivered >= c.batch) this.end(c.token, false);
      }
      return;
    }
    // A status message ends its pull request (100 is an idle heartbeat; we ask for none).
    const code = m.headers?.code ?? 0;
    if (code === 100) return;
    const token = m.subject.slice(m.subject.lastIndexOf('.') + 1);
    if (this.current?.token === token) {
      this.current.pending = 0;
      // 409 "Consumer Deleted" and 503 mean the queue is gone: have it checked.
      this.end(token, code === 503 || (code === 409 && /deleted/i.test(m.headers?.description ?? '')));
    }
  }

  async close(): Promise<void> {
    if (this.current) this.end(this.current.token, false);
    if (!this.nc.isClosed() && !this.sub.isClosed()) this.sub.unsubscribe();
  }
}

/**
 * A Transport on a NATS connection. close() stops the servers mounted through it (each waits
 * for its calls in flight), then drains the connection (which also closes it); a connection
 * whose server is down is closed without draining, so close() does not fail for want of NATS.
 * `service` (default: the one connectNats was given) and `inboxPrefix` (default: that service's)
 * say who this connection is (nats-permissions.ts).
 */
/** `log` hears of the errors the transport handles itself (silent by default). */
export function natsTransport(nc: NatsConnection, opts: { inboxPrefix?: string; service?: NatsService; log?: Logger } = {}): Transport {
  const closed = nc.closed().then((err) => err ?? null);
  const service = opts.service ?? services.get(nc);
  return new BusTransport(
    'nats',
    new NatsBus(nc, { inboxPrefix: opts.inboxPrefix, service, log: opts.log }),
    async (): Promise<CloseResult> => {
      if (nc.isClosed()) return { drained: true };
      let result: CloseResult = { drained: true };
      try {
        if (!nc.isDraining()) await nc.drain();
      } catch (err) {
        // The server went away before or while draining (its final flush is refused on a
        // disconnect): nothing more can be delivered on this connection, so it is simply closed.
        result = { drained: false, reason: `NATS unreachable: ${(err as Error).message}` };
        await nc.close();
      }
      await nc.closed();
      return result;
    },
    closed,
  );
}
