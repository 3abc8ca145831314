// One transport test suite, run against a real nats-server (nats.test.ts) and the in-process bus
// (inproc.test.ts): both must give the same request/reply, queue-group, error, deadline, retry,
// payload-limit and drain behaviour.
import { afterEach, describe, expect, it } from 'vitest';

import {
  CancelledError,
  Code,
  DeadlineExceededError,
  InternalError,
  InvalidArgumentError,
  NotFoundError,
  PayloadTooLargeError,
  UnavailableError,
} from '../../shared/errors.ts';
import { DType, Tensor } from '../../shared/gen/ditpipe/v1/tensor.ts';
import {
  DenoiseRequest,
  DenoiseResponse,
  DenoiserDefinition,
  DenoiserInfo,
} from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { GenerateRequest, ListModelsResponse, SamplerDefinition } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { H_TIMEOUT, headerBytes } from '../../shared/transport/rpc.ts';
import type { CallContext, ServiceImpl, Transport } from '../../shared/transport/types.ts';

export interface Harness {
  /** Bus-wide payload limit the harness was set up with (server max_payload). */
  readonly maxPayload: number;
  /** A new connection (a simulated process). */
  connect(name: string): Promise<Transport>;
}

const SCOPE = 'dit-test';

function floatTensor(values: number[], shape: number[]): Tensor {
  return Tensor.create({ shape, dtype: DType.DTYPE_FLOAT32, data: new Uint8Array(new Float32Array(values).buffer) });
}

function floats(t: Tensor | undefined): number[] {
  if (!t) throw new Error('missing tensor');
  return Array.from(new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength)));
}

function request(n = 2, bytes?: number): DenoiseRequest {
  const x =
    bytes === undefined
      ? floatTensor(
          Array.from({ length: n * 4 }, (_, i) => i / 4),
          [n, 4, 1, 1],
        )
      : Tensor.create({ shape: [bytes / 4], dtype: DType.DTYPE_FLOAT32, data: new Uint8Array(bytes) });
  return DenoiseRequest.create({
    model: SCOPE,
    x,
    t: Array.from({ length: n }, (_, i) => BigInt(999 - i)),
    y: Array.from({ length: n }, (_, i) => i),
    cfgScale: 4,
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

/** Resolves when signal aborts (never otherwise): a handler that hangs until its deadline. */
function untilAborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    signal.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
  });
}

/** Denoiser implementation doubling x and counting calls; `before` may delay or fail a call. */
function doubler(
  id: string,
  before?: (req: DenoiseRequest, ctx: CallContext, call: number) => Promise<void> | void,
): ServiceImpl<typeof DenoiserDefinition> & { calls: number; contexts: CallContext[] } {
  const impl = {
    calls: 0,
    contexts: [] as CallContext[],
    async denoise(req: DenoiseRequest, ctx: CallContext): Promise<DenoiseResponse> {
      impl.calls++;
      impl.contexts.push(ctx);
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
      return DenoiserInfo.create({ model: SCOPE, instanceId: id, params: 123_456_789_012n });
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

    it('request/reply roundtrips messages, bigints and the caller deadline', async () => {
      const server = await connect('server');
      const client = await connect('client');
      const impl = doubler('a');
      const srv = await server.serve(DenoiserDefinition, impl, { scope: SCOPE });
      expect(srv.instance).toMatch(/^[0-9a-f]{32}$/);
      expect(srv.subjects).toEqual([
        'ditpipe.v1.denoiser.dit-test.denoise',
        'ditpipe.v1.denoiser.dit-test.info',
        'ditpipe.v1.denoiser.dit-test.denoise.live',
        `ditpipe.v1.denoiser.dit-test.denoise.at.${srv.instance}`,
        'ditpipe.v1.denoiser.dit-test.info.all',
        'ditpipe.v1.denoiser.dit-test.info.live',
        `ditpipe.v1.denoiser.dit-test.info.at.${srv.instance}`,
      ]);
      const denoiser = client.client(DenoiserDefinition, { scope: SCOPE, timeoutMs: 5_000 });
      expect(denoiser.subjectOf('denoise')).toBe('ditpipe.v1.denoiser.dit-test.denoise');
      const before = Date.now();
      const res = await denoiser.denoise(request(3));
      expect(floats(res.out)).toEqual(Array.from({ length: 12 }, (_, i) => i / 2));
      expect(res.out?.shape).toEqual([3, 4, 1, 1]);
      expect(res.batchRows).toBe(3);
      expect(res.queueMs).toBe(999);
      const ctx = impl.contexts[0];
      expect(ctx.subject).toBe('ditpipe.v1.denoiser.dit-test.denoise');
      expect(ctx.method).toBe('Denoise');
      expect(ctx.deadline).toBeGreaterThan(before + 4_000);
      expect(ctx.deadline).toBeLessThanOrEqual(Date.now() + 5_000);
      const info = await denoiser.info({});
      expect(info.params).toBe(123_456_789_012n);
      expect(srv.inFlight).toBe(0);
    });

    it('shares load between two replicas of a queue group', async () => {
      const a = doubler('a');
      const b = doubler('b');
      await (await connect('a')).serve(DenoiserDefinition, a, { scope: SCOPE });
      await (await connect('b')).serve(DenoiserDefinition, b, { scope: SCOPE });
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE });
      await Promise.all(Array.from({ length: 40 }, () => denoiser.denoise(request(1))));
      expect(a.calls + b.calls).toBe(40);
      expect(a.calls).toBeGreaterThan(0);
      expect(b.calls).toBeGreaterThan(0);
      // A different scope is a different pool: nobody serves it.
      const other = (await connect('client2')).client(DenoiserDefinition, { scope: 'other-model', retries: 0 });
      await expect(other.denoise(request(1))).rejects.toBeInstanceOf(UnavailableError);
    });

    it('collect() reaches every replica of a NO_SIDE_EFFECTS method', async () => {
      const client = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE });
      expect(await client.collect('info', {}, { waitMs: 100 })).toEqual([]);
      await (await connect('a')).serve(DenoiserDefinition, doubler('a'), { scope: SCOPE });
      await (await connect('b')).serve(DenoiserDefinition, doubler('b'), { scope: SCOPE });
      const infos = await client.collect('info', {}, { waitMs: 300 });
      expect(infos.map((i) => i.instanceId).sort()).toEqual(['a', 'b']);
    });

    it('carries typed errors with their status codes and exact messages', async () => {
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
      await (await connect('server')).serve(DenoiserDefinition, impl, { scope: SCOPE });
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE });
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
      // Errors are not retried unless retryable: one call each.
      expect(impl.calls).toBe(4);
      // The server keeps serving afterwards.
      expect((await denoiser.denoise(request())).batchRows).toBe(2);
    });

    it('no responders is UNAVAILABLE at once, not a timeout', async () => {
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE, timeoutMs: 10_000, retries: 0 });
      const started = Date.now();
      const err = await denoiser.denoise(request()).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as UnavailableError).code).toBe(Code.UNAVAILABLE);
      expect((err as Error).message).toContain('no responders on ditpipe.v1.denoiser.dit-test.denoise');
      // Far below the 10 s timeout: the bus said nobody listens.
      expect(Date.now() - started).toBeLessThan(5_000);
    });

    it('a call without an answer in time is DEADLINE_EXCEEDED and the handler sees its deadline pass', async () => {
      const aborted = deferred<unknown>();
      const impl = doubler('a', async (_req, ctx) => {
        ctx.signal.addEventListener('abort', () => aborted.resolve(ctx.signal.reason));
        await untilAborted(ctx.signal);
      });
      await (await connect('server')).serve(DenoiserDefinition, impl, { scope: SCOPE });
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE, retries: 0 });
      const err = await denoiser.denoise(request(), { timeoutMs: 200 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DeadlineExceededError);
      expect((err as DeadlineExceededError).code).toBe(Code.DEADLINE_EXCEEDED);
      expect((err as Error).message).toMatch(/Denoiser\.Denoise on ditpipe\.v1\.denoiser\.dit-test\.denoise: no answer within 200 ms/);
      expect(await aborted.promise).toBeInstanceOf(DeadlineExceededError);
      expect(impl.calls).toBe(1);
    });

    it('retries an idempotent call on another replica after an attempt timeout', async () => {
      const received = deferred();
      const hung = doubler('hung', async (_req, ctx) => {
        received.resolve();
        await untilAborted(ctx.signal);
      });
      const hungServer = await (await connect('hung')).serve(DenoiserDefinition, hung, { scope: SCOPE });
      const client = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE, retries: 3 });
      const call = client.denoise(request(1), { timeoutMs: 10_000, attemptTimeoutMs: 300 });
      await received.promise;
      // The hung replica leaves the pool (as a crashed process would); a healthy one joins.
      const stopping = hungServer.stop(60_000);
      const healthy = doubler('healthy');
      await (await connect('healthy')).serve(DenoiserDefinition, healthy, { scope: SCOPE });
      const res = await call;
      expect(floats(res.out)).toEqual([0, 0.5, 1, 1.5]);
      expect(hung.calls).toBe(1);
      expect(healthy.calls).toBe(1);
      // The hung call got its deadline; the stopping replica finishes without waiting the grace.
      await stopping;
      expect(hungServer.inFlight).toBe(0);
    });

    it('sends retries only to replicas that answer the liveness probe, never back to a stuck one', async () => {
      // Two replicas whose model is stuck (the handler ignores its deadline, as a frozen GPU call
      // would) stay subscribed to the queue group; one healthy replica serves beside them.
      const stuck = (id: string): ReturnType<typeof doubler> => doubler(id, () => new Promise<void>(() => undefined));
      const a = stuck('stuck-a');
      const b = stuck('stuck-b');
      const healthy = doubler('healthy');
      const opts = { scope: SCOPE, stuckGraceMs: 0 };
      await (await connect('stuck-a')).serve(DenoiserDefinition, a, opts);
      await (await connect('stuck-b')).serve(DenoiserDefinition, b, opts);
      await (await connect('healthy')).serve(DenoiserDefinition, healthy, opts);
      const client = await connect('client');
      // Let both stuck replicas overstay a caller's deadline before the calls under test.
      const primer = client.client(DenoiserDefinition, { scope: SCOPE, retries: 0, timeoutMs: 50 });
      while (a.calls === 0 || b.calls === 0) await primer.denoise(request(1)).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 20));
      const before = { stuck: a.calls + b.calls, healthy: healthy.calls };

      // One retry each. Through the queue group, two thirds of the retries would hit a stuck
      // replica again and fail; through the probe every retry reaches the healthy one.
      const denoiser = client.client(DenoiserDefinition, { scope: SCOPE, retries: 1 });
      const results = await Promise.all(Array.from({ length: 12 }, () => denoiser.denoise(request(1), { timeoutMs: 5_000, attemptTimeoutMs: 200 })));
      expect(results.map((r) => r.batchRows)).toEqual(Array(12).fill(1));
      expect(a.calls + b.calls - before.stuck).toBeGreaterThan(0); // first attempts did land on them
      expect(healthy.calls - before.healthy).toBe(12); // and every call was answered by the healthy one
    });

    it('retries idempotent calls after UNAVAILABLE, never non-idempotent ones', async () => {
      const client = await connect('client');
      // No replica yet: retries with backoff until one appears.
      const denoiser = client.client(DenoiserDefinition, { scope: SCOPE, retries: 20, backoffMs: 20 });
      const pending = denoiser.denoise(request(1), { timeoutMs: 10_000 });
      const late = doubler('late');
      await new Promise((r) => setTimeout(r, 150));
      await (await connect('late')).serve(DenoiserDefinition, late, { scope: SCOPE });
      expect((await pending).batchRows).toBe(1);
      expect(late.calls).toBe(1);

      // A replica answering UNAVAILABLE (e.g. shutting down) is retried too.
      const flaky = doubler('flaky', (_r, _c, call) => {
        if (call === 1) throw new UnavailableError('replica shutting down');
      });
      await (await connect('flaky')).serve(DenoiserDefinition, flaky, { scope: 'flaky' });
      const flakyClient = client.client(DenoiserDefinition, { scope: 'flaky', retries: 2 });
      expect((await flakyClient.denoise(request(1))).batchRows).toBe(1);
      expect(flaky.calls).toBe(2);

      // Sampler.Generate has no idempotency mark: the same failure is not retried.
      let generateCalls = 0;
      await (await connect('sampler')).serve(
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
      const err = await sampler.generate({ model: 'm', classLabels: [{ index: 1 }], sampler: 0, guidanceChannels: 0, outputFormat: 0 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as Error).message).toBe('not now');
      expect(generateCalls).toBe(1);
      const noServer = client.client(SamplerDefinition, { scope: 'nobody', retries: 5 });
      const err2 = await noServer.generate(GenerateRequest.create({ model: 'm' })).catch((e: unknown) => e);
      expect(err2).toBeInstanceOf(UnavailableError);
      expect((err2 as Error).message).not.toContain('attempts');
    });

    it('cancels a call through its AbortSignal', async () => {
      const impl = doubler('a', async (_req, ctx) => untilAborted(ctx.signal));
      await (await connect('server')).serve(DenoiserDefinition, impl, { scope: SCOPE });
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE });
      const ac = new AbortController();
      const call = denoiser.denoise(request(), { signal: ac.signal, timeoutMs: 500 });
      setTimeout(() => ac.abort(), 50);
      const err = await call.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CancelledError);
      expect((err as CancelledError).code).toBe(Code.CANCELLED);
      await expect(denoiser.denoise(request(), { signal: ac.signal })).rejects.toBeInstanceOf(CancelledError);
    });

    it('refuses requests over the payload limit before sending, and accepts one exactly at it', async () => {
      const limit = getHarness().maxPayload;
      const impl = doubler('a');
      await (await connect('server')).serve(DenoiserDefinition, impl, { scope: SCOPE });
      const client = await connect('client');
      const timeoutMs = 5_000;
      const overhead = headerBytes({ [H_TIMEOUT]: String(timeoutMs) });
      // Largest request that fits: body + headers == limit.
      let bytes = Math.floor((limit - overhead) / 4) * 4;
      const size = (b: number): number => DenoiseRequest.encode(request(1, b)).finish().length + overhead;
      while (size(bytes) > limit) bytes -= 4;
      const denoiser = client.client(DenoiserDefinition, { scope: SCOPE, timeoutMs });
      const fitting = request(1, bytes);
      // Pad the model name so the total lands exactly on the limit.
      for (let pad = 0; pad < 256; pad++) {
        fitting.model = SCOPE + 'm'.repeat(pad);
        if (DenoiseRequest.encode(fitting).finish().length + overhead === limit) break;
      }
      expect(DenoiseRequest.encode(fitting).finish().length + overhead).toBe(limit);
      const exact = await denoiser.denoise(fitting);
      expect(exact.out?.data.length).toBe(bytes);
      expect(impl.calls).toBe(1);

      fitting.model += 'm';
      const err = await denoiser.denoise(fitting).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PayloadTooLargeError);
      expect((err as PayloadTooLargeError).code).toBe(Code.RESOURCE_EXHAUSTED);
      expect((err as PayloadTooLargeError).size).toBe(limit + 1);
      expect((err as PayloadTooLargeError).limit).toBe(limit);
      expect((err as Error).message).toContain(`Denoiser.Denoise request is ${limit + 1} bytes`);
      expect((err as Error).message).toContain('server max_payload');
      expect(impl.calls).toBe(1); // never sent

      // A configured limit below the server's is enforced the same way.
      const small = client.client(DenoiserDefinition, { scope: SCOPE, maxPayload: 1_000 });
      const err2 = await small.denoise(request(1, 4_000)).catch((e: unknown) => e);
      expect(err2).toBeInstanceOf(PayloadTooLargeError);
      expect((err2 as Error).message).toContain('over the payload limit of 1000 bytes (client maxPayload)');
      expect(impl.calls).toBe(1);
      expect((await small.denoise(request(1, 400))).batchRows).toBe(1);

      // A reply over the limit is answered as RESOURCE_EXHAUSTED instead of being lost.
      const hugeReq = request(1);
      hugeReq.requestId = `huge:${limit}`;
      const big = await denoiser.denoise(hugeReq).catch((e: unknown) => e);
      expect(big).toBeInstanceOf(PayloadTooLargeError);
      expect((big as Error).message).toMatch(/^Denoiser\.Denoise reply is \d+ bytes, over the payload limit of \d+ bytes$/);
    });

    it('drains on shutdown: calls in flight finish, later calls find no responders', async () => {
      const received = deferred();
      const impl = doubler('a', async () => {
        received.resolve();
        await new Promise((r) => setTimeout(r, 300));
      });
      const serverTransport = await getHarness().connect('server');
      await serverTransport.serve(DenoiserDefinition, impl, { scope: SCOPE });
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE, retries: 0 });
      const call = denoiser.denoise(request(1));
      await received.promise;
      const closing = serverTransport.close({ graceMs: 10_000 });
      const res = await call;
      expect(res.batchRows).toBe(1);
      await closing;
      expect(await serverTransport.closed).toBeNull();
      await expect(denoiser.denoise(request(1))).rejects.toBeInstanceOf(UnavailableError);
      await expect(serverTransport.serve(DenoiserDefinition, impl, { scope: SCOPE })).rejects.toBeInstanceOf(UnavailableError);
    });

    it('a handler still running after the grace period is aborted and answered UNAVAILABLE', async () => {
      const received = deferred();
      let sawAbort = false;
      const impl = doubler('a', async (_req, ctx) => {
        received.resolve();
        await untilAborted(ctx.signal).catch(() => {
          sawAbort = true;
        });
      });
      const serverTransport = await getHarness().connect('server');
      const srv = await serverTransport.serve(DenoiserDefinition, impl, { scope: SCOPE });
      const denoiser = (await connect('client')).client(DenoiserDefinition, { scope: SCOPE, retries: 0 });
      const call = denoiser.denoise(request(1)).catch((e: unknown) => e);
      await received.promise;
      await serverTransport.close({ graceMs: 100 });
      const err = await call;
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as Error).message).toContain('Denoiser replica stopped before answering (grace 100 ms)');
      expect(sawAbort).toBe(true);
      expect(srv.inFlight).toBe(0);
    });

    it('rejects bad subject scopes and incomplete implementations with errors naming them', async () => {
      const t = await connect('x');
      expect(() => t.client(DenoiserDefinition, { scope: 'a.b' })).toThrow(/scope must be a non-empty subject token/);
      expect(() => t.client(DenoiserDefinition, { scope: '' })).toThrow(InvalidArgumentError);
      expect(() => t.client(DenoiserDefinition, { scope: 'ok', timeoutMs: -1 })).toThrow(/timeoutMs/);
      const partial = { info: () => DenoiserInfo.create() } as unknown as ServiceImpl<typeof DenoiserDefinition>;
      await expect(t.serve(DenoiserDefinition, partial, { scope: SCOPE })).rejects.toThrow(/lacks method denoise/);
    });
  });
}
