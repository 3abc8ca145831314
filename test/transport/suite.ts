// One transport test suite, run against a real nats-server with JetStream (nats.test.ts) and the
// in-process bus (inproc.test.ts): both must give the same work-queue (pull, redelivery, cancel,
// limits), control-call (request/reply, collect, retries), error, deadline, payload-limit and
// drain behaviour.
import { afterEach, describe, expect, it } from 'vitest';

import {
  CancelledError,
  Code,
  DeadlineExceededError,
  InternalError,
  InvalidArgumentError,
  NotFoundError,
  PayloadTooLargeError,
  ResourceExhaustedError,
  UnavailableError,
} from '../../shared/errors.ts';
import { DType, Tensor } from '../../shared/gen/ditpipe/v1/tensor.ts';
import { DenoiseRequest, DenoiseResponse, DenoiserDefinition, DenoiserInfo } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { GenerateRequest, ListModelsResponse, SamplerDefinition } from '../../shared/gen/ditpipe/v1/sampler.ts';
import type {
  CallContext,
  ClientOptions,
  ClientWorkEvent,
  QueueSettings,
  ServeOptions,
  ServiceImpl,
  Transport,
  WorkEvent,
} from '../../shared/transport/types.ts';

export interface Harness {
  /** Bus-wide payload limit the harness was set up with (server max_payload). */
  readonly maxPayload: number;
  /** A new connection (a simulated process). */
  connect(name: string): Promise<Transport>;
  /** Ends a connection the way a killed process does: nothing more sent, nothing acknowledged. */
  kill(t: Transport): Promise<void>;
}

/** Small queues with a short ack wait, so redelivery shows within a test. */
export const TEST_QUEUE: Partial<QueueSettings> = { ackWaitMs: 400, maxBytes: 4 * 1024 * 1024, maxDeliver: 4 };
const QUEUE = TEST_QUEUE;

let scopes = 0;
/** Every test gets its own model scope, hence its own work queue: nothing leaks between tests. */
function freshScope(): string {
  return `dit-test-${process.pid}-${++scopes}`;
}

function floatTensor(values: number[], shape: number[]): Tensor {
  return Tensor.create({ shape, dtype: DType.DTYPE_FLOAT32, data: new Uint8Array(new Float32Array(values).buffer) });
}

function floats(t: Tensor | undefined): number[] {
  if (!t) throw new Error('missing tensor');
  return Array.from(new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength)));
}

function request(n = 2, bytes?: number, tag = ''): DenoiseRequest {
  const x =
    bytes === undefined
      ? floatTensor(
          Array.from({ length: n * 4 }, (_, i) => i / 4),
          [n, 4, 1, 1],
        )
      : Tensor.create({ shape: [bytes / 4], dtype: DType.DTYPE_FLOAT32, data: new Uint8Array(bytes) });
  return DenoiseRequest.create({
    model: 'm',
    x,
    t: Array.from({ length: n }, (_, i) => BigInt(999 - i)),
    y: Array.from({ length: n }, (_, i) => i),
    cfgScale: 4,
    requestId: tag,
  });
}

/** A deferred promise. */
function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve: (v: T) => void = () => undefined;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** Resolves when signal aborts (never otherwise): a handler that hangs until its caller gives up. */
function untilAborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    signal.addEventListener('abort', () => reject(signal.reason instanceof Error ? signal.reason : new Error('aborted')), { once: true });
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Denoiser implementation doubling x and counting calls; `before` may delay or fail a call. */
function doubler(
  id: string,
  before?: (req: DenoiseRequest, ctx: CallContext, call: number) => Promise<void> | void,
): ServiceImpl<typeof DenoiserDefinition> & { calls: number; contexts: CallContext[]; tags: string[] } {
  const impl = {
    calls: 0,
    contexts: [] as CallContext[],
    tags: [] as string[],
    async denoise(req: DenoiseRequest, ctx: CallContext): Promise<DenoiseResponse> {
      impl.calls++;
      impl.contexts.push(ctx);
      impl.tags.push(req.requestId);
      await before?.(req, ctx, impl.calls);
      if (req.requestId.startsWith('huge:')) {
        const n = Number(req.requestId.slice(5));
        return DenoiseResponse.create({ out: Tensor.create({ shape: [n / 4], dtype: DType.DTYPE_FLOAT32, data: new Uint8Array(n) }) });
      }
      const x = req.x ?? Tensor.create({});
      return DenoiseResponse.create({
        out: floatTensor(
          floats(x).map((v) => 2 * v),
          x.shape,
        ),
        batchRows: req.t.length,
        queueMs: Number(req.t[0] ?? 0n),
      });
    },
    info(): DenoiserInfo {
      return DenoiserInfo.create({ model: 'm', instanceId: id, params: 123_456_789_012n });
    },
  };
  return impl;
}

export function transportSuite(name: string, getHarness: () => Harness): void {
  describe(`transport: ${name}`, () => {
    const open: Transport[] = [];
    const connect = async (who: string): Promise<Transport> => {
      const t = await getHarness().connect(who);
      open.push(t);
      return t;
    };
    afterEach(async () => {
      await Promise.all(open.splice(0).map((t) => t.close({ graceMs: 100 })));
    });
    let scope = '';
    const serveOpts = (over: Partial<ServeOptions> = {}): ServeOptions => ({ scope, queueSettings: QUEUE, ...over });
    const clientOpts = (over: Partial<ClientOptions> = {}): ClientOptions => ({ scope, queueSettings: QUEUE, ...over });
    const fresh = (): string => {
      scope = freshScope();
      return scope;
    };

    it('work roundtrips messages, bigints and the caller deadline through the queue; control calls by request/reply', async () => {
      fresh();
      const server = await connect('server');
      const client = await connect('client');
      const impl = doubler('a');
      const srv = await server.serve(DenoiserDefinition, impl, serveOpts());
      expect(srv.instance).toMatch(/^[0-9a-f]{32}$/);
      // Denoise is work (IDEMPOTENT): a queue, not a subscription. Info (NO_SIDE_EFFECTS) is asked of every replica.
      expect(srv.subjects).toEqual([`ditpipe.v1.denoiser.${scope}.info.all`]);
      expect(srv.queues.denoise).toMatchObject({
        stream: `ditpipe_v1_denoiser_${scope}`,
        consumer: 'denoiser',
        subject: `ditpipe.v1.denoiser.${scope}.denoise`,
      });
      const denoiser = client.client(DenoiserDefinition, clientOpts({ timeoutMs: 5_000 }));
      expect(denoiser.subjectOf('denoise')).toBe(`ditpipe.v1.denoiser.${scope}.denoise`);
      expect(denoiser.queueOf('denoise').stream).toBe(`ditpipe_v1_denoiser_${scope}`);
      const before = Date.now();
      const res = await denoiser.denoise(request(3));
      expect(floats(res.out)).toEqual(Array.from({ length: 12 }, (_, i) => i / 2));
      expect(res.out?.shape).toEqual([3, 4, 1, 1]);
      expect(res.batchRows).toBe(3);
      expect(res.queueMs).toBe(999);
      const ctx = impl.contexts[0];
      expect(ctx.subject).toBe(`ditpipe.v1.denoiser.${scope}.denoise`);
      expect(ctx.method).toBe('Denoise');
      expect(ctx.deadline).toBeGreaterThan(before + 4_000);
      expect(ctx.deadline).toBeLessThanOrEqual(Date.now() + 5_000);
      const info = await denoiser.info({});
      expect(info.params).toBe(123_456_789_012n);
      expect(srv.inFlight).toBe(0);
      // Acknowledged: nothing is left in the queue.
      await expect.poll(() => denoiser.queueOf('denoise').info()).toMatchObject({ pending: 0, ackPending: 0 });
    });

    it('work waits in the queue until a replica pulls it, and a replica takes only what it can start', async () => {
      fresh();
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000 }));
      // No replica yet: the calls wait (the client created the queue). Sent apart, one message each.
      const calls: Array<Promise<DenoiseResponse>> = [];
      for (let i = 0; i < 6; i++) {
        calls.push(client.denoise(request(1, undefined, `c${i}`)));
        await sleep(5);
      }
      await expect.poll(() => client.queueOf('denoise').info()).toMatchObject({ pending: 6 });
      // One call at a time per replica (concurrency 1): a slow handler holds one message, the rest wait in the queue.
      const gate = deferred();
      const a = doubler('a', () => gate.promise);
      await (await connect('a')).serve(DenoiserDefinition, a, serveOpts());
      await expect.poll(() => a.calls).toBe(1);
      await sleep(100);
      expect(a.calls).toBe(1);
      expect((await client.queueOf('denoise').info()).pending).toBe(5);
      gate.resolve();
      const results = await Promise.all(calls);
      expect(results.map((r) => r.batchRows)).toEqual(Array(6).fill(1));
      expect(a.tags.sort()).toEqual(['c0', 'c1', 'c2', 'c3', 'c4', 'c5']);
    });

    it('shares work between replicas by their speed: a replica that is busy takes nothing', async () => {
      fresh();
      const fast = doubler('fast', () => sleep(5));
      const slow = doubler('slow', () => sleep(40));
      await (await connect('fast')).serve(DenoiserDefinition, fast, serveOpts());
      await (await connect('slow')).serve(DenoiserDefinition, slow, serveOpts());
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 20_000 }));
      // 8 callers in a closed loop, each call its own message.
      let sent = 0;
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          while (sent < 80) {
            sent++;
            await denoiser.denoise(request(1));
          }
        }),
      );
      expect(fast.calls + slow.calls).toBe(80);
      expect(slow.calls).toBeGreaterThan(0);
      // 8× slower: far fewer calls (a random split would give half each).
      expect(fast.calls).toBeGreaterThan(3 * slow.calls);
    });

    it('collect() reaches every replica of a NO_SIDE_EFFECTS method', async () => {
      fresh();
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts());
      expect(await client.collect('info', {}, { waitMs: 100 })).toEqual([]);
      await (await connect('a')).serve(DenoiserDefinition, doubler('a'), serveOpts());
      await (await connect('b')).serve(DenoiserDefinition, doubler('b'), serveOpts());
      const infos = await client.collect('info', {}, { waitMs: 300 });
      expect(infos.map((i) => i.instanceId).sort()).toEqual(['a', 'b']);
    });

    it('a NO_SIDE_EFFECTS call takes the first answer, so a replica that never answers cannot stall it', async () => {
      fresh();
      // 'hung' is alive and subscribed, but its Info never returns (a frozen process in NATS's eyes).
      const hung = { ...doubler('hung'), info: () => new Promise<DenoiserInfo>(() => undefined) };
      await (await connect('hung')).serve(DenoiserDefinition, hung, serveOpts());
      await (await connect('ok')).serve(DenoiserDefinition, doubler('ok'), serveOpts());
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts());
      // One replica of a queue group would get half of these and time out; asked of both, each is answered.
      for (let i = 0; i < 8; i++) {
        expect((await client.info({}, { timeoutMs: 1_000 })).instanceId).toBe('ok');
      }
    });

    it('carries typed errors with their status codes, exact messages and fields', async () => {
      fresh();
      const messages = new Map<number, Error>([
        [1, new InvalidArgumentError('cfg_scale must be finite and >= 1, got NaN', { field: 'cfg_scale' })],
        [2, new NotFoundError('model "nope" is not served here')],
        [3, new Error('boom: line one\nline two — ünïcode %41 100%')],
        [4, new PayloadTooLargeError('too big')],
      ]);
      const impl = doubler('a', (_req, _ctx, call) => {
        const err = messages.get(call);
        if (err) throw err;
      });
      await (await connect('server')).serve(DenoiserDefinition, impl, serveOpts());
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts());
      const e1 = await denoiser.denoise(request()).catch((e: unknown) => e);
      expect(e1).toBeInstanceOf(InvalidArgumentError);
      expect((e1 as InvalidArgumentError).code).toBe(Code.INVALID_ARGUMENT);
      expect((e1 as Error).message).toBe('cfg_scale must be finite and >= 1, got NaN');
      expect((e1 as InvalidArgumentError).field).toBe('cfg_scale');
      const e2 = await denoiser.denoise(request()).catch((e: unknown) => e);
      expect(e2).toBeInstanceOf(NotFoundError);
      expect((e2 as NotFoundError).code).toBe(Code.NOT_FOUND);
      const e3 = await denoiser.denoise(request()).catch((e: unknown) => e);
      expect(e3).toBeInstanceOf(InternalError);
      expect((e3 as Error).message).toBe('boom: line one\nline two — ünïcode %41 100%');
      const e4 = await denoiser.denoise(request()).catch((e: unknown) => e);
      expect(e4).toBeInstanceOf(PayloadTooLargeError);
      expect((e4 as PayloadTooLargeError).code).toBe(Code.RESOURCE_EXHAUSTED);
      // Answered errors are not computed again: one call each.
      expect(impl.calls).toBe(4);
      // The server keeps serving afterwards.
      expect((await denoiser.denoise(request())).batchRows).toBe(2);
    });

    it('a control call nobody serves is UNAVAILABLE at once, not a timeout', async () => {
      fresh();
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000, retries: 0 }));
      const started = Date.now();
      const err = await denoiser.info({}).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as UnavailableError).code).toBe(Code.UNAVAILABLE);
      expect((err as Error).message).toContain(`no responders on ditpipe.v1.denoiser.${scope}.info`);
      // Far below the 10 s timeout: the bus said nobody listens.
      expect(Date.now() - started).toBeLessThan(5_000);
    });

    it('work without an answer in time is DEADLINE_EXCEEDED, and the replica drops it when told', async () => {
      fresh();
      const aborted = deferred<unknown>();
      const impl = doubler('a', async (_req, ctx) => {
        ctx.signal.addEventListener('abort', () => aborted.resolve(ctx.signal.reason));
        await untilAborted(ctx.signal);
      });
      const events: WorkEvent[] = [];
      await (await connect('server')).serve(DenoiserDefinition, impl, serveOpts({ onWorkEvent: (e) => events.push(e) }));
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts());
      const err = await denoiser.denoise(request(), { timeoutMs: 200 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DeadlineExceededError);
      expect((err as DeadlineExceededError).code).toBe(Code.DEADLINE_EXCEEDED);
      expect((err as Error).message).toMatch(
        new RegExp(`Denoiser\\.Denoise on ditpipe\\.v1\\.denoiser\\.${scope}\\.denoise: no answer within 200 ms`),
      );
      // The caller's cancel notice reaches the replica, which aborts the call.
      expect(await aborted.promise).toBeInstanceOf(CancelledError);
      expect(impl.calls).toBe(1);
      await expect.poll(() => events).toContainEqual({ kind: 'dropped', method: 'Denoise', reason: 'cancelled', calls: 1 });
    });

    it('cancelled work still in the queue is dropped unstarted when a replica takes it', async () => {
      fresh();
      const gate = deferred();
      const impl = doubler('a', (req) => (req.requestId === 'first' ? gate.promise : undefined));
      const events: WorkEvent[] = [];
      await (await connect('server')).serve(DenoiserDefinition, impl, serveOpts({ onWorkEvent: (e) => events.push(e) }));
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts());
      const first = denoiser.denoise(request(1, undefined, 'first'));
      await expect.poll(() => impl.calls).toBe(1);
      const ac = new AbortController();
      const second = denoiser.denoise(request(1, undefined, 'second'), { signal: ac.signal });
      await expect.poll(() => denoiser.queueOf('denoise').info()).toMatchObject({ pending: 1 });
      ac.abort();
      expect(await second.catch((e: unknown) => e)).toBeInstanceOf(CancelledError);
      await sleep(50); // the notice reaches the replica before it is free
      gate.resolve();
      expect((await first).batchRows).toBe(1);
      await expect.poll(() => events).toContainEqual({ kind: 'dropped', method: 'Denoise', reason: 'cancelled', calls: 1 });
      expect(impl.tags).toEqual(['first']);
      await expect.poll(() => denoiser.queueOf('denoise').info()).toMatchObject({ pending: 0, ackPending: 0 });
    });

    it('work held past its attempt time goes to another replica; the first answer wins and a late duplicate is counted', async () => {
      fresh();
      const received = deferred();
      const release = deferred();
      const slow = doubler('slow', async () => {
        received.resolve();
        await release.promise;
      });
      const slowServer = await (await connect('slow')).serve(DenoiserDefinition, slow, serveOpts({ stuckGraceMs: 0 }));
      const clientEvents: ClientWorkEvent[] = [];
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ onWorkEvent: (e) => clientEvents.push(e) }));
      const call = client.denoise(request(1), { timeoutMs: 10_000, attemptTimeoutMs: 300 });
      await received.promise;
      expect(slowServer.live).toBe(true);
      const healthy = doubler('healthy');
      const healthyEvents: WorkEvent[] = [];
      await (await connect('healthy')).serve(DenoiserDefinition, healthy, serveOpts({ onWorkEvent: (e) => healthyEvents.push(e) }));
      const res = await call;
      expect(floats(res.out)).toEqual([0, 0.5, 1, 1.5]);
      expect(healthy.calls).toBe(1);
      expect(healthyEvents).toContainEqual({ kind: 'redelivered', method: 'Denoise', calls: 1 });
      // Holding work past its attempt time makes the slow replica count as stuck.
      expect(slowServer.live).toBe(false);
      release.resolve();
      await expect.poll(() => clientEvents).toContainEqual({ kind: 'discarded', method: 'Denoise', reason: 'duplicate' });
      await expect.poll(() => slowServer.live).toBe(true);
      expect(slow.calls).toBe(1);
    });

    it('a replica that stops answering (connection gone) loses nothing: its work is redelivered', async () => {
      fresh();
      const doomed = await connect('doomed');
      const received = deferred();
      const lost = doubler('lost', async () => {
        received.resolve();
        await new Promise<never>(() => undefined);
      });
      await doomed.serve(DenoiserDefinition, lost, serveOpts());
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000 }));
      const call = client.denoise(request(1));
      await received.promise;
      // Gone without a word: no answer, no acknowledgement, no nak.
      await getHarness().kill(doomed);
      const ok = doubler('ok');
      await (await connect('ok')).serve(DenoiserDefinition, ok, serveOpts());
      expect((await call).batchRows).toBe(1);
      expect([lost.calls, ok.calls]).toEqual([1, 1]);
    });

    it('a replica that cannot serve a call (UNAVAILABLE) gives it back for another replica', async () => {
      fresh();
      const refusing = doubler('refusing', () => {
        throw new UnavailableError('model worker died');
      });
      await (await connect('refusing')).serve(DenoiserDefinition, refusing, serveOpts());
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000 }));
      const call = client.denoise(request(1));
      await expect.poll(() => refusing.calls).toBeGreaterThan(0);
      const ok = doubler('ok');
      await (await connect('ok')).serve(DenoiserDefinition, ok, serveOpts());
      expect((await call).batchRows).toBe(1);
      expect(ok.calls).toBe(1);
      // With every delivery refused, the last one answers the error instead of giving it back.
      fresh();
      const alone = doubler('alone', () => {
        throw new UnavailableError('model worker died');
      });
      await (await connect('alone')).serve(DenoiserDefinition, alone, serveOpts());
      const err = await (
        await connect('c2')
      )
        .client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000 }))
        .denoise(request(1))
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as Error).message).toBe('model worker died');
      expect(alone.calls).toBe(QUEUE.maxDeliver);
    });

    it('a call with a target goes straight to that replica, not through the queue, while another replica is idle', async () => {
      fresh();
      const a = doubler('a');
      const b = doubler('b');
      await (await connect('a')).serve(DenoiserDefinition, a, serveOpts());
      const srvB = await (await connect('b')).serve(DenoiserDefinition, b, serveOpts());
      const events: ClientWorkEvent[] = [];
      const client = (await connect('client')).client(
        DenoiserDefinition,
        clientOpts({ timeoutMs: 5_000, onWorkEvent: (e) => events.push(e) }),
      );
      await client.denoise(request(1)); // the queue exists and both replicas pull
      const queued = a.calls + b.calls;
      for (let i = 0; i < 6; i++) expect((await client.denoise(request(2), { target: srvB.instance })).batchRows).toBe(2);
      // Two calls to one target ready in one turn share a message.
      await Promise.all([client.denoise(request(1), { target: srvB.instance }), client.denoise(request(1), { target: srvB.instance })]);
      expect(a.calls + b.calls).toBe(queued + 8);
      expect(b.calls - (queued - a.calls)).toBe(8);
      expect(events.filter((e) => e.kind === 'fallback')).toEqual([]);
      expect(events.filter((e) => e.kind === 'direct')).toEqual([
        ...Array(6).fill({ kind: 'direct', method: 'Denoise', calls: 1 }),
        { kind: 'direct', method: 'Denoise', calls: 2 },
      ]);
      await expect.poll(() => client.queueOf('denoise').info()).toMatchObject({ pending: 0, ackPending: 0 });
      await expect(client.denoise(request(1), { target: 'a.b' })).rejects.toMatchObject({ code: Code.INVALID_ARGUMENT, field: 'target' });
    });

    it('a direct call its target says nothing of (gone, or no such replica) falls back to the queue after about an ack wait', async () => {
      fresh();
      const frozenTransport = await connect('frozen');
      const received = deferred();
      const frozen = doubler('frozen', async () => {
        received.resolve();
        await new Promise<never>(() => undefined);
      });
      const srvFrozen = await frozenTransport.serve(DenoiserDefinition, frozen, serveOpts());
      const events: ClientWorkEvent[] = [];
      const client = (await connect('client')).client(
        DenoiserDefinition,
        clientOpts({ timeoutMs: 10_000, onWorkEvent: (e) => events.push(e) }),
      );
      const call = client.denoise(request(1), { target: srvFrozen.instance });
      await received.promise;
      // Gone without a word: no answer, no heartbeat, no give-back.
      await getHarness().kill(frozenTransport);
      const ok = doubler('ok');
      await (await connect('ok')).serve(DenoiserDefinition, ok, serveOpts());
      expect((await call).batchRows).toBe(1);
      expect([frozen.calls, ok.calls]).toEqual([1, 1]);
      expect(events).toContainEqual({ kind: 'fallback', method: 'Denoise', reason: 'silent' });
      // A target no replica serves: silent for an ack wait (400 ms here), then the queue.
      const started = performance.now();
      expect((await client.denoise(request(3), { target: 'nobody' })).batchRows).toBe(3);
      const waited = performance.now() - started;
      expect(waited).toBeGreaterThanOrEqual(QUEUE.ackWaitMs! - 50);
      expect(waited).toBeLessThan(5_000);
      expect(ok.calls).toBe(2);
      expect(events.filter((e) => e.kind === 'fallback')).toEqual(Array(2).fill({ kind: 'fallback', method: 'Denoise', reason: 'silent' }));
    });

    it('a target that is stopping or cannot serve gives a direct call back: it is answered elsewhere at once', async () => {
      fresh();
      const gate = deferred();
      const received = deferred();
      const stopping = doubler('stopping', async (_req, _ctx, call) => {
        received.resolve();
        if (call === 1) await gate.promise;
      });
      const srvStopping = await (await connect('stopping')).serve(DenoiserDefinition, stopping, serveOpts());
      const ok = doubler('ok');
      await (await connect('ok')).serve(DenoiserDefinition, ok, serveOpts());
      const events: ClientWorkEvent[] = [];
      const client = (await connect('client')).client(
        DenoiserDefinition,
        clientOpts({ timeoutMs: 10_000, onWorkEvent: (e) => events.push(e) }),
      );
      const first = client.denoise(request(1), { target: srvStopping.instance });
      await received.promise;
      const stopped = srvStopping.stop(10_000); // waits for the call it holds
      const started = performance.now();
      expect((await client.denoise(request(2), { target: srvStopping.instance })).batchRows).toBe(2);
      // Given back, not silent: well before an ack wait would have passed (generous bound for slow CI).
      expect(performance.now() - started).toBeLessThan(QUEUE.ackWaitMs! * 4);
      expect(events.filter((e) => e.kind === 'fallback')).toEqual([{ kind: 'fallback', method: 'Denoise', reason: 'given-back' }]);
      expect([stopping.calls, ok.calls]).toEqual([1, 1]);
      gate.resolve();
      expect((await first).batchRows).toBe(1);
      await stopped;
      // A handler that says it cannot serve (UNAVAILABLE) gives a direct call back too.
      const refusing = doubler('refusing', () => {
        throw new UnavailableError('model worker died');
      });
      const srvRefusing = await (await connect('refusing')).serve(DenoiserDefinition, refusing, serveOpts());
      expect((await client.denoise(request(1), { target: srvRefusing.instance })).batchRows).toBe(1);
      expect(refusing.calls).toBe(1);
      expect(ok.calls).toBe(2);
      expect(events.filter((e) => e.kind === 'fallback')).toEqual(
        Array(2).fill({ kind: 'fallback', method: 'Denoise', reason: 'given-back' }),
      );
    });

    it('a direct call held past its attempt time falls back; the first answer wins and the late one is discarded', async () => {
      fresh();
      const received = deferred();
      const release = deferred();
      const slow = doubler('slow', async () => {
        received.resolve();
        await release.promise;
      });
      // A driver that never takes from the queue: this replica serves only what is sent to it directly.
      const srvSlow = await (await connect('slow')).serve(DenoiserDefinition, slow, serveOpts({ drivers: { denoise: () => undefined } }));
      const healthy = doubler('healthy');
      await (await connect('healthy')).serve(DenoiserDefinition, healthy, serveOpts());
      const events: ClientWorkEvent[] = [];
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ onWorkEvent: (e) => events.push(e) }));
      // Past its attempt time the target stops its heartbeats, so the call goes to the queue.
      const call = client.denoise(request(1), { timeoutMs: 10_000, attemptTimeoutMs: 300, target: srvSlow.instance });
      await received.promise;
      const res = await call;
      expect(floats(res.out)).toEqual([0, 0.5, 1, 1.5]);
      expect(healthy.calls).toBe(1);
      expect(events).toContainEqual({ kind: 'fallback', method: 'Denoise', reason: 'silent' });
      release.resolve();
      await expect.poll(() => events).toContainEqual({ kind: 'discarded', method: 'Denoise', reason: 'duplicate' });
      expect(slow.calls).toBe(1);
      await expect.poll(() => srvSlow.inFlight).toBe(0);
    });

    it('heartbeats keep a direct call longer than the ack wait on its target', async () => {
      fresh();
      const long = doubler('long', () => sleep(3 * QUEUE.ackWaitMs!));
      const srvLong = await (await connect('long')).serve(DenoiserDefinition, long, serveOpts());
      const other = doubler('other');
      await (await connect('other')).serve(DenoiserDefinition, other, serveOpts());
      const events: ClientWorkEvent[] = [];
      const client = (await connect('client')).client(
        DenoiserDefinition,
        clientOpts({ timeoutMs: 10_000, onWorkEvent: (e) => events.push(e) }),
      );
      expect((await client.denoise(request(2), { target: srvLong.instance })).batchRows).toBe(2);
      expect([long.calls, other.calls]).toEqual([1, 0]);
      expect(events.filter((e) => e.kind !== 'direct')).toEqual([]);
    });

    it('calls that become ready in one turn travel as one message while their cost fits', async () => {
      fresh();
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000 }));
      const a = Array.from({ length: 6 }, () => client.denoise(request(1), { cost: 2, maxBatchCost: 8 }));
      // 6 calls of cost 2 under a budget of 8: two messages (4 + 2 calls).
      await expect.poll(() => client.queueOf('denoise').info()).toMatchObject({ pending: 2 });
      const impl = doubler('a');
      await (await connect('server')).serve(DenoiserDefinition, impl, serveOpts({ concurrency: 8 }));
      expect((await Promise.all(a)).map((r) => r.batchRows)).toEqual(Array(6).fill(1));
      expect(impl.calls).toBe(6);
    });

    it('a full queue answers RESOURCE_EXHAUSTED', async () => {
      fresh();
      const small = { ...QUEUE, maxMessages: 2 };
      const client = (await connect('client')).client(DenoiserDefinition, clientOpts({ queueSettings: small, timeoutMs: 10_000 }));
      const waiting: Array<Promise<DenoiseResponse>> = [];
      for (let i = 0; i < 2; i++) {
        waiting.push(client.denoise(request(1)));
        await sleep(5);
      }
      await expect.poll(() => client.queueOf('denoise').info()).toMatchObject({ pending: 2 });
      const err = await client.denoise(request(1)).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ResourceExhaustedError);
      expect((err as Error).message).toMatch(/work queue for .* is full/);
      await (await connect('server')).serve(DenoiserDefinition, doubler('a'), serveOpts({ queueSettings: small }));
      expect((await Promise.all(waiting)).length).toBe(2);
    });

    it('retries control calls after UNAVAILABLE, never non-idempotent ones', async () => {
      fresh();
      const client = await connect('client');
      // No replica yet: the Info control call is retried with backoff until one appears.
      const denoiser = client.client(DenoiserDefinition, clientOpts({ retries: 20, backoffMs: 20 }));
      const pending = denoiser.info({}, { timeoutMs: 10_000 });
      await sleep(150);
      await (await connect('late')).serve(DenoiserDefinition, doubler('late'), serveOpts());
      expect((await pending).instanceId).toBe('late');

      // Sampler.Generate has no idempotency mark: the same failure is not retried.
      let generateCalls = 0;
      await (
        await connect('sampler')
      ).serve(
        SamplerDefinition,
        {
          generate: () => {
            generateCalls++;
            throw new UnavailableError('not now');
          },
          listModels: () => ListModelsResponse.create(),
        },
        { scope: 'all' },
      );
      const sampler = client.client(SamplerDefinition, { scope: 'all', retries: 5 });
      const err = await sampler
        .generate({ model: 'm', classLabels: [{ index: 1 }], sampler: 0, guidanceChannels: 0, outputFormat: 0, cachePolicy: 0 })
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as Error).message).toBe('not now');
      expect(generateCalls).toBe(1);
      const noServer = client.client(SamplerDefinition, { scope: 'nobody', retries: 5 });
      const err2 = await noServer.generate(GenerateRequest.create({ model: 'm' })).catch((e: unknown) => e);
      expect(err2).toBeInstanceOf(UnavailableError);
      expect((err2 as Error).message).not.toContain('attempts');
    });

    it('cancels a call through its AbortSignal, and the replica sees it', async () => {
      fresh();
      const aborted = deferred<unknown>();
      const impl = doubler('a', async (_req, ctx) => {
        ctx.signal.addEventListener('abort', () => aborted.resolve(ctx.signal.reason));
        await untilAborted(ctx.signal);
      });
      await (await connect('server')).serve(DenoiserDefinition, impl, serveOpts());
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts());
      const ac = new AbortController();
      const call = denoiser.denoise(request(), { signal: ac.signal, timeoutMs: 5_000 });
      await expect.poll(() => impl.calls).toBe(1);
      ac.abort();
      const err = await call.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CancelledError);
      expect((err as CancelledError).code).toBe(Code.CANCELLED);
      expect(await aborted.promise).toBeInstanceOf(CancelledError);
      await expect(denoiser.denoise(request(), { signal: ac.signal })).rejects.toBeInstanceOf(CancelledError);
    });

    it('refuses work over the payload limit before sending; a reply over it is RESOURCE_EXHAUSTED', async () => {
      fresh();
      const limit = getHarness().maxPayload;
      const impl = doubler('a');
      await (await connect('server')).serve(DenoiserDefinition, impl, serveOpts());
      const client = await connect('client');
      const denoiser = client.client(DenoiserDefinition, clientOpts({ timeoutMs: 5_000 }));
      // Room is left for the work headers: a request well within the limit goes through…
      const fitting = await denoiser.denoise(request(1, limit - 1024));
      expect(fitting.out?.data.length).toBe(limit - 1024);
      expect(impl.calls).toBe(1);
      // …and one over it is refused before anything is sent.
      const err = await denoiser.denoise(request(1, limit)).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PayloadTooLargeError);
      expect((err as PayloadTooLargeError).code).toBe(Code.RESOURCE_EXHAUSTED);
      expect((err as PayloadTooLargeError).limit).toBeLessThan(limit);
      expect((err as Error).message).toMatch(/^Denoiser\.Denoise request is \d+ bytes, over the payload limit of \d+ bytes .*not sent$/);
      expect(impl.calls).toBe(1);

      // A configured limit below the server's is enforced the same way.
      const small = client.client(DenoiserDefinition, clientOpts({ maxPayload: 1_000 }));
      const err2 = await small.denoise(request(1, 4_000)).catch((e: unknown) => e);
      expect(err2).toBeInstanceOf(PayloadTooLargeError);
      expect(impl.calls).toBe(1);
      expect((await small.denoise(request(1, 400))).batchRows).toBe(1);

      // A reply over the limit is answered as RESOURCE_EXHAUSTED instead of being lost.
      const big = await denoiser.denoise(request(1, undefined, `huge:${limit}`)).catch((e: unknown) => e);
      expect(big).toBeInstanceOf(PayloadTooLargeError);
      expect((big as Error).message).toMatch(/^Denoiser\.Denoise answer is \d+ bytes, over the payload limit of \d+ bytes$/);
    });

    it('drains on shutdown: work in flight finishes, later work waits in the queue for the next replica', async () => {
      fresh();
      const received = deferred();
      const impl = doubler('a', async () => {
        received.resolve();
        await sleep(300);
      });
      const serverTransport = await getHarness().connect('server');
      await serverTransport.serve(DenoiserDefinition, impl, serveOpts());
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts());
      const call = denoiser.denoise(request(1));
      await received.promise;
      const closing = serverTransport.close({ graceMs: 10_000 });
      const res = await call;
      expect(res.batchRows).toBe(1);
      await closing;
      expect(await serverTransport.closed).toBeNull();
      await expect(serverTransport.serve(DenoiserDefinition, impl, serveOpts())).rejects.toBeInstanceOf(UnavailableError);
      const later = denoiser.denoise(request(1), { timeoutMs: 10_000 });
      await sleep(100);
      const next = doubler('next');
      await (await connect('next')).serve(DenoiserDefinition, next, serveOpts());
      expect((await later).batchRows).toBe(1);
      expect(impl.calls).toBe(1);
      expect(next.calls).toBe(1);
    });

    it('work still running after the grace period is aborted and given back to the queue', async () => {
      fresh();
      const received = deferred();
      let sawAbort = false;
      const impl = doubler('a', async (_req, ctx) => {
        received.resolve();
        await untilAborted(ctx.signal).catch(() => {
          sawAbort = true;
        });
      });
      const serverTransport = await getHarness().connect('server');
      const srv = await serverTransport.serve(DenoiserDefinition, impl, serveOpts());
      const denoiser = (await connect('client')).client(DenoiserDefinition, clientOpts({ timeoutMs: 10_000 }));
      const call = denoiser.denoise(request(1));
      await received.promise;
      await serverTransport.close({ graceMs: 100 });
      expect(sawAbort).toBe(true);
      expect(srv.inFlight).toBe(0);
      const next = doubler('next');
      const nextEvents: WorkEvent[] = [];
      await (await connect('next')).serve(DenoiserDefinition, next, serveOpts({ onWorkEvent: (e) => nextEvents.push(e) }));
      expect((await call).batchRows).toBe(1);
      expect(next.calls).toBe(1);
      expect(nextEvents).toContainEqual({ kind: 'redelivered', method: 'Denoise', calls: 1 });
    });

    it('rejects bad scopes, queue settings and incomplete implementations with errors naming them', async () => {
      fresh();
      const t = await connect('x');
      expect(() => t.client(DenoiserDefinition, { scope: 'a.b' })).toThrow(/scope must be a non-empty subject token/);
      expect(() => t.client(DenoiserDefinition, { scope: '' })).toThrow(InvalidArgumentError);
      expect(() => t.client(DenoiserDefinition, { scope: 'ok', timeoutMs: -1 })).toThrow(/timeoutMs/);
      expect(() => t.client(DenoiserDefinition, { scope: 'ok', queueSettings: { ackWaitMs: 5 } })).toThrow(
        /queue setting ackWaitMs must be an integer within 100\.\./,
      );
      const partial = { info: () => DenoiserInfo.create() } as unknown as ServiceImpl<typeof DenoiserDefinition>;
      await expect(t.serve(DenoiserDefinition, partial, serveOpts())).rejects.toThrow(/lacks method denoise/);
      await expect(t.serve(DenoiserDefinition, doubler('a'), serveOpts({ drivers: { info: () => undefined } }))).rejects.toThrow(
        /drivers: Denoiser\.info is not a work/,
      );
    });
  });
}
