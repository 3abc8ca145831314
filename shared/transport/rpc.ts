// RPC over a message bus: serving, typed clients, deadlines, retries, payload limits and error
// encoding, shared by both transports (shared/transport/nats.ts, shared/transport/inproc.ts) so
// they behave the same by construction. Work methods (IDEMPOTENT) go through the work queues of
// work.ts; this file carries the control calls (every other unary method) by request/reply.
// A NO_SIDE_EFFECTS method (Info) is answered by every replica (no queue group) and a call takes
// the first answer, so a frozen replica, which a queue group would still pick, cannot stall it;
// collect() gathers all answers instead. Other control methods go to one replica (queue group).
//
// Wire format of one control call:
//   request  body = protobuf-encoded request message
//            header Ditpipe-Timeout-Ms = time the caller waits for this attempt (server aborts
//            ctx.signal when it passes)
//   reply    OK:    body = protobuf-encoded response, no headers
//            error: empty body, headers Ditpipe-Status (numeric gRPC code), Ditpipe-Message
//                   (percent-encoded like gRPC's grpc-message), Ditpipe-Error (error kind),
//                   Ditpipe-Field (the request field of an INVALID_ARGUMENT, when known)
// Size limits count body plus headers (as NATS's max_payload does) and are checked before sending.
import { randomUUID } from 'node:crypto';
import {
  CancelledError,
  DeadlineExceededError,
  type DitpipeError,
  errorField,
  errorFromStatus,
  InternalError,
  InvalidArgumentError,
  MAX_STATUS_MESSAGE,
  PayloadTooLargeError,
  toDitpipeError,
  truncate,
  UnavailableError,
  UnimplementedError,
} from '../errors.ts';
import {
  type Bus,
  type BusMessage,
  type BusSubscription,
  H_FIELD,
  H_KIND,
  H_MESSAGE,
  H_STATUS,
  H_TIMEOUT,
  type Headers,
  headerBytes,
} from './bus.ts';
import type {
  CallContext,
  CallOptions,
  CloseResult,
  ClientOptions,
  CollectOptions,
  MethodDefinition,
  RpcClient,
  RpcServer,
  ServeOptions,
  ServiceDefinition,
  ServiceImpl,
  SubjectOptions,
  Transport,
  WorkQueue,
} from './types.ts';
import { isWorkMethod, queueSettings, queueSpec, runSimpleDriver, WorkClient, WorkServer } from './work.ts';
import { settledWithin } from '../wait.ts';

export const DEFAULT_PREFIX = 'ditpipe.v1';
export const DEFAULT_TIMEOUT_MS = 30_000;
export const DEFAULT_RETRIES = 2;
export const DEFAULT_BACKOFF_MS = 25;
const MAX_BACKOFF_MS = 1_000;
const DEFAULT_GRACE_MS = 10_000;
const DEFAULT_COLLECT_MS = 250;
const DEFAULT_STUCK_GRACE_MS = 1_000;

const TOKEN_RE = /^[^\s.*>]+$/;

function checkToken(value: string, field: string): string {
  if (typeof value !== 'string' || !TOKEN_RE.test(value)) {
    throw new InvalidArgumentError(
      `${field} must be a non-empty subject token without '.', '*', '>' or whitespace, got ${JSON.stringify(value)}`,
      { field },
    );
  }
  return value;
}

function checkPrefix(prefix: string): string {
  if (prefix.split('.').some((t) => !TOKEN_RE.test(t))) {
    throw new InvalidArgumentError(`subjectPrefix must be dot-separated subject tokens, got ${JSON.stringify(prefix)}`, {
      field: 'subjectPrefix',
    });
  }
  return prefix;
}

/** Subject of a method: `<prefix>.<service>.<scope>.<method>`, service and method lower-cased. */
export function methodSubject(definition: ServiceDefinition, method: MethodDefinition, opts: SubjectOptions): string {
  const prefix = checkPrefix(opts.subjectPrefix ?? DEFAULT_PREFIX);
  const scope = checkToken(opts.scope, 'scope');
  return `${prefix}.${definition.name.toLowerCase()}.${scope}.${method.name.toLowerCase()}`;
}

/** Subject on which every replica answers a NO_SIDE_EFFECTS method (no queue group). */
export function collectSubject(methodSubj: string): string {
  return `${methodSubj}.all`;
}

function isUnary(m: MethodDefinition): boolean {
  return !m.requestStream && !m.responseStream;
}

/** Answered by every replica: the caller takes the first answer (a call) or all of them (collect). */
function isBroadcast(m: MethodDefinition): boolean {
  return m.options.idempotencyLevel === 'NO_SIDE_EFFECTS';
}

function isIdempotent(m: MethodDefinition): boolean {
  const level = m.options.idempotencyLevel;
  return level === 'IDEMPOTENT' || level === 'NO_SIDE_EFFECTS';
}

function positive(value: number | undefined, field: string): number | undefined {
  if (value === undefined) return undefined;
  if (!(typeof value === 'number' && value > 0 && !Number.isNaN(value))) {
    throw new InvalidArgumentError(`${field} must be a positive number of milliseconds/bytes, got ${String(value)}`, {
      field,
    });
  }
  return value;
}

/** Encodes an error as reply headers. */
export function errorReply(err: unknown): BusMessage {
  const e = toDitpipeError(err);
  const message = truncate(e.message, MAX_STATUS_MESSAGE);
  const headers: Record<string, string> = { [H_STATUS]: String(e.code), [H_MESSAGE]: encodeURIComponent(message), [H_KIND]: e.kind };
  const field = errorField(e);
  if (field !== undefined) headers[H_FIELD] = field;
  return { data: new Uint8Array(0), headers };
}

/** The error carried by a reply, or undefined for an OK reply. */
export function replyError(msg: BusMessage): DitpipeError | undefined {
  const status = msg.headers[H_STATUS];
  if (status === undefined) return undefined;
  let message = msg.headers[H_MESSAGE] ?? '';
  try {
    message = decodeURIComponent(message);
  } catch {
    // Not percent-encoded by a foreign sender: keep it as it came.
  }
  return errorFromStatus(Number(status), message, msg.headers[H_KIND], msg.headers[H_FIELD]);
}

/** Sleeps ms; rejects with CancelledError when signal aborts. Leaves no timer behind either way. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(cancelled(signal));
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(cancelled(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function cancelled(signal: AbortSignal | undefined, what = 'call'): CancelledError {
  const reason: unknown = signal?.reason;
  if (reason instanceof CancelledError) return reason;
  const detail = reason instanceof Error ? `: ${reason.message}` : '';
  return new CancelledError(`${what} cancelled by the caller${detail}`, { cause: reason });
}

/** Races p against signal; p's own later rejection is swallowed (its result is no longer wanted). */
function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) {
    p.catch(() => undefined);
    return Promise.reject(cancelled(signal, what));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => {
      p.catch(() => undefined);
      reject(cancelled(signal, what));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}

/** Same class as err with more context in the message. */
function withContext(err: DitpipeError, context: string): DitpipeError {
  const e = errorFromStatus(err.code, `${err.message} ${context}`, err.kind, errorField(err));
  if (err instanceof PayloadTooLargeError) {
    return new PayloadTooLargeError(e.message, { size: err.size, limit: err.limit, cause: err });
  }
  return e;
}

interface Active {
  controller: AbortController;
  answer: (msg: BusMessage) => void;
}

/**
 * Mounts the unary methods of `definition` on the bus: control calls by request/reply, work
 * methods as a pull consumer of their queue (driven by `opts.drivers`, else a simple loop).
 */
export async function serveOnBus<D extends ServiceDefinition>(
  bus: Bus,
  definition: D,
  impl: ServiceImpl<D>,
  opts: ServeOptions,
): Promise<RpcServer> {
  const serverLimit = positive(opts.maxPayload, 'maxPayload') ?? Number.POSITIVE_INFINITY;
  const queue = opts.queue ?? `ditpipe.${definition.name.toLowerCase()}.${checkToken(opts.scope, 'scope')}`;
  const stuckGraceMs = opts.stuckGraceMs ?? DEFAULT_STUCK_GRACE_MS;
  if (!(Number.isFinite(stuckGraceMs) && stuckGraceMs >= 0)) {
    throw new InvalidArgumentError(`stuckGraceMs must be a non-negative number of milliseconds, got ${String(opts.stuckGraceMs)}`, {
      field: 'stuckGraceMs',
    });
  }
  const concurrency = opts.concurrency ?? 1;
  if (!(Number.isInteger(concurrency) && concurrency >= 1)) {
    throw new InvalidArgumentError(`concurrency must be a positive integer, got ${String(opts.concurrency)}`, { field: 'concurrency' });
  }
  const settings = queueSettings(opts.queueSettings);
  const instance = opts.instance ?? randomUUID().replaceAll('-', '');
  if (!/^[A-Za-z0-9_-]{1,128}$/.test(instance)) {
    throw new InvalidArgumentError(`instance must be 1..128 letters, digits, "-" or "_", got "${instance.slice(0, 140)}"`, {
      field: 'instance',
    });
  }
  const handlers = impl as unknown as Record<string, unknown>;
  const methods: Array<[string, MethodDefinition]> = Object.entries(definition.methods).filter(([, m]) => isUnary(m));
  for (const [key] of methods) {
    if (typeof handlers[key] !== 'function') {
      throw new InvalidArgumentError(`implementation of ${definition.name} lacks method ${key}`, { field: key });
    }
  }
  for (const key of Object.keys(opts.drivers ?? {})) {
    const m = definition.methods[key];
    if (!m || !isWorkMethod(m))
      throw new InvalidArgumentError(`drivers: ${definition.name}.${key} is not a work (IDEMPOTENT) method`, { field: 'drivers' });
  }

  const active = new Set<Active>();
  let idleWaiters: Array<() => void> = [];
  const settle = (entry: Active): void => {
    active.delete(entry);
    if (active.size === 0) {
      const waiters = idleWaiters;
      idleWaiters = [];
      for (const w of waiters) w();
    }
  };

  const handle = (key: string, method: MethodDefinition, subject: string, msg: BusMessage, reply: (m: BusMessage) => void): void => {
    const what = `${definition.name}.${method.name}`;
    const controller = new AbortController();
    const timeout = Number(msg.headers[H_TIMEOUT]);
    const hasTimeout = Number.isFinite(timeout) && timeout > 0;
    const deadline = hasTimeout ? Date.now() + timeout : Number.POSITIVE_INFINITY;
    const timer = hasTimeout
      ? setTimeout(() => controller.abort(new DeadlineExceededError(`${what}: caller's deadline of ${timeout} ms passed`)), timeout)
      : undefined;
    let answered = false;
    const entry: Active = {
      controller,
      answer: (m) => {
        if (answered) return;
        answered = true;
        try {
          reply(m);
        } catch (err) {
          opts.onError?.(err, method.name);
        }
      },
    };
    active.add(entry);
    const ctx: CallContext = { signal: controller.signal, deadline, subject, method: method.name };
    const run = async (): Promise<void> => {
      let request: unknown;
      try {
        request = method.requestType.decode(msg.data);
      } catch (err) {
        throw new InvalidArgumentError(`malformed ${what} request: ${(err as Error).message}`, { cause: err });
      }
      const fn = handlers[key] as (req: unknown, ctx: CallContext) => unknown;
      const response = await fn.call(impl, request, ctx);
      const data = method.responseType.encode(response).finish();
      const limit = Math.min(serverLimit, bus.maxPayload());
      if (data.length > limit) {
        throw new PayloadTooLargeError(`${what} reply is ${data.length} bytes, over the payload limit of ${limit} bytes`, {
          size: data.length,
          limit,
        });
      }
      entry.answer({ data, headers: {} });
    };
    run()
      .catch((err: unknown) => {
        if (answered) opts.onError?.(err, method.name);
        else entry.answer(errorReply(err));
      })
      .finally(() => {
        if (timer) clearTimeout(timer);
        settle(entry);
      });
  };

  const subjects: string[] = [];
  const subs: BusSubscription[] = [];
  const works: WorkServer[] = [];
  const queues: Record<string, WorkQueue> = {};
  let stopping: Promise<void> | undefined;
  const mount = async (): Promise<void> => {
    for (const [key, method] of methods) {
      const subject = methodSubject(definition, method, opts);
      if (isWorkMethod(method)) {
        const fn = handlers[key] as (req: unknown, ctx: CallContext) => unknown;
        let inFlight = 0;
        let waiters: Array<() => void> = [];
        const driver = opts.drivers?.[key];
        const call = async (req: unknown, ctx: CallContext): Promise<unknown> => {
          inFlight++;
          try {
            return await fn.call(impl, req, ctx);
          } finally {
            inFlight--;
            const w = waiters;
            waiters = [];
            for (const r of w) r();
          }
        };
        const work = new WorkServer(
          bus,
          method,
          queueSpec(subject, definition, opts, settings),
          definition,
          driver ? async (req, ctx) => fn.call(impl, req, ctx) : call,
          {
            instance,
            stuckGraceMs,
            maxPayload: serverLimit,
            onError: opts.onError,
            onWorkEvent: opts.onWorkEvent,
          },
        );
        await work.start();
        works.push(work);
        queues[key] = work.queue;
        if (driver) driver(work);
        else runSimpleDriver(work, concurrency, { inFlight: () => inFlight, settled: () => new Promise<void>((r) => waiters.push(r)) });
        continue;
      }
      if (isBroadcast(method)) {
        const all = collectSubject(subject);
        subjects.push(all);
        subs.push(await bus.subscribe(all, undefined, (m, r) => handle(key, method, all, m, r)));
        continue;
      }
      subjects.push(subject);
      subs.push(await bus.subscribe(subject, queue, (m, r) => handle(key, method, subject, m, r)));
    }
  };
  try {
    await mount();
  } catch (err) {
    await Promise.allSettled([...subs.map((s) => s.drain()), ...works.map((w) => w.stop(0))]);
    throw err;
  }

  const stop = (graceMs = DEFAULT_GRACE_MS): Promise<void> => {
    stopping ??= (async () => {
      // Work servers first: they stop taking at once, and direct calls that come while the control
      // subscriptions drain are given back rather than started.
      const workDone = Promise.all(works.map((w) => w.stop(graceMs)));
      await Promise.allSettled(subs.map((s) => s.drain()));
      if (active.size > 0) await settledWithin(new Promise<void>((resolve) => idleWaiters.push(resolve)), graceMs);
      for (const entry of active) {
        const err = new UnavailableError(`${definition.name} replica stopped before answering (grace ${graceMs} ms)`);
        entry.controller.abort(err);
        entry.answer(errorReply(err));
      }
      await workDone;
    })();
    return stopping;
  };

  return {
    subjects,
    queues,
    instance,
    get live() {
      return stopping === undefined && works.every((w) => w.live);
    },
    get inFlight() {
      return active.size + works.reduce((n, w) => n + w.inFlight, 0);
    },
    stop,
  };
}

/** Typed promise client for the unary methods of `definition`. */
export function clientOnBus<D extends ServiceDefinition>(bus: Bus, definition: D, opts: ClientOptions): RpcClient<D> {
  const defaults = {
    timeoutMs: positive(opts.timeoutMs, 'timeoutMs') ?? DEFAULT_TIMEOUT_MS,
    attemptTimeoutMs: positive(opts.attemptTimeoutMs, 'attemptTimeoutMs'),
    retries: opts.retries ?? DEFAULT_RETRIES,
    maxPayload: positive(opts.maxPayload, 'maxPayload') ?? Number.POSITIVE_INFINITY,
    backoffMs: positive(opts.backoffMs, 'backoffMs') ?? DEFAULT_BACKOFF_MS,
  };
  if (!Number.isInteger(defaults.retries) || defaults.retries < 0) {
    throw new InvalidArgumentError(`retries must be a non-negative integer, got ${String(opts.retries)}`, { field: 'retries' });
  }
  const settings = queueSettings(opts.queueSettings);
  const subjects = new Map<string, string>();
  const work = new Map<string, WorkClient>();
  for (const [key, method] of Object.entries(definition.methods)) {
    if (!isUnary(method)) continue;
    const subject = methodSubject(definition, method, opts);
    subjects.set(key, isBroadcast(method) ? collectSubject(subject) : subject);
    if (isWorkMethod(method)) {
      work.set(
        key,
        new WorkClient(bus, method, queueSpec(subject, definition, opts, settings), definition, {
          timeoutMs: defaults.timeoutMs,
          attemptTimeoutMs: defaults.attemptTimeoutMs,
          maxPayload: defaults.maxPayload,
          onWorkEvent: opts.onWorkEvent,
        }),
      );
    }
  }
  const lookup = (key: string): { method: MethodDefinition; subject: string } => {
    const subject = subjects.get(key);
    const method = definition.methods[key];
    if (subject === undefined || method === undefined) {
      throw new UnimplementedError(`${definition.name} has no unary method ${key} to call over the bus`);
    }
    return { method, subject };
  };

  const encodeChecked = (what: string, method: MethodDefinition, request: unknown, headers: Headers): Uint8Array => {
    const data = method.requestType.encode(request).finish();
    const busLimit = bus.maxPayload();
    const limit = Math.min(defaults.maxPayload, busLimit);
    const size = data.length + headerBytes(headers);
    if (size > limit) {
      const source = limit === busLimit ? 'server max_payload' : 'client maxPayload';
      throw new PayloadTooLargeError(
        `${what} request is ${size} bytes (${data.length} body + ${size - data.length} headers), over the payload limit of ${limit} bytes (${source}); not sent`,
        { size, limit },
      );
    }
    return data;
  };

  const call = async (key: string, request: unknown, callOpts: CallOptions = {}): Promise<unknown> => {
    const { method, subject } = lookup(key);
    const what = `${definition.name}.${method.name}`;
    if (callOpts.signal?.aborted) throw cancelled(callOpts.signal, what);
    const timeoutMs = positive(callOpts.timeoutMs, 'timeoutMs') ?? defaults.timeoutMs;
    const attemptMs = positive(callOpts.attemptTimeoutMs, 'attemptTimeoutMs') ?? defaults.attemptTimeoutMs ?? timeoutMs;
    const retries = isIdempotent(method) ? (callOpts.retries ?? defaults.retries) : 0;
    const deadline = Date.now() + timeoutMs;
    // Size check with the largest timeout header this call can send.
    const data = encodeChecked(what, method, request, { [H_TIMEOUT]: String(Math.ceil(timeoutMs)) });

    for (let attempt = 0; ; attempt++) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        throw new DeadlineExceededError(`${what} on ${subject}: no answer within ${timeoutMs} ms (${attempt} attempts)`);
      }
      const thisAttempt = Math.max(1, Math.min(remaining, attemptMs));
      let err: DitpipeError;
      try {
        const reply = await abortable(
          bus.request(subject, { data, headers: { [H_TIMEOUT]: String(Math.ceil(thisAttempt)) } }, thisAttempt),
          callOpts.signal,
          what,
        );
        const remote = replyError(reply);
        if (remote === undefined) {
          try {
            return method.responseType.decode(reply.data);
          } catch (e) {
            throw new InternalError(`malformed ${what} reply: ${(e as Error).message}`, { cause: e });
          }
        }
        err = remote;
      } catch (e) {
        if (e instanceof CancelledError && callOpts.signal?.aborted) throw e;
        err = toDitpipeError(e);
        if (err instanceof DeadlineExceededError) {
          const limit = attemptMs < timeoutMs ? `${attemptMs} ms (attempt timeout)` : `${timeoutMs} ms`;
          err = new DeadlineExceededError(`${what} on ${subject}: no answer within ${limit}`, { cause: err });
        }
      }
      if (!err.retryable || attempt >= retries) {
        throw attempt > 0 ? withContext(err, `(after ${attempt + 1} attempts)`) : err;
      }
      const backoff = Math.random() * Math.min(MAX_BACKOFF_MS, defaults.backoffMs * 2 ** attempt);
      if (Date.now() + backoff >= deadline) {
        throw withContext(err, `(after ${attempt + 1} attempts; no time left to retry within ${timeoutMs} ms)`);
      }
      await sleep(backoff, callOpts.signal);
    }
  };

  const collect = async (key: string, request: unknown, collectOpts: CollectOptions = {}): Promise<unknown[]> => {
    const { method, subject } = lookup(key);
    const what = `${definition.name}.${method.name}`;
    if (method.options.idempotencyLevel !== 'NO_SIDE_EFFECTS') {
      throw new InvalidArgumentError(`${what} is not marked NO_SIDE_EFFECTS, so it cannot be sent to every replica`, {
        field: 'method',
      });
    }
    const waitMs = positive(collectOpts.waitMs, 'waitMs') ?? DEFAULT_COLLECT_MS;
    const headers = { [H_TIMEOUT]: String(Math.ceil(waitMs)) };
    const data = encodeChecked(what, method, request, headers);
    const replies = await abortable(bus.requestMany(subject, { data, headers }, waitMs), collectOpts.signal, what);
    const out: unknown[] = [];
    for (const r of replies) {
      if (replyError(r) === undefined) out.push(method.responseType.decode(r.data));
    }
    return out;
  };

  const client: Record<string, unknown> = {
    collect,
    subjectOf: (key: string) => lookup(key).subject,
    queueOf: (key: string) => {
      const w = work.get(key);
      if (!w) throw new InvalidArgumentError(`${definition.name}.${key} is not a work (IDEMPOTENT) method`, { field: 'method' });
      return w.queue;
    },
  };
  for (const key of subjects.keys()) {
    const w = work.get(key);
    client[key] = w
      ? (request: unknown, callOpts: CallOptions = {}) => {
          if (callOpts.timeoutMs !== undefined) positive(callOpts.timeoutMs, 'timeoutMs');
          return w.call(request, callOpts);
        }
      : (request: unknown, callOpts?: CallOptions) => call(key, request, callOpts);
  }
  return client as RpcClient<D>;
}

/**
 * A Transport over a Bus: remembers the servers mounted through it so close() can stop them
 * (waiting for calls in flight) before the connection itself goes.
 */
export class BusTransport implements Transport {
  private readonly servers = new Set<RpcServer>();
  private closing: Promise<CloseResult> | undefined;

  constructor(
    readonly kind: 'nats' | 'inproc',
    private readonly bus: Bus,
    private readonly closeConnection: () => Promise<CloseResult>,
    readonly closed: Promise<Error | null>,
  ) {}

  get connected(): boolean {
    return this.closing === undefined && this.bus.connected;
  }

  async serve<D extends ServiceDefinition>(definition: D, impl: ServiceImpl<D>, opts: ServeOptions): Promise<RpcServer> {
    if (this.closing) throw new UnavailableError(`transport is closing; cannot serve ${definition.name}`);
    const server = await serveOnBus(this.bus, definition, impl, opts);
    this.servers.add(server);
    return server;
  }

  client<D extends ServiceDefinition>(definition: D, opts: ClientOptions): RpcClient<D> {
    return clientOnBus(this.bus, definition, opts);
  }

  close(opts: { graceMs?: number } = {}): Promise<CloseResult> {
    this.closing ??= (async () => {
      await Promise.all([...this.servers].map((s) => s.stop(opts.graceMs)));
      return this.closeConnection();
    })();
    return this.closing;
  }
}
