// The message-bus primitives a transport provides (NATS in nats.ts, the in-process bus in
// inproc.ts). Everything above them — RPC serving and clients (rpc.ts), work queues (work.ts) —
// is shared code, so both transports behave the same by construction.
import type { QueueSettings } from './types.ts';

export type Headers = Record<string, string>;

export interface BusMessage {
  data: Uint8Array;
  headers: Headers;
}

export interface BusSubscription {
  /** Stops receiving; resolves once every message already received was handed to the handler. */
  drain(): Promise<void>;
}

/** A work queue: a stream capturing one subject, read by one durable pull consumer. */
export interface QueueSpec {
  readonly stream: string;
  readonly subject: string;
  readonly consumer: string;
  readonly settings: QueueSettings;
}

/** A message delivered from a work queue to a pull. */
export interface QueuedMessage extends BusMessage {
  /** 1 on the first delivery, more after redeliveries. */
  readonly deliveries: number;
  /** Messages still waiting in the queue (not yet delivered) when this one was delivered. */
  readonly pending: number;
  /** Done: removes it from the queue. */
  ack(): void;
  /** Still working on it: restarts its ack wait. */
  working(): void;
  /** Gives it back now, for another delivery. */
  nak(): void;
}

/** How a pull request ended. */
export interface PullEnd {
  /** Messages it delivered. */
  delivered: number;
  /** Messages still waiting in the queue as last known (0 when the queue was empty). */
  pending: number;
  /** No answer from the server in time (e.g. it lost the consumer): check the queue exists. */
  lost: boolean;
}

/** A replica's pull consumer of one queue: sends one pull request at a time. */
export interface Puller {
  /**
   * One pull request for up to `batch` messages: with waitMs 0 it takes only what is queued now,
   * else it waits up to waitMs for the batch to fill. Messages it delivers go to the puller's
   * onMessage, also those arriving after the request ended (a connection loss can cause that).
   */
  pull(batch: number, waitMs: number): Promise<PullEnd>;
  /** Stops receiving (ends a pull in progress). */
  close(): Promise<void>;
}

export type ConnectionEvent = 'disconnected' | 'reconnected' | 'closed';

/** The primitives a transport provides. */
export interface Bus {
  /** Largest message (body plus encoded headers) the bus accepts right now, in bytes. */
  maxPayload(): number;
  /** Whether the connection is up. */
  readonly connected: boolean;
  /** A fresh reply subject of this connection (NATS: under its inbox prefix). */
  inbox(): string;
  /**
   * Sends a request and resolves with the first reply. Rejects with UnavailableError when nobody
   * subscribes to the subject (or the connection is gone) and DeadlineExceededError after timeoutMs.
   */
  request(subject: string, msg: BusMessage, timeoutMs: number): Promise<BusMessage>;
  /** Sends a request and resolves with all replies that arrive within waitMs ([] when nobody listens). */
  requestMany(subject: string, msg: BusMessage, waitMs: number): Promise<BusMessage[]>;
  /** Publishes without waiting for anything (replies, notices). */
  publish(subject: string, msg: BusMessage): void;
  /** Subscribes (in a queue group when given); resolves once the subscription is in effect. */
  subscribe(
    subject: string,
    queue: string | undefined,
    handler: (msg: BusMessage, reply: (msg: BusMessage) => void) => void,
  ): Promise<BusSubscription>;
  /**
   * Creates the queue's stream and consumer, or updates them to `spec.settings`; idempotent, so
   * every service may call it at start. Rejects with FailedPreconditionError when the server has
   * no JetStream.
   */
  ensureQueue(spec: QueueSpec): Promise<void>;
  /**
   * Appends a message to the queue's stream; resolves once stored. A message with the id of one
   * stored within the duplicate window is stored once. Rejects with ResourceExhaustedError when
   * the stream is full and UnavailableError when there is no such stream or no connection.
   */
  enqueue(spec: QueueSpec, msg: BusMessage, id: string): Promise<void>;
  /** A pull consumer of the queue (shared by the replicas through the queue's durable consumer). */
  puller(spec: QueueSpec, onMessage: (msg: QueuedMessage) => void): Promise<Puller>;
  /** Live counts of the queue. */
  queueInfo(spec: QueueSpec): Promise<{ pending: number; ackPending: number; waitingPulls: number }>;
  /** Calls listener on connection changes; returns the unsubscribe function. */
  onConnection(listener: (event: ConnectionEvent) => void): () => void;
}

export const H_STATUS = 'Ditpipe-Status';
export const H_MESSAGE = 'Ditpipe-Message';
export const H_KIND = 'Ditpipe-Error';
export const H_FIELD = 'Ditpipe-Field';
export const H_TIMEOUT = 'Ditpipe-Timeout-Ms';
export const H_REPLY = 'Ditpipe-Reply';

const encoder = new TextEncoder();

/** Bytes NATS uses for these headers ("NATS/1.0\r\n", "Key: value\r\n" each, "\r\n"); 0 for none. */
export function headerBytes(headers: Headers): number {
  const keys = Object.keys(headers);
  if (keys.length === 0) return 0;
  let n = 'NATS/1.0\r\n'.length + 2;
  for (const k of keys) n += encoder.encode(`${k}: ${headers[k]}\r\n`).length;
  return n;
}
