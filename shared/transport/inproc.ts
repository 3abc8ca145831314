// In-process transport: the NATS binding's semantics without a NATS server, for `npm start`
// and tests.
//
//   const bus = new InProcBus();                 // plays the NATS server
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
// default; body plus headers) are refused. Serving, clients, retries and error encoding are the
// shared code in shared/transport/rpc.ts.
import { DeadlineExceededError, InvalidArgumentError, PayloadTooLargeError, UnavailableError } from '../errors.ts';
import { type Bus, type BusMessage, type BusSubscription, BusTransport, headerBytes } from './rpc.ts';
import type { Transport } from './types.ts';

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
    const member: Member = { name, closed: false, waiting: new Set() };
    let resolveClosed: (v: Error | null) => void = () => undefined;
    const closed = new Promise<Error | null>((resolve) => {
      resolveClosed = resolve;
    });
    return new BusTransport('inproc', this.busFor(member), async () => {
      member.closed = true;
      for (const list of this.subs.values()) {
        for (const s of list) if (s.member === member) this.remove(s);
      }
      for (const reject of member.waiting) reject(new UnavailableError(`connection ${name} closed`));
      member.waiting.clear();
      resolveClosed(null);
    }, closed);
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

  private busFor(member: Member): Bus {
    const checkOpen = (subject: string): void => {
      if (member.closed) throw new UnavailableError(`request on ${subject} failed: connection ${member.name} closed`);
    };
    return {
      maxPayload: () => this.maxPayload,

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
          const timer = setTimeout(() => {
            if (done) return;
            finish();
            resolve(out);
          }, Math.max(1, Math.ceil(waitMs)));
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
    };
  }
}
