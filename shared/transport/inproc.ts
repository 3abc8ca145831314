// In-process transport: the NATS binding's semantics without a NATS server, for `npm start`
// and tests.
//
//   const bus = new InProcBus();                 // plays the NATS server (with JetStream)
//   const a = bus.connect('denoiser-0');         // plays one process's connection: a Transport
//   const b = bus.connect('scheduler');
//   await a.serve(DenoiserDefinition, impl, { scope: 'dit-s2' });
//   const denoiser = b.client(DenoiserDefinition, { scope: 'dit-s2' });
//
// Same as NATS, on purpose: messages are bytes (requests and replies are protobuf-encoded and
// decoded, and byte buffers are copied, so nothing is shared between caller and handler);
// delivery is asynchronous; subscribers in one queue group share a subject (round-robin here,
// random in NATS), and every non-queue subscriber gets its own copy; a request nobody subscribes
// to fails at once with UnavailableError ("no responders"); a request without a reply in time
// fails with DeadlineExceededError; messages over the bus's maxPayload (default 1 MiB, NATS's
// default; body plus headers) are refused. Work queues behave as JetStream work-queue streams
// with one durable pull consumer: limits (RESOURCE_EXHAUSTED when full, discard new), duplicate
// ids stored once, pull requests served in arrival order (no_wait, or waiting up to an expiry),
// redeliveries before new messages, in-progress acks, redelivery after the ack wait (up to
// maxDeliver deliveries), and a closed connection's unacknowledged messages redelivered after
// their ack wait, as a dead process's would be. Serving, clients, retries, work queues and error
// encoding are the shared code in rpc.ts and work.ts.
import {
  DeadlineExceededError,
  InvalidArgumentError,
  NoQueueError,
  PayloadTooLargeError,
  ResourceExhaustedError,
  UnavailableError,
} from '../errors.ts';
import {
  type Bus,
  type BusMessage,
  type BusSubscription,
  type ConnectionEvent,
  headerBytes,
  type PullEnd,
  type Puller,
  type QueuedMessage,
  type QueueSpec,
} from './bus.ts';
import { BusTransport } from './rpc.ts';
import type { QueueSettings, Transport } from './types.ts';

type Handler = (msg: BusMessage, reply: (msg: BusMessage) => void) => void;

interface Sub {
  readonly subject: string;
  readonly queue: string | undefined;
  readonly handler: Handler;
  readonly member: Member;
  /** Still receiving new messages. */
  active: boolean;
  /** Messages handed to this subscription whose handler has not run yet. */
  pending: number;
  onIdle: Array<() => void>;
}

interface Member {
  readonly name: string;
  closed: boolean;
  /** Rejectors of this member's requests still waiting for a reply. */
  readonly waiting: Set<(err: Error) => void>;
  readonly listeners: Set<(event: ConnectionEvent) => void>;
  readonly pullers: Set<InProcPuller>;
}

interface Stored {
  readonly seq: number;
  readonly data: Uint8Array;
  readonly headers: Record<string, string>;
  readonly storedAt: number;
  deliveries: number;
}

/** A delivered, unacknowledged message. */
interface Unacked {
  readonly msg: Stored;
  timer: NodeJS.Timeout;
}

interface WaitingPull {
  readonly puller: InProcPuller;
  readonly batch: number;
  delivered: number;
  readonly resolve: (end: PullEnd) => void;
  timer: NodeJS.Timeout | undefined;
}

interface Stream {
  readonly name: string;
  subject: string;
  settings: QueueSettings;
  consumer: string;
  bytes: number;
  /** Stored messages by sequence. */
  readonly messages: Map<number, Stored>;
  /** Never delivered yet, in order. */
  readonly fresh: number[];
  /** Due for another delivery (nak'd, ack wait passed), in order. */
  readonly again: number[];
  readonly unacked: Map<number, Unacked>;
  readonly waiting: WaitingPull[];
  /** Message id → time stored, for duplicate detection. */
  readonly ids: Map<string, number>;
  seq: number;
}

function copy(msg: BusMessage): BusMessage {
  return { data: msg.data.slice(), headers: { ...msg.headers } };
}

export interface InProcBusOptions {
  /** Largest message (body plus headers) in bytes; default 1 MiB like a default nats-server. */
  maxPayload?: number;
}

/** A message bus inside one process; `connect()` gives one Transport per simulated process. */
export class InProcBus {
  readonly maxPayload: number;
  private readonly subs = new Map<string, Sub[]>();
  private readonly cursors = new Map<string, number>();
  private readonly streams = new Map<string, Stream>();
  private readonly severs = new WeakMap<Transport, () => void>();
  private inboxSeq = 0;

  constructor(opts: InProcBusOptions = {}) {
    const max = opts.maxPayload ?? 1024 * 1024;
    if (!(Number.isInteger(max) && max > 0)) {
      throw new InvalidArgumentError(`maxPayload must be a positive integer, got ${String(opts.maxPayload)}`, {
        field: 'maxPayload',
      });
    }
    this.maxPayload = max;
  }

  /** Subscriptions on this bus right now (for leak checks in tests). */
  get subscriptionCount(): number {
    let n = 0;
    for (const list of this.subs.values()) n += list.length;
    return n;
  }

  /** A new member of the bus, like a new NATS connection. */
  connect(name = 'inproc'): Transport {
    const member: Member = { name, closed: false, waiting: new Set(), listeners: new Set(), pullers: new Set() };
    let resolveClosed: (v: Error | null) => void = () => undefined;
    const closed = new Promise<Error | null>((resolve) => {
      resolveClosed = resolve;
    });
    const sever = (): void => {
      if (member.closed) return;
      member.closed = true;
      for (const list of this.subs.values()) {
        for (const s of list) if (s.member === member) this.remove(s);
      }
      for (const p of member.pullers) p.detach();
      for (const reject of member.waiting) reject(new UnavailableError(`connection ${name} closed`));
      member.waiting.clear();
      for (const l of member.listeners) l('closed');
      resolveClosed(null);
    };
    const transport = new BusTransport(
      'inproc',
      this.busFor(member),
      async () => {
        sever();
        return { drained: true };
      },
      closed,
    );
    this.severs.set(transport, sever);
    return transport;
  }

  /**
   * Cuts a member off as if its process died: no shutdown, nothing more sent, its unacknowledged
   * work redelivered after the ack wait (for fault tests).
   */
  kill(transport: Transport): void {
    this.severs.get(transport)?.();
  }

  private remove(sub: Sub): void {
    sub.active = false;
    const list = this.subs.get(sub.subject);
    if (!list) return;
    const i = list.indexOf(sub);
    if (i >= 0) list.splice(i, 1);
    if (list.length === 0) this.subs.delete(sub.subject);
  }

  private checkSize(msg: BusMessage, what: string): void {
    const size = msg.data.length + headerBytes(msg.headers);
    if (size > this.maxPayload) {
      throw new PayloadTooLargeError(`${what} of ${size} bytes exceeds the bus max_payload of ${this.maxPayload} bytes`, {
        size,
        limit: this.maxPayload,
      });
    }
  }

  /** Picks the recipients as NATS does: every plain subscriber, one member per queue group. */
  private recipients(subject: string): Sub[] {
    const list = this.subs.get(subject);
    if (!list) return [];
    const out: Sub[] = [];
    const groups = new Map<string, Sub[]>();
    for (const s of list) {
      if (!s.active) continue;
      if (s.queue === undefined) out.push(s);
      else {
        const g = groups.get(s.queue);
        if (g) g.push(s);
        else groups.set(s.queue, [s]);
      }
    }
    for (const [queue, members] of groups) {
      const key = `${subject}\u0000${queue}`;
      const cursor = this.cursors.get(key) ?? 0;
      out.push(members[cursor % members.length]);
      this.cursors.set(key, cursor + 1);
    }
    return out;
  }

  private deliver(sub: Sub, msg: BusMessage, reply: (m: BusMessage) => void): void {
    sub.pending++;
    const m = copy(msg);
    setImmediate(() => {
      sub.pending--;
      // As in NATS, a message already routed to a draining subscription is still delivered.
      if (!sub.member.closed) {
        sub.handler(m, (r) => {
          // A closed connection cannot publish: its reply is lost, as with NATS.
          if (sub.member.closed) throw new UnavailableError(`connection ${sub.member.name} closed; reply not sent`);
          reply(r);
        });
      }
      if (sub.pending === 0 && sub.onIdle.length > 0) {
        const waiters = sub.onIdle;
        sub.onIdle = [];
        for (const w of waiters) w();
      }
    });
  }

  // -- work queues --------------------------------------------------------------------------

  private ensure(spec: QueueSpec): void {
    const existing = this.streams.get(spec.stream);
    if (existing) {
      existing.subject = spec.subject;
      existing.settings = spec.settings;
      existing.consumer = spec.consumer;
      return;
    }
    this.streams.set(spec.stream, {
      name: spec.stream,
      subject: spec.subject,
      settings: spec.settings,
      consumer: spec.consumer,
      bytes: 0,
      messages: new Map(),
      fresh: [],
      again: [],
      unacked: new Map(),
      waiting: [],
      ids: new Map(),
      seq: 0,
    });
  }

  private streamFor(spec: QueueSpec): Stream {
    const s = this.streams.get(spec.stream);
    if (!s || s.subject !== spec.subject) throw new NoQueueError(`no work queue captures ${spec.subject} on the bus`);
    return s;
  }

  private store(spec: QueueSpec, msg: BusMessage, id: string): void {
    const s = this.streamFor(spec);
    this.expire(s);
    const now = Date.now();
    for (const [key, at] of s.ids) {
      if (now - at <= s.settings.duplicateWindowMs) break;
      s.ids.delete(key);
    }
    if (s.ids.has(id)) return;
    const size = msg.data.length + headerBytes(msg.headers);
    if (s.messages.size + 1 > s.settings.maxMessages)
      throw new ResourceExhaustedError(`work queue for ${spec.subject} is full (maximum messages exceeded); retry later`);
    if (s.bytes + size > s.settings.maxBytes)
      throw new ResourceExhaustedError(`work queue for ${spec.subject} is full (maximum bytes exceeded); retry later`);
    const seq = ++s.seq;
    const m = copy(msg);
    s.messages.set(seq, { seq, data: m.data, headers: m.headers, storedAt: now, deliveries: 0 });
    s.bytes += size;
    s.fresh.push(seq);
    s.ids.set(id, now);
    this.dispatch(s);
  }

  private drop(s: Stream, seq: number): void {
    const m = s.messages.get(seq);
    if (!m) return;
    s.messages.delete(seq);
    s.bytes -= m.data.length + headerBytes(m.headers);
    const u = s.unacked.get(seq);
    if (u) {
      clearTimeout(u.timer);
      s.unacked.delete(seq);
    }
  }

  /** Removes messages older than maxAge (as JetStream's limit does). */
  private expire(s: Stream): void {
    const old = Date.now() - s.settings.maxAgeMs;
    for (const [seq, m] of s.messages) {
      if (m.storedAt >= old) break;
      this.drop(s, seq);
    }
  }

  private available(s: Stream): number {
    return s.again.length + s.fresh.length;
  }

  /** Next message to deliver: redeliveries first, skipping removed ones. */
  private takeNext(s: Stream): Stored | undefined {
    for (const list of [s.again, s.fresh]) {
      while (list.length > 0) {
        const seq = list.shift() as number;
        const m = s.messages.get(seq);
        if (m && !s.unacked.has(seq)) return m;
      }
    }
    return undefined;
  }

  /** Serves waiting pull requests, oldest first, while messages are available. */
  private dispatch(s: Stream): void {
    this.expire(s);
    while (s.waiting.length > 0 && this.available(s) > 0 && s.unacked.size < s.settings.maxAckPending) {
      const w = s.waiting[0];
      const m = this.takeNext(s);
      if (!m) break;
      this.hand(s, w.puller, m);
      w.delivered++;
      if (w.delivered >= w.batch) {
        s.waiting.shift();
        this.endPull(s, w);
      }
    }
  }

  private endPull(s: Stream, w: WaitingPull): void {
    clearTimeout(w.timer);
    const i = s.waiting.indexOf(w);
    if (i >= 0) s.waiting.splice(i, 1);
    const end: PullEnd = { delivered: w.delivered, pending: this.available(s), lost: false };
    setImmediate(() => w.resolve(end));
  }

  /** Delivers one message to a puller and starts its ack wait. */
  private hand(s: Stream, puller: InProcPuller, m: Stored): void {
    m.deliveries++;
    const pending = this.available(s);
    const seq = m.seq;
    const u: Unacked = { msg: m, timer: setTimeout(() => this.timeout(s, seq), s.settings.ackWaitMs) };
    s.unacked.set(seq, u);
    const body = copy(m);
    const live = (): boolean => s.unacked.get(seq) === u;
    const delivered: QueuedMessage = {
      data: body.data,
      headers: body.headers,
      deliveries: m.deliveries,
      pending,
      ack: () => {
        if (!live() || puller.dead) return;
        this.drop(s, seq);
        this.dispatch(s);
      },
      working: () => {
        if (!live() || puller.dead) return;
        clearTimeout(u.timer);
        u.timer = setTimeout(() => this.timeout(s, seq), s.settings.ackWaitMs);
      },
      nak: () => {
        if (!live() || puller.dead) return;
        clearTimeout(u.timer);
        s.unacked.delete(seq);
        this.requeue(s, m);
      },
    };
    setImmediate(() => puller.receive(delivered));
  }

  private timeout(s: Stream, seq: number): void {
    const u = s.unacked.get(seq);
    if (!u) return;
    s.unacked.delete(seq);
    this.requeue(s, u.msg);
  }

  private requeue(s: Stream, m: Stored): void {
    if (!s.messages.has(m.seq)) return;
    if (m.deliveries >= s.settings.maxDeliver) {
      // JetStream stops delivering it; here it is simply dropped.
      this.drop(s, m.seq);
      return;
    }
    s.again.push(m.seq);
    this.dispatch(s);
  }

  pull(spec: QueueSpec, puller: InProcPuller, batch: number, waitMs: number): Promise<PullEnd> {
    const s = this.streams.get(spec.stream);
    if (!s) return Promise.resolve({ delivered: 0, pending: 0, lost: true });
    return new Promise<PullEnd>((resolve) => {
      const w: WaitingPull = { puller, batch, delivered: 0, resolve, timer: undefined };
      s.waiting.push(w);
      this.dispatch(s);
      if (!s.waiting.includes(w)) return; // filled at once
      if (waitMs <= 0) {
        this.endPull(s, w);
        return;
      }
      w.timer = setTimeout(() => this.endPull(s, w), waitMs);
      puller.onEnd = () => this.endPull(s, w);
    });
  }

  private info(spec: QueueSpec): { pending: number; ackPending: number; waitingPulls: number } {
    const s = this.streamFor(spec);
    this.expire(s);
    return { pending: this.available(s), ackPending: s.unacked.size, waitingPulls: s.waiting.length };
  }

  private busFor(member: Member): Bus {
    const checkOpen = (subject: string): void => {
      if (member.closed) throw new UnavailableError(`request on ${subject} failed: connection ${member.name} closed`);
    };
    return {
      maxPayload: () => this.maxPayload,

      get connected() {
        return !member.closed;
      },

      inbox: () => `_INBOX.${member.name}.${++this.inboxSeq}`,

      onConnection: (listener) => {
        member.listeners.add(listener);
        return () => member.listeners.delete(listener);
      },

      request: (subject, msg, timeoutMs) =>
        new Promise<BusMessage>((resolve, reject) => {
          checkOpen(subject);
          this.checkSize(msg, `request on ${subject}`);
          const targets = this.recipients(subject);
          if (targets.length === 0) {
            setImmediate(() => reject(new UnavailableError(`no responders on ${subject}`)));
            return;
          }
          let done = false;
          const finish = (): void => {
            done = true;
            clearTimeout(timer);
            member.waiting.delete(fail);
          };
          const fail = (err: Error): void => {
            if (done) return;
            finish();
            reject(err);
          };
          const timer = setTimeout(
            () => fail(new DeadlineExceededError(`no reply on ${subject} within ${Math.round(timeoutMs)} ms`)),
            Math.max(1, Math.ceil(timeoutMs)),
          );
          member.waiting.add(fail);
          const reply = (r: BusMessage): void => {
            this.checkSize(r, `reply on ${subject}`);
            if (done) return;
            finish();
            const m = copy(r);
            setImmediate(() => resolve(m));
          };
          for (const s of targets) this.deliver(s, msg, reply);
        }),

      requestMany: (subject, msg, waitMs) =>
        new Promise<BusMessage[]>((resolve, reject) => {
          checkOpen(subject);
          this.checkSize(msg, `request on ${subject}`);
          const targets = this.recipients(subject);
          const out: BusMessage[] = [];
          if (targets.length === 0) {
            setImmediate(() => resolve(out));
            return;
          }
          let done = false;
          const finish = (): void => {
            done = true;
            clearTimeout(timer);
            member.waiting.delete(fail);
          };
          const fail = (err: Error): void => {
            if (done) return;
            finish();
            reject(err);
          };
          // Like NATS's timer strategy, but ends early once every recipient answered.
          const timer = setTimeout(
            () => {
              if (done) return;
              finish();
              resolve(out);
            },
            Math.max(1, Math.ceil(waitMs)),
          );
          member.waiting.add(fail);
          for (const s of targets) {
            let answered = false;
            this.deliver(s, msg, (r) => {
              this.checkSize(r, `reply on ${subject}`);
              if (done || answered) return;
              answered = true;
              out.push(copy(r));
              if (out.length === targets.length) {
                finish();
                setImmediate(() => resolve(out));
              }
            });
          }
        }),

      publish: (subject, msg) => {
        checkOpen(subject);
        this.checkSize(msg, `message on ${subject}`);
        for (const s of this.recipients(subject)) this.deliver(s, msg, () => undefined);
      },

      subscribe: async (subject, queue, handler): Promise<BusSubscription> => {
        if (member.closed) throw new UnavailableError(`cannot subscribe to ${subject}: connection ${member.name} closed`);
        const sub: Sub = { subject, queue, handler, member, active: true, pending: 0, onIdle: [] };
        const list = this.subs.get(subject);
        if (list) list.push(sub);
        else this.subs.set(subject, [sub]);
        return {
          drain: () => {
            this.remove(sub);
            if (sub.pending === 0) return Promise.resolve();
            return new Promise<void>((resolve) => sub.onIdle.push(resolve));
          },
        };
      },

      ensureQueue: async (spec) => {
        checkOpen(spec.subject);
        this.ensure(spec);
      },

      enqueue: (spec, msg, id) =>
        new Promise<void>((resolve, reject) => {
          try {
            checkOpen(spec.subject);
            this.checkSize(msg, `message on ${spec.subject}`);
            this.store(spec, msg, id);
            setImmediate(resolve);
          } catch (err) {
            setImmediate(() => reject(err as Error));
          }
        }),

      puller: async (spec, onMessage) => {
        checkOpen(spec.subject);
        const p = new InProcPuller(this, spec, member, onMessage);
        member.pullers.add(p);
        return p;
      },

      queueInfo: async (spec) => this.info(spec),
    };
  }
}

/** A member's pull consumer of one queue. */
class InProcPuller implements Puller {
  closed = false;
  /** Its connection is gone: acknowledgements no longer reach the queue. */
  get dead(): boolean {
    return this.member.closed;
  }
  /** Ends the pull in progress early (set while one waits). */
  onEnd: (() => void) | undefined;

  constructor(
    private readonly bus: InProcBus,
    private readonly spec: QueueSpec,
    private readonly member: Member,
    private readonly onMessage: (msg: QueuedMessage) => void,
  ) {}

  pull(batch: number, waitMs: number): Promise<PullEnd> {
    if (this.closed) return Promise.resolve({ delivered: 0, pending: 0, lost: false });
    return this.bus.pull(this.spec, this, batch, waitMs).finally(() => {
      this.onEnd = undefined;
    });
  }

  receive(msg: QueuedMessage): void {
    // A closed connection's messages stay unacknowledged until their ack wait passes.
    if (!this.closed) this.onMessage(msg);
  }

  /** The connection closed: stop receiving; held messages are redelivered after their ack wait. */
  detach(): void {
    this.closed = true;
    this.onEnd?.();
  }

  async close(): Promise<void> {
    this.detach();
    this.member.pullers.delete(this);
  }
}
