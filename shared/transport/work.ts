// Work queues: how calls of IDEMPOTENT methods (Denoise, Decode) travel. Replicas pull them; nobody
// pushes work at a replica. One JetStream work-queue stream per method and scope (memory storage,
// explicit limits) and one durable pull consumer shared by the replicas; the envelope is
// proto/ditpipe/v1/work.proto.
//
// Caller (WorkClient):
//   - A call becomes a WorkItem (id, deadline, request bytes). Items that become ready in the same
//     event-loop turn are packed into one WorkBatch message while their costs fit the caller's
//     maxBatchCost (e.g. a replica's row budget) and the payload limit, and appended to the stream
//     with headers Ditpipe-Reply (the caller's reply subject), Ditpipe-Timeout-Ms (the attempt time:
//     the longest one replica may hold it) and Nats-Msg-Id (so a re-sent copy is stored once).
//   - Answers come back to the reply subject as WorkResults; the first answer of a call wins, later
//     ones (after a redelivery) are counted and dropped.
//   - A call's own timer bounds the whole wait; on cancellation or timeout a WorkCancel notice tells
//     the replicas to drop the call if they have not started it.
//   - After a NATS reconnect the caller re-creates the queue if the server lost it and re-sends every
//     batch with a call still unanswered, so an outage shorter than the calls' timeouts loses nothing.
//   - A call with a target (CallOptions.target, a replica's instance) is published on core NATS to
//     <subject>.to.<instance> instead (calls to one target ready in one turn share a message, same
//     headers, no msg id). It falls back to the queue path with the same id when the replica says
//     nothing of it (no answer, no `working` heartbeat) for ackWaitMs, lists it in `given_back`, or
//     the publish failed or a reconnect may have lost it; the first answer wins as above.
// Replica (WorkServer): a replica that may not create queues (NATS permissions) waits for the
//   caller's first work to create it, looking every 250 ms. Its driver (the batcher) calls `take()`
//   when it can start a pass. take()
//   takes what is queued without waiting (no_wait pulls sized to the room left), or, when the queue
//   is empty, waits for one message with a pull of batch 1 that lapses after waitMs — so a replica
//   never has more than one message on its way that it did not ask for, and a frozen replica takes
//   nothing once its last pull lapsed. While it holds messages (queued for a pass or in one) it
//   sends in-progress acks every ackWait/4, so the ack wait is short (a dead or frozen replica's
//   messages are redelivered within about ackWaitMs) whatever a pass costs; it stops confirming a
//   message held past its attempt time, which the queue then gives to another replica. Answers to
//   one caller from one pass go out as one WorkResults, then the messages are acknowledged.
//   Direct messages (on <subject>.to.<its instance>, core NATS) bypass take() and the room: they are
//   served by the same machinery, with `working` heartbeats (every ackWait/4, within the attempt
//   time) in place of in-progress acks, nothing to acknowledge, and `given_back` to the caller where
//   a queued message would be nak'ed (UNAVAILABLE from the handler, stopping, the stop grace over).
import { randomUUID } from 'node:crypto';
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import {
  CancelledError,
  DeadlineExceededError,
  type DitpipeError,
  errorField,
  errorFromStatus,
  FailedPreconditionError,
  InvalidArgumentError,
  MAX_STATUS_MESSAGE,
  NoQueueError,
  PayloadTooLargeError,
  PermissionDeniedError,
  ResourceExhaustedError,
  toDitpipeError,
  truncate,
  UnauthenticatedError,
  UnavailableError,
} from '../errors.ts';
import { WorkBatch, WorkCancel, type WorkResult, WorkResults } from '../gen/ditpipe/v1/work.ts';
import {
  type Bus,
  type BusMessage,
  type BusSubscription,
  H_REPLY,
  H_TIMEOUT,
  type Headers,
  type Puller,
  type QueuedMessage,
  type QueueSpec,
} from './bus.ts';
import type {
  CallContext,
  CallOptions,
  ClientWorkEvent,
  FallbackReason,
  MethodDefinition,
  QueueSettings,
  ServiceDefinition,
  SubjectOptions,
  WorkEvent,
  WorkQueue,
  WorkSource,
} from './types.ts';
import { settledWithin } from '../wait.ts';

/** Defaults of the queue settings (QueueSettings documents each). */
export const DEFAULT_QUEUE_SETTINGS: Readonly<QueueSettings> = Object.freeze({
  ackWaitMs: 2_000,
  maxDeliver: 5,
  maxMessages: 100_000,
  maxBytes: 128 * 1024 * 1024,
  maxAgeMs: 10 * 60_000,
  duplicateWindowMs: 2 * 60_000,
  maxAckPending: 20_000,
});

/** Most messages one no_wait pull asks for. */
const MAX_PULL_BATCH = 256;
/** A replica drops an item this long after its deadline (clocks of caller and replica may differ a little). */
const DEADLINE_SLACK_MS = 1_000;
/** Cancel notices are remembered this long (a notice can overtake its item still waiting in the stream). */
const CANCEL_MEMORY_MS = 5 * 60_000;
const MAX_CANCEL_MEMORY = 100_000;
/** Completed call ids remembered to tell a duplicate answer from a late one. */
const RECENT_IDS = 8_192;
/** How often a replica that may not create its queue looks whether the scheduler has created it. */
const NO_QUEUE_POLL_MS = 250;

/**
 * One writer for every encode here: its buffer grows once to the largest message and is reused,
 * so a 16 KiB latent costs one copy (finish) instead of a chain of growing buffers. Encodes are
 * synchronous, so uses never interleave.
 */
const scratch = new BinaryWriter();

function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 128);
    size++;
  }
  return size;
}

/** WorkBatch bytes from encoded WorkItems: field 1 (tag 0x0a), length, item, for each. */
function batchBytes(items: readonly Uint8Array[]): Uint8Array {
  let size = 0;
  for (const it of items) size += 1 + varintSize(it.length) + it.length;
  const out = new Uint8Array(size);
  let pos = 0;
  for (const it of items) {
    out[pos++] = 0x0a;
    let n = it.length;
    while (n >= 0x80) {
      out[pos++] = (n & 0x7f) | 0x80;
      n = Math.floor(n / 128);
    }
    out[pos++] = n;
    out.set(it, pos);
    pos += it.length;
  }
  return out;
}

const SETTING_LIMITS: Record<keyof QueueSettings, [number, number]> = {
  ackWaitMs: [100, 3_600_000],
  maxDeliver: [1, 1_000],
  maxMessages: [1, 1e12],
  maxBytes: [1024, 1e15],
  maxAgeMs: [1_000, 1e12],
  duplicateWindowMs: [0, 1e12],
  maxAckPending: [1, 1e9],
};

/** Completes and checks queue settings; errors name the setting. */
export function queueSettings(partial: Partial<QueueSettings> = {}): QueueSettings {
  const out = { ...DEFAULT_QUEUE_SETTINGS };
  for (const [key, value] of Object.entries(partial) as Array<[keyof QueueSettings, number | undefined]>) {
    if (value === undefined) continue;
    const limits = SETTING_LIMITS[key];
    if (!limits) throw new InvalidArgumentError(`unknown queue setting ${key}`, { field: key });
    if (!(Number.isInteger(value) && value >= limits[0] && value <= limits[1])) {
      throw new InvalidArgumentError(`queue setting ${key} must be an integer within ${limits[0]}..${limits[1]}, got ${String(value)}`, {
        field: key,
      });
    }
    out[key] = value;
  }
  if (out.duplicateWindowMs > out.maxAgeMs) {
    throw new InvalidArgumentError(
      `queue setting duplicateWindowMs (${out.duplicateWindowMs}) must not exceed maxAgeMs (${out.maxAgeMs})`,
      {
        field: 'duplicateWindowMs',
      },
    );
  }
  return out;
}

/** The queue of a work method: stream `<prefix>_<service>_<scope>` (dots → "_"), consumer `<service>`. */
export function queueSpec(subject: string, definition: ServiceDefinition, opts: SubjectOptions, settings: QueueSettings): QueueSpec {
  const service = definition.name.toLowerCase();
  const prefix = (opts.subjectPrefix ?? 'ditpipe.v1').replaceAll('.', '_');
  return { stream: `${prefix}_${service}_${opts.scope}`, subject, consumer: service, settings };
}

/** Subject of a work method's cancel notices. */
export function cancelSubject(subject: string): string {
  return `${subject}.cancel`;
}

/** A subject token: what a replica instance must be to be a direct-call target. */
const TOKEN_RE = /^[^\s.*>]+$/;

/** Subject of the direct calls of a work method to one replica (core NATS; the stream does not capture it). */
export function directSubject(subject: string, instance: string): string {
  return `${subject}.to.${instance}`;
}

export function isWorkMethod(m: MethodDefinition): boolean {
  return !m.requestStream && !m.responseStream && m.options.idempotencyLevel === 'IDEMPOTENT';
}

/** Errors that no retry can fix: the calls fail with them at once. */
/** The longest delay setTimeout takes; a longer one fires at once (Node clamps it to 1 ms). */
const MAX_TIMER_MS = 2 ** 31 - 1;

function definitive(e: DitpipeError): boolean {
  return (
    e instanceof FailedPreconditionError ||
    e instanceof ResourceExhaustedError ||
    e instanceof InvalidArgumentError ||
    e instanceof PermissionDeniedError ||
    e instanceof UnauthenticatedError
  );
}

function queueHandle(bus: Bus, spec: QueueSpec): WorkQueue {
  return { stream: spec.stream, consumer: spec.consumer, subject: spec.subject, info: () => bus.queueInfo(spec) };
}

function cancelled(signal: AbortSignal, what: string): CancelledError {
  const reason: unknown = signal.reason;
  if (reason instanceof CancelledError) return reason;
  const detail = reason instanceof Error ? `: ${reason.message}` : '';
  return new CancelledError(`${what} cancelled by the caller${detail}`, { cause: reason });
}

// ---------------------------------------------------------------------------------------------
// Caller side

interface Waiting {
  readonly id: bigint;
  readonly item: Uint8Array;
  readonly cost: number;
  readonly maxBatchCost: number;
  readonly attemptMs: number;
  readonly resolve: (res: unknown) => void;
  readonly reject: (err: DitpipeError) => void;
  timer: NodeJS.Timeout | undefined;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
  batch: Sent | undefined;
  /** The replica instance to send it to directly (CallOptions.target); undefined once it fell back to the queue. */
  target: string | undefined;
  /** While it waits on its target: falls back to the queue when nothing of it is heard for an ack wait. */
  silence: NodeJS.Timeout | undefined;
  /** It went to a target, so a replica may hold it outside the queue (a cancel must reach it). */
  sentDirect: boolean;
  /** It went to the queue after a direct send. */
  fellBack: boolean;
}

/** A batch appended to the stream, kept until every call in it is answered (to re-send it). */
interface Sent {
  readonly id: string;
  readonly data: Uint8Array;
  readonly headers: Headers;
  open: number;
}

export interface WorkClientOptions {
  readonly timeoutMs: number;
  readonly attemptTimeoutMs: number | undefined;
  readonly maxPayload: number;
  readonly onWorkEvent?: (event: ClientWorkEvent) => void;
}

/** The caller's side of one work method's queue. */
export class WorkClient {
  readonly queue: WorkQueue;
  private readonly instance = randomUUID().replaceAll('-', '').slice(0, 16);
  private readonly what: string;
  private readonly waiting = new Map<bigint, Waiting>();
  private readonly sent = new Set<Sent>();
  private readonly recent = new Set<bigint>();
  private outbox: Waiting[] = [];
  private cancels: bigint[] = [];
  private flushScheduled = false;
  /** Calls waiting for the queue to open before they are packed into messages. */
  private staged: Waiting[] = [];
  /** Messages to store (new, or back after a transient failure or a reconnect). */
  private readonly unsent = new Set<Sent>();
  private pumping = false;
  private pumpAgain = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private backoffMs = 0;
  private nextId = 0n;
  private nextMsg = 0;
  private reply: string | undefined;
  private ready: Promise<void> | undefined;
  private replying: Promise<void> | undefined;
  private readonly unlisten: () => void;

  constructor(
    private readonly bus: Bus,
    private readonly method: MethodDefinition,
    private readonly spec: QueueSpec,
    definition: ServiceDefinition,
    private readonly opts: WorkClientOptions,
  ) {
    this.what = `${definition.name}.${method.name}`;
    this.queue = queueHandle(bus, spec);
    this.unlisten = bus.onConnection((ev) => {
      if (ev === 'reconnected') this.onReconnect();
      else if (ev === 'closed') this.close();
    });
  }

  call(request: unknown, callOpts: CallOptions): Promise<unknown> {
    if (callOpts.signal?.aborted) return Promise.reject(cancelled(callOpts.signal, this.what));
    const timeoutMs = callOpts.timeoutMs ?? this.opts.timeoutMs;
    const attemptMs = Math.min(timeoutMs, callOpts.attemptTimeoutMs ?? this.opts.attemptTimeoutMs ?? timeoutMs);
    const cost = callOpts.cost ?? 1;
    const target = callOpts.target;
    if (target !== undefined && !TOKEN_RE.test(target)) {
      return Promise.reject(
        new InvalidArgumentError(`target must be a replica instance (a subject token), got ${JSON.stringify(target)}`, { field: 'target' }),
      );
    }
    // Unless asked, a call travels alone: a message goes to one replica, so packing calls together
    // would hand one replica work that idle replicas could have shared.
    const maxBatchCost = callOpts.maxBatchCost ?? cost;
    for (const [field, v] of [
      ['timeoutMs', timeoutMs],
      ['attemptTimeoutMs', attemptMs],
      ['cost', cost],
      ['maxBatchCost', maxBatchCost],
    ] as const) {
      if (!(typeof v === 'number' && v > 0)) {
        return Promise.reject(new InvalidArgumentError(`${field} must be a positive number, got ${String(v)}`, { field }));
      }
    }
    const id = ++this.nextId;
    const deadline = Date.now() + timeoutMs;
    // WorkItem { id = 1; deadline_ms = 2; request = 3 }, the request encoded in place.
    let item: Uint8Array;
    try {
      scratch
        .uint32(8)
        .uint64(id)
        .uint32(16)
        .int64(BigInt(Math.ceil(deadline)))
        .uint32(26)
        .fork();
      this.method.requestType.encode(request, scratch);
      item = scratch.join().finish();
    } catch (err) {
      scratch.finish(); // reset the shared writer
      return Promise.reject(new InvalidArgumentError(`${this.what} request cannot be encoded: ${(err as Error).message}`, { cause: err }));
    }
    const limit = this.payloadLimit();
    if (item.length + 8 > limit) {
      return Promise.reject(
        new PayloadTooLargeError(
          `${this.what} request is ${item.length} bytes, over the payload limit of ${limit} bytes (after the work headers); not sent`,
          {
            size: item.length,
            limit,
          },
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const w: Waiting = {
        id,
        item,
        cost,
        maxBatchCost,
        attemptMs,
        resolve,
        reject,
        timer: undefined,
        signal: callOpts.signal,
        onAbort: undefined,
        batch: undefined,
        target,
        silence: undefined,
        sentDirect: false,
        fellBack: false,
      };
      w.timer = setTimeout(
        () =>
          this.giveUp(w, new DeadlineExceededError(`${this.what} on ${this.spec.subject}: no answer within ${Math.round(timeoutMs)} ms`)),
        timeoutMs,
      );
      if (w.signal) {
        const signal = w.signal;
        w.onAbort = () => this.giveUp(w, cancelled(signal, this.what));
        signal.addEventListener('abort', w.onAbort, { once: true });
      }
      this.waiting.set(id, w);
      this.outbox.push(w);
      this.scheduleFlush();
    });
  }

  /** Calls waiting for an answer. */
  get inFlight(): number {
    return this.waiting.size;
  }

  private payloadLimit(): number {
    // Room for the three work headers (reply subject, attempt time, message id).
    return Math.min(this.opts.maxPayload, this.bus.maxPayload()) - 256;
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    // After the current turn: the answers of one pass arrive together, and the next steps they
    // unlock are sent as few messages.
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    const cancels = this.cancels;
    this.cancels = [];
    if (cancels.length > 0 && this.reply !== undefined && this.bus.connected) {
      try {
        this.bus.publish(cancelSubject(this.spec.subject), {
          data: WorkCancel.encode({ reply: this.reply, ids: cancels }, scratch).finish(),
          headers: {},
        });
      } catch {
        // A cancel notice only saves work; the answers, if any, are dropped here anyway.
      }
    }
    const direct = new Map<string, Waiting[]>();
    for (const w of this.outbox) {
      if (!this.waiting.has(w.id)) continue;
      if (w.target === undefined) this.staged.push(w);
      else {
        const list = direct.get(w.target);
        if (list) list.push(w);
        else direct.set(w.target, [w]);
      }
    }
    this.outbox = [];
    if (direct.size > 0) void this.sendDirect(direct);
    if (this.staged.length > 0) void this.pump();
  }

  /**
   * Publishes calls to their target replicas on core NATS, one message per target (and attempt
   * time, within the payload limit), and starts each call's silence timer. Nothing is stored: a
   * call the replica does not confirm falls back to the queue (fallBack).
   */
  private async sendDirect(byTarget: Map<string, Waiting[]>): Promise<void> {
    if (this.bus.connected) {
      try {
        await this.openReply();
      } catch {
        // Falls back below: the queue path retries opening.
      }
    }
    const limit = this.payloadLimit();
    for (const [target, calls] of byTarget) {
      const open = calls.filter((w) => this.waiting.has(w.id) && w.target !== undefined);
      if (this.reply === undefined || !this.bus.connected) {
        for (const w of open) this.fallBack(w, 'unsent');
        continue;
      }
      const subject = directSubject(this.spec.subject, target);
      let group: Waiting[] = [];
      let bytes = 0;
      const publish = (): void => {
        if (group.length === 0) return;
        const calls = group;
        group = [];
        bytes = 0;
        for (const w of calls) {
          w.sentDirect = true;
          w.silence = setTimeout(() => this.fallBack(w, 'silent'), this.spec.settings.ackWaitMs);
        }
        try {
          this.bus.publish(subject, {
            data: batchBytes(calls.map((w) => w.item)),
            headers: { [H_REPLY]: this.reply as string, [H_TIMEOUT]: String(Math.ceil(calls[0].attemptMs)) },
          });
        } catch {
          for (const w of calls) this.fallBack(w, 'unsent');
          return;
        }
        this.opts.onWorkEvent?.({ kind: 'direct', method: this.method.name, calls: calls.length });
      };
      for (const w of open) {
        const framed = w.item.length + 6;
        if (group.length > 0 && (group[0].attemptMs !== w.attemptMs || bytes + framed > limit)) publish();
        group.push(w);
        bytes += framed;
      }
      publish();
    }
  }

  /** A direct call goes through the queue after all, with the same id: the first answer wins. */
  private fallBack(w: Waiting, reason: FallbackReason): void {
    if (!this.waiting.has(w.id) || w.target === undefined) return;
    clearTimeout(w.silence);
    w.silence = undefined;
    w.target = undefined;
    w.fellBack = true;
    this.opts.onWorkEvent?.({ kind: 'fallback', method: this.method.name, reason });
    this.staged.push(w);
    void this.pump();
  }

  /**
   * Opens the queue, packs the staged calls into messages and stores every message not yet
   * stored. Transient failures (no connection, the queue not there yet, a lost acknowledgement)
   * are retried with backoff until the calls' own timers end them; definitive ones fail the calls.
   */
  private async pump(): Promise<void> {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.pumpAgain = false;
        if (!this.bus.connected) return; // the reconnect pumps again
        try {
          await this.open();
        } catch (err) {
          const e = toDitpipeError(err);
          if (!definitive(e)) {
            this.retryLater();
            return;
          }
          for (const w of [...this.staged, ...[...this.waiting.values()].filter((x) => x.batch && this.unsent.has(x.batch))])
            this.settle(w, e);
          this.staged = [];
          this.unsent.clear();
          return;
        }
        const items = this.staged.filter((w) => this.waiting.has(w.id));
        this.staged = [];
        this.pack(items);
        const unsent = [...this.unsent];
        this.unsent.clear();
        for (const sent of unsent) if (sent.open > 0) this.store(sent);
      } while (this.pumpAgain);
    } finally {
      this.pumping = false;
    }
  }

  private retryLater(): void {
    if (this.retryTimer) return;
    this.backoffMs = Math.min(2_000, Math.max(100, this.backoffMs * 2));
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      void this.pump();
    }, this.backoffMs);
  }

  /** Packs calls in order into messages while their costs fit their budget and the payload limit. */
  private pack(items: Waiting[]): void {
    const limit = this.payloadLimit();
    let group: Waiting[] = [];
    let cost = 0;
    let bytes = 0;
    let maxCost = Number.POSITIVE_INFINITY;
    const close = (): void => {
      if (group.length > 0) this.unsent.add(this.message(group));
      group = [];
      cost = 0;
      bytes = 0;
      maxCost = Number.POSITIVE_INFINITY;
    };
    for (const w of items) {
      const framed = w.item.length + 6;
      const fits =
        group.length > 0 &&
        group[0].attemptMs === w.attemptMs &&
        cost + w.cost <= Math.min(maxCost, w.maxBatchCost) &&
        bytes + framed <= limit;
      if (!fits) close();
      group.push(w);
      cost += w.cost;
      bytes += framed;
      maxCost = Math.min(maxCost, w.maxBatchCost);
    }
    close();
  }

  /** Subscribes to answers and makes sure the queue exists (once; again after a failure or reconnect). */
  private open(): Promise<void> {
    this.ready ??= (async () => {
      await this.openReply();
      await this.bus.ensureQueue(this.spec);
    })().catch((err: unknown) => {
      this.ready = undefined;
      throw err;
    });
    return this.ready;
  }

  /** Subscribes to answers (once; again after a failure). */
  private openReply(): Promise<void> {
    if (this.reply !== undefined) return Promise.resolve();
    this.replying ??= (async () => {
      const reply = this.bus.inbox();
      await this.bus.subscribe(reply, undefined, (m) => this.onAnswers(m));
      this.reply = reply;
    })().finally(() => {
      this.replying = undefined;
    });
    return this.replying;
  }

  private message(group: Waiting[]): Sent {
    const sent: Sent = {
      id: `${this.instance}.${++this.nextMsg}`,
      data: batchBytes(group.map((g) => g.item)),
      headers: { [H_REPLY]: this.reply as string, [H_TIMEOUT]: String(Math.ceil(group[0].attemptMs)) },
      open: group.length,
    };
    for (const g of group) g.batch = sent;
    this.sent.add(sent);
    return sent;
  }

  /** Appends a message to the stream; a transient failure puts it back for the next pump. */
  private store(sent: Sent): void {
    this.bus.enqueue(this.spec, { data: sent.data, headers: sent.headers }, sent.id).then(
      () => {
        this.backoffMs = 0;
      },
      (err: unknown) => {
        if (sent.open === 0) return;
        const e = toDitpipeError(err);
        if (definitive(e)) {
          this.failBatch(sent, e);
          return;
        }
        if (e instanceof NoQueueError) this.ready = undefined;
        this.unsent.add(sent);
        if (this.bus.connected) this.retryLater();
      },
    );
  }

  private failBatch(sent: Sent, err: DitpipeError): void {
    for (const w of [...this.waiting.values()]) {
      if (w.batch === sent) this.settle(w, err);
    }
    this.sent.delete(sent);
  }

  /** The server may have restarted without our queue (memory storage): open it again, re-send what is unanswered. */
  private onReconnect(): void {
    this.ready = undefined;
    // A direct message has no stored copy: one published around the outage may be lost.
    for (const w of [...this.waiting.values()]) if (w.sentDirect && w.target !== undefined) this.fallBack(w, 'unsent');
    let n = 0;
    for (const sent of this.sent) {
      if (sent.open === 0) continue;
      this.unsent.add(sent);
      n++;
    }
    if (n > 0) this.opts.onWorkEvent?.({ kind: 'resent', method: this.method.name, messages: n });
    void this.pump();
  }

  private onAnswers(m: BusMessage): void {
    let results: WorkResults;
    try {
      results = WorkResults.decode(m.data);
    } catch {
      return; // not from a replica of ours
    }
    for (const id of results.working) {
      const w = this.waiting.get(id);
      if (w?.target !== undefined) w.silence?.refresh();
    }
    for (const id of results.givenBack) {
      const w = this.waiting.get(id);
      if (w) this.fallBack(w, 'given-back');
    }
    for (const r of results.results) {
      const w = this.waiting.get(r.id);
      if (!w) {
        this.opts.onWorkEvent?.({ kind: 'discarded', method: this.method.name, reason: this.recent.has(r.id) ? 'duplicate' : 'late' });
        continue;
      }
      if (w.fellBack && w.sentDirect) {
        // Two copies may be out (the target's and the queue's): the other one need not be computed.
        this.cancels.push(w.id);
        this.scheduleFlush();
      }
      if (r.code === 0) {
        let res: unknown;
        try {
          res = this.method.responseType.decode(r.response);
        } catch (err) {
          this.settle(w, errorFromStatus(13, `malformed ${this.what} answer: ${(err as Error).message}`));
          continue;
        }
        this.settle(w, undefined, res);
      } else {
        this.settle(w, errorFromStatus(r.code, r.message, r.kind, r.field));
      }
    }
  }

  private giveUp(w: Waiting, err: DitpipeError): void {
    if (!this.waiting.has(w.id)) return;
    this.settle(w, err);
    if (w.batch !== undefined || w.sentDirect) {
      this.cancels.push(w.id);
      this.scheduleFlush();
    }
  }

  private settle(w: Waiting, err: DitpipeError | undefined, res?: unknown): void {
    if (!this.waiting.delete(w.id)) return;
    clearTimeout(w.timer);
    clearTimeout(w.silence);
    if (w.onAbort) w.signal?.removeEventListener('abort', w.onAbort);
    this.recent.add(w.id);
    if (this.recent.size > RECENT_IDS) this.recent.delete(this.recent.values().next().value as bigint);
    const batch = w.batch;
    if (batch !== undefined && --batch.open === 0) this.sent.delete(batch);
    if (err) w.reject(err);
    else w.resolve(res);
  }

  close(): void {
    this.unlisten();
    clearTimeout(this.retryTimer);
    for (const w of [...this.waiting.values()])
      this.settle(w, new UnavailableError(`${this.what}: connection closed before an answer came`));
  }
}

// ---------------------------------------------------------------------------------------------
// Replica side

interface HeldItem {
  readonly controller: AbortController;
  readonly timer: NodeJS.Timeout | undefined;
  settled: boolean;
}

/** A message taken from the queue and not yet acknowledged, or a direct message not yet answered. */
interface Held {
  /** The queued message; undefined for a direct message (nothing to acknowledge). */
  readonly msg: QueuedMessage | undefined;
  readonly reply: string;
  readonly attemptMs: number;
  readonly takenAt: number;
  readonly items: Map<bigint, HeldItem>;
  open: number;
  /** A call failed with UNAVAILABLE (this replica cannot serve it): give the message back instead of acknowledging it. */
  giveBack: boolean;
}

export interface WorkServerOptions {
  readonly instance: string;
  readonly stuckGraceMs: number;
  readonly maxPayload: number;
  readonly onError?: (err: unknown, method: string) => void;
  readonly onWorkEvent?: (event: WorkEvent) => void;
}

/**
 * The replica's side of one work method's queue: a WorkSource for the method's driver, answers,
 * in-progress acks and cancel notices.
 */
export class WorkServer implements WorkSource {
  readonly queue: WorkQueue;
  private readonly what: string;
  private readonly held = new Set<Held>();
  private readonly cancelledIds = new Map<string, number>();
  private readonly answers = new Map<string, WorkResult[]>();
  private readonly toAck: Held[] = [];
  private flushScheduled = false;
  private pulling: Promise<unknown> | null = null;
  private puller: Puller | undefined;
  private cancelSub: BusSubscription | undefined;
  private directSub: BusSubscription | undefined;
  /** Ids of direct calls this replica will not serve, per reply subject, to publish at the next flush. */
  private readonly givenBack = new Map<string, bigint[]>();
  private unlisten: (() => void) | undefined;
  /** The queue must be checked (created again) before the next pull: after a reconnect or a lost pull. */
  private recheck = false;
  /** Taken this turn by the pull in progress, and room before its latest message. */
  private taken = 0;
  private roomFn: () => number = () => 0;
  private roomBefore = 0;
  private keepAlive: NodeJS.Timeout | undefined;
  private stopping = false;
  private idleWaiters: Array<() => void> = [];
  /** Room the last messages took, per message (to size the next pull). */
  private perMessage = 1;
  /** After giving work back (it could not serve it), take nothing until then (performance.now()). */
  private pausedUntil = 0;

  constructor(
    private readonly bus: Bus,
    private readonly method: MethodDefinition,
    private readonly spec: QueueSpec,
    definition: ServiceDefinition,
    private readonly handler: (request: unknown, ctx: CallContext) => Promise<unknown>,
    private readonly opts: WorkServerOptions,
  ) {
    this.what = `${definition.name}.${method.name}`;
    this.queue = queueHandle(bus, spec);
  }

  async start(): Promise<void> {
    try {
      await this.bus.ensureQueue(this.spec);
    } catch (err) {
      // A replica that may not create queues waits for the scheduler to create it (see take()).
      if (!(err instanceof NoQueueError)) throw err;
      this.recheck = true;
    }
    this.puller = await this.bus.puller(this.spec, (m) => this.onDelivery(m));
    this.cancelSub = await this.bus.subscribe(cancelSubject(this.spec.subject), undefined, (m) => this.onCancel(m));
    // Direct calls: work a caller sends to this replica because it holds state the calls reuse.
    // They bypass take() and the room: the replica already owns them, and the driver sees them
    // through the handler like taken work.
    this.directSub = await this.bus.subscribe(directSubject(this.spec.subject, this.opts.instance), undefined, (m) =>
      this.onMessage(m, undefined),
    );
    this.unlisten = this.bus.onConnection((ev) => {
      if (ev === 'reconnected') this.recheck = true;
    });
    this.keepAlive = setInterval(() => this.confirmHeld(), Math.max(50, Math.floor(this.spec.settings.ackWaitMs / 4)));
    this.keepAlive.unref();
  }

  get closed(): boolean {
    return this.stopping;
  }

  /** Work taken and not yet answered. */
  get inFlight(): number {
    let n = 0;
    for (const h of this.held) n += h.open;
    return n;
  }

  /** No held call has run past its attempt time by more than the stuck grace. */
  get live(): boolean {
    const now = performance.now();
    for (const h of this.held) {
      if (h.open > 0 && now - h.takenAt > h.attemptMs + this.opts.stuckGraceMs) return false;
    }
    return true;
  }

  async take(room: () => number, waitMs: number, expect = 1): Promise<number> {
    if (this.stopping || !this.puller) return 0;
    const pause = this.pausedUntil - performance.now();
    if (pause > 0) {
      // It just said it cannot serve: let the other replicas take the work it gave back.
      await new Promise((r) => setTimeout(r, Math.min(pause, waitMs)));
      return -1;
    }
    if (this.recheck && !this.bus.connected) {
      // Nothing to ask while NATS is away; the reconnect checks again.
      await new Promise((r) => setTimeout(r, NO_QUEUE_POLL_MS));
      return 0;
    }
    if (this.recheck) {
      // The server may have restarted without our queue (memory storage): create it again.
      try {
        await this.bus.ensureQueue(this.spec);
        this.recheck = false;
      } catch (err) {
        // No queue yet is no error: the scheduler creates it with its first work.
        if (err instanceof NoQueueError) await new Promise((r) => setTimeout(r, NO_QUEUE_POLL_MS));
        else {
          this.opts.onError?.(err, this.method.name);
          await new Promise((r) => setTimeout(r, Math.min(waitMs, 1_000)));
        }
        return 0;
      }
    }
    let pending = -1;
    let first = true;
    this.roomFn = room;
    while (!this.stopping && room() > 0 && (first || pending > 0)) {
      const wait = first && waitMs > 0;
      const fits = Math.ceil(room() / this.perMessage);
      // Waiting: as many as are expected (what the last pass took, coming back), in one pull that
      // the server ends when they are all there or the wait is over. Not waiting: what is queued.
      const batch = wait
        ? Math.max(1, Math.min(MAX_PULL_BATCH, expect, fits))
        : Math.max(1, Math.min(MAX_PULL_BATCH, pending > 0 ? pending : MAX_PULL_BATCH, fits));
      first = false;
      this.taken = 0;
      this.roomBefore = room();
      const pull = this.puller.pull(batch, wait ? waitMs : 0);
      this.pulling = pull;
      let end;
      try {
        end = await pull;
      } catch (err) {
        this.opts.onError?.(err, this.method.name);
        this.recheck = true;
        return 0;
      } finally {
        this.pulling = null;
      }
      if (end.lost) this.recheck = true;
      pending = end.pending;
      if (this.taken === 0) break;
    }
    return Math.max(0, pending);
  }

  private onDelivery(m: QueuedMessage): void {
    this.onMessage(m, m);
    this.taken++;
    const after = this.roomFn();
    if (this.roomBefore - after > 0) this.perMessage = 0.7 * this.perMessage + 0.3 * (this.roomBefore - after);
    this.roomBefore = after;
  }

  /** Serves a work message: `queued` is the message taken from the queue, undefined for a direct one. */
  private onMessage(m: BusMessage, queued: QueuedMessage | undefined): void {
    if (this.stopping && queued) {
      queued.nak(); // another replica takes it now
      return;
    }
    const reply = m.headers[H_REPLY];
    let batch: WorkBatch;
    try {
      if (!reply) throw new Error(`no ${H_REPLY} header`);
      batch = WorkBatch.decode(m.data);
    } catch (err) {
      // Nobody to answer: drop it rather than have every replica choke on it in turn.
      queued?.ack();
      this.opts.onError?.(
        new InvalidArgumentError(`malformed ${this.what} work message dropped: ${(err as Error).message}`),
        this.method.name,
      );
      return;
    }
    if (this.stopping) {
      // A direct message to a stopping replica: the caller sends it through the queue at once.
      for (const item of batch.items) this.giveBackDirect(reply, item.id);
      return;
    }
    const attempt = Number(m.headers[H_TIMEOUT]);
    const held: Held = {
      msg: queued,
      reply,
      attemptMs: Number.isFinite(attempt) && attempt > 0 ? attempt : Number.POSITIVE_INFINITY,
      takenAt: performance.now(),
      items: new Map(),
      open: 0,
      giveBack: false,
    };
    if (queued && queued.deliveries > 1)
      this.opts.onWorkEvent?.({ kind: 'redelivered', method: this.method.name, calls: batch.items.length });
    const now = Date.now();
    const dropped = { cancelled: 0, deadline: 0 };
    const started: Array<() => void> = [];
    for (const item of batch.items) {
      // No deadline, or one further away than a timer can hold (about 24.8 days): none.
      const deadline =
        item.deadlineMs > 0n && Number(item.deadlineMs) - now <= MAX_TIMER_MS ? Number(item.deadlineMs) : Number.POSITIVE_INFINITY;
      if (this.cancelledIds.has(`${reply} ${item.id}`)) {
        dropped.cancelled++;
        continue;
      }
      if (now > deadline + DEADLINE_SLACK_MS) {
        dropped.deadline++;
        continue;
      }
      let request: unknown;
      try {
        request = this.method.requestType.decode(item.request);
      } catch (err) {
        this.answer(held, item.id, new InvalidArgumentError(`malformed ${this.what} request: ${(err as Error).message}`, { cause: err }));
        continue;
      }
      const controller = new AbortController();
      const timer = Number.isFinite(deadline)
        ? setTimeout(
            () => controller.abort(new DeadlineExceededError(`${this.what}: the caller's deadline passed`)),
            Math.max(0, deadline + DEADLINE_SLACK_MS - now),
          )
        : undefined;
      const entry: HeldItem = { controller, timer, settled: false };
      held.items.set(item.id, entry);
      held.open++;
      const ctx: CallContext = { signal: controller.signal, deadline, subject: this.spec.subject, method: this.method.name };
      started.push(() => {
        let p: Promise<unknown>;
        try {
          p = this.handler(request, ctx);
        } catch (err) {
          p = Promise.reject(err);
        }
        p.then(
          (res) => this.finish(held, item.id, entry, undefined, res),
          (err: unknown) => this.finish(held, item.id, entry, err),
        );
      });
    }
    if (dropped.cancelled > 0)
      this.opts.onWorkEvent?.({ kind: 'dropped', method: this.method.name, reason: 'cancelled', calls: dropped.cancelled });
    if (dropped.deadline > 0)
      this.opts.onWorkEvent?.({ kind: 'dropped', method: this.method.name, reason: 'deadline', calls: dropped.deadline });
    this.held.add(held);
    // Handlers run synchronously here, so the driver sees the work queued when take() returns.
    for (const run of started) run();
    if (held.open === 0) this.done(held);
  }

  private finish(held: Held, id: bigint, entry: HeldItem, err: unknown, res?: unknown): void {
    if (entry.settled) return;
    entry.settled = true;
    clearTimeout(entry.timer);
    const aborted = entry.controller.signal.aborted;
    if (aborted && (err instanceof CancelledError || err instanceof DeadlineExceededError)) {
      // The caller stopped waiting: no answer needed.
    } else if (err instanceof UnavailableError && !held.msg) {
      // A direct call this replica cannot serve: the caller sends it through the queue.
      this.giveBackDirect(held.reply, id);
      this.pausedUntil = performance.now() + this.spec.settings.ackWaitMs;
    } else if (err instanceof UnavailableError && held.msg !== undefined && held.msg.deliveries < this.spec.settings.maxDeliver) {
      // This replica cannot serve it (shutting down, its model worker died): another one may.
      held.giveBack = true;
    } else {
      this.answer(held, id, err, res);
    }
    held.open--;
    if (held.open === 0) this.done(held);
  }

  private answer(held: Held, id: bigint, err: unknown, res?: unknown): void {
    let result: WorkResult;
    if (err === undefined) {
      const response = this.method.responseType.encode(res, scratch).finish();
      const limit = Math.min(this.opts.maxPayload, this.bus.maxPayload()) - 64;
      if (response.length > limit) {
        err = new PayloadTooLargeError(`${this.what} answer is ${response.length} bytes, over the payload limit of ${limit} bytes`, {
          size: response.length,
          limit,
        });
      } else {
        result = { id, code: 0, response, message: '', kind: '', field: '', instance: this.opts.instance };
      }
    }
    if (err !== undefined) {
      const e = toDitpipeError(err);
      result = {
        id,
        code: e.code,
        response: new Uint8Array(0),
        message: truncate(e.message, MAX_STATUS_MESSAGE),
        kind: e.kind,
        field: errorField(e) ?? '',
        instance: this.opts.instance,
      };
    }
    const list = this.answers.get(held.reply);
    if (list) list.push(result!);
    else this.answers.set(held.reply, [result!]);
    this.scheduleFlush();
  }

  private giveBackDirect(reply: string, id: bigint): void {
    const list = this.givenBack.get(reply);
    if (list) list.push(id);
    else this.givenBack.set(reply, [id]);
    this.scheduleFlush();
  }

  private done(held: Held): void {
    this.toAck.push(held);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => this.flush());
  }

  /** Publishes the answers gathered this turn, one message per caller, then acknowledges. */
  private flush(): void {
    this.flushScheduled = false;
    const limit = Math.min(this.opts.maxPayload, this.bus.maxPayload()) - 64;
    for (const [reply, results] of this.answers) {
      let part: WorkResult[] = [];
      let bytes = 0;
      const publish = (): void => {
        if (part.length === 0) return;
        this.publishStatus(reply, { results: part, working: [], givenBack: [] });
        part = [];
        bytes = 0;
      };
      for (const r of results) {
        const size = r.response.length + r.message.length + 64;
        if (bytes + size > limit) publish();
        part.push(r);
        bytes += size;
      }
      publish();
    }
    this.answers.clear();
    this.publishGivenBack();
    for (const held of this.toAck.splice(0)) {
      if (!this.held.delete(held)) continue;
      if (!held.msg) continue; // direct: nothing to acknowledge
      if (held.giveBack) {
        held.msg.nak();
        this.pausedUntil = performance.now() + this.spec.settings.ackWaitMs;
      } else {
        held.msg.ack();
      }
    }
    if (this.held.size === 0) this.notifyIdle();
  }

  private publishGivenBack(): void {
    for (const [reply, ids] of this.givenBack) this.publishStatus(reply, { results: [], working: [], givenBack: ids });
    this.givenBack.clear();
  }

  /** Publishes a WorkResults to a caller (answers, heartbeats, give-backs); a failure is reported, not thrown. */
  private publishStatus(reply: string, results: WorkResults): void {
    try {
      this.bus.publish(reply, { data: WorkResults.encode(results, scratch).finish(), headers: {} });
    } catch (err) {
      this.opts.onError?.(err, this.method.name);
    }
  }

  private confirmHeld(): void {
    const now = performance.now();
    const working = new Map<string, bigint[]>();
    for (const h of this.held) {
      // Past its attempt time the queue may give it to another replica; this one still answers if it can.
      // A direct call past it gets no heartbeat either, so its caller sends it through the queue.
      if (now - h.takenAt > h.attemptMs) continue;
      if (h.msg) {
        h.msg.working();
        continue;
      }
      let ids = working.get(h.reply);
      for (const [id, entry] of h.items) {
        if (entry.settled) continue;
        if (ids) ids.push(id);
        else working.set(h.reply, (ids = [id]));
      }
    }
    for (const [reply, ids] of working) this.publishStatus(reply, { results: [], working: ids, givenBack: [] });
    const wall = Date.now();
    for (const [key, expires] of this.cancelledIds) {
      if (expires > wall) break;
      this.cancelledIds.delete(key);
    }
  }

  private onCancel(m: BusMessage): void {
    let notice: WorkCancel;
    try {
      notice = WorkCancel.decode(m.data);
    } catch {
      return;
    }
    const expires = Date.now() + CANCEL_MEMORY_MS;
    let dropped = 0;
    for (const id of notice.ids) {
      const key = `${notice.reply} ${id}`;
      this.cancelledIds.delete(key);
      this.cancelledIds.set(key, expires);
      for (const h of this.held) {
        if (h.reply !== notice.reply) continue;
        const entry = h.items.get(id);
        if (entry && !entry.settled) {
          entry.controller.abort(new CancelledError(`${this.what}: the caller stopped waiting`));
          dropped++;
        }
      }
    }
    while (this.cancelledIds.size > MAX_CANCEL_MEMORY) this.cancelledIds.delete(this.cancelledIds.keys().next().value as string);
    if (dropped > 0) this.opts.onWorkEvent?.({ kind: 'dropped', method: this.method.name, reason: 'cancelled', calls: dropped });
  }

  private notifyIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  /** Stops taking work; waits up to graceMs for held work, then gives the rest back to the queue. */
  async stop(graceMs: number): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    // Unsubscribing ends the pull in progress: the server no longer delivers to it.
    await this.puller?.close();
    await this.pulling?.catch(() => undefined);
    if (this.held.size > 0) await settledWithin(new Promise<void>((resolve) => this.idleWaiters.push(resolve)), graceMs);
    let given = 0;
    for (const h of this.held) {
      for (const [id, entry] of h.items) {
        if (entry.settled) continue;
        entry.settled = true;
        clearTimeout(entry.timer);
        entry.controller.abort(new UnavailableError(`${this.what}: replica stopped before answering (grace ${graceMs} ms)`));
        given++;
        if (!h.msg) this.giveBackDirect(h.reply, id);
      }
      h.msg?.nak();
    }
    this.held.clear();
    this.publishGivenBack();
    if (given > 0) this.opts.onWorkEvent?.({ kind: 'dropped', method: this.method.name, reason: 'stopping', calls: given });
    clearInterval(this.keepAlive);
    this.unlisten?.();
    // Until here a direct message was answered given_back at once (see onMessage); now callers
    // that still send here hear nothing and fall back after an ack wait.
    await this.directSub?.drain();
    this.publishGivenBack();
    await this.cancelSub?.drain();
  }
}

/** Pulls for a work method whose service has no driver of its own: keeps `concurrency` calls in flight. */
export function runSimpleDriver(
  source: WorkSource,
  concurrency: number,
  track: { inFlight: () => number; settled: () => Promise<void> },
): void {
  const idleWaitMs = 1_000;
  void (async () => {
    while (!source.closed) {
      if (track.inFlight() >= concurrency) {
        await track.settled();
        continue;
      }
      await source.take(() => concurrency - track.inFlight(), idleWaitMs);
    }
  })();
}
