// NATS binding: proto services over NATS request/reply (@nats-io/transport-node 3.x).
//
//   const nc = await connectNats({ servers: 'nats://127.0.0.1:4222', name: 'denoiser-0' });
//   const transport = natsTransport(nc);              // a Transport (shared/transport/types.ts)
//   await transport.serve(DenoiserDefinition, impl, { scope: 'dit-s2' });
//   const denoiser = transport.client(DenoiserDefinition, { scope: 'dit-s2', timeoutMs: 10_000 });
//   ...
//   await transport.close();                          // stop servers (finish calls in flight), drain
//
// `serveOnNats()` / `natsClient()` do the same on a connection without the Transport wrapper.
// Subjects, queue groups, headers, retries and limits are described in shared/transport/types.ts
// and shared/transport/rpc.ts. NATS specifics: "no responders" (status 503) → UnavailableError,
// request timeout → DeadlineExceededError, closed/draining connection → UnavailableError; the
// payload limit is min(configured maxPayload, the server's max_payload from the INFO it sent).
import { readFile } from 'node:fs/promises';

import {
  ClosedConnectionError,
  connect,
  credsAuthenticator,
  DrainingConnectionError,
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
  DeadlineExceededError,
  InvalidArgumentError,
  type DitpipeError,
  UnavailableError,
  toDitpipeError,
} from '../errors.ts';
import { diagnoseConnectError } from './nats-diagnose.ts';
import { type Bus, type BusMessage, type BusSubscription, BusTransport, clientOnBus, type Headers, serveOnBus } from './rpc.ts';
import type { ClientOptions, RpcClient, RpcServer, ServeOptions, ServiceDefinition, ServiceImpl, Transport } from './types.ts';

/** The NATS default max_payload, used until the server's INFO says otherwise. */
const NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024;

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
  /** Path of a NATS credentials file (JWT + nkey seed), as made by `nsc`. */
  credsFile?: string;
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
  const servers = (Array.isArray(opts.servers) ? opts.servers : opts.servers.split(','))
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  if (servers.length === 0) throw new InvalidArgumentError('nats servers: at least one server URL is required', { field: 'servers' });
  if ((opts.user === undefined) !== (opts.password === undefined)) {
    throw new InvalidArgumentError('nats user and password must be given together', {
      field: opts.user === undefined ? 'user' : 'password',
    });
  }
  const methods = [opts.user !== undefined, opts.token !== undefined, opts.credsFile !== undefined].filter(Boolean).length;
  if (methods > 1) {
    throw new InvalidArgumentError('nats authentication: give only one of user/password, token or credsFile', {
      field: 'credsFile',
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
      return await connect({ ...options, timeout: waitMs > 0 ? Math.max(250, Math.min(perAttempt, deadline - Date.now())) : perAttempt });
    } catch (err) {
      const fatal = await diagnoseConnectError(err, ctx);
      if (fatal) throw fatal;
      const pause = Math.min(250 * attempt, 2_000);
      if (Date.now() + pause >= deadline) {
        const reason = (err as Error).message || String(err);
        const tried = waitMs > 0 ? ` within ${Math.round(waitMs / 1000)} s (${attempt} attempts)` : '';
        throw new UnavailableError(`cannot connect to NATS at ${where}${tried}: ${reason}; is a nats-server running there and reachable from here?`, { cause: err });
      }
      await new Promise((r) => setTimeout(r, pause));
    }
  }
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

function mapRequestError(err: unknown, subject: string, timeoutMs: number): DitpipeError {
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

/** The Bus primitives on a NATS connection. */
export class NatsBus implements Bus {
  constructor(readonly nc: NatsConnection) {}

  maxPayload(): number {
    return this.nc.info?.max_payload ?? NATS_DEFAULT_MAX_PAYLOAD;
  }

  async request(subject: string, msg: BusMessage, timeoutMs: number): Promise<BusMessage> {
    try {
      const reply = await this.nc.request(subject, msg.data, {
        timeout: Math.max(1, Math.ceil(timeoutMs)),
        headers: toNatsHeaders(msg.headers),
      });
      return fromNatsMsg(reply);
    } catch (err) {
      throw mapRequestError(err, subject, timeoutMs);
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
      const mapped = mapRequestError(err, subject, waitMs);
      // Nobody listening is an empty answer for a scatter-gather, not a failure.
      if (!(mapped instanceof UnavailableError && /no responders/.test(mapped.message))) throw mapped;
    }
    return out;
  }

  async subscribe(
    subject: string,
    queue: string | undefined,
    handler: (msg: BusMessage, reply: (msg: BusMessage) => void) => void,
  ): Promise<BusSubscription> {
    const sub = this.nc.subscribe(subject, {
      queue,
      callback: (err, m) => {
        if (err) return; // subscription-level errors (permissions) surface via the connection's status
        handler(fromNatsMsg(m), (r) => {
          m.respond(r.data, { headers: toNatsHeaders(r.headers) });
        });
      },
    });
    // The server must know the interest before a client can be served.
    await this.nc.flush();
    return {
      drain: async () => {
        if (this.nc.isClosed() || sub.isClosed()) return;
        await sub.drain();
      },
    };
  }
}

/** Serves the unary methods of a ts-proto generic definition on a NATS connection. */
export function serveOnNats<D extends ServiceDefinition>(
  nc: NatsConnection,
  definition: D,
  impl: ServiceImpl<D>,
  opts: ServeOptions,
): Promise<RpcServer> {
  return serveOnBus(new NatsBus(nc), definition, impl, opts);
}

/** Typed promise client for a ts-proto generic definition over a NATS connection. */
export function natsClient<D extends ServiceDefinition>(nc: NatsConnection, definition: D, opts: ClientOptions): RpcClient<D> {
  return clientOnBus(new NatsBus(nc), definition, opts);
}

/**
 * A Transport on a NATS connection. close() stops the servers mounted through it (each waits
 * for its calls in flight), then drains the connection (which also closes it).
 */
export function natsTransport(nc: NatsConnection): Transport {
  const closed = nc.closed().then((err) => err ?? null);
  return new BusTransport(
    'nats',
    new NatsBus(nc),
    async () => {
      if (nc.isClosed()) return;
      if (!nc.isDraining()) await nc.drain();
      await nc.closed();
    },
    closed,
  );
}
