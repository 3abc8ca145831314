// The transport suite against a real nats-server with JetStream (max_payload 64 KiB), plus what
// only NATS has: JetStream set-up and errors, reconnects and server restarts, authentication,
// connection options, malformed bytes from a foreign publisher.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NatsConnection } from '@nats-io/transport-node';

import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { encodeAccount, encodeOperator, encodeUser, fmtCreds } from '@nats-io/jwt';
import { createAccount, createOperator, createUser } from '@nats-io/nkeys';
import {
  Code,
  FailedPreconditionError,
  InvalidArgumentError,
  PermissionDeniedError,
  UnauthenticatedError,
  UnavailableError,
} from '../../shared/errors.ts';
import { DenoiseRequest, DenoiserDefinition, DenoiserInfo, DenoiseResponse } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { H_KIND, H_MESSAGE, H_STATUS } from '../../shared/transport/bus.ts';
import { connectNats, NatsBus, natsTransport } from '../../shared/transport/nats.ts';
import { pino } from 'pino';
import { makeServiceNkeys, writeSeedFiles } from '../../shared/transport/nats-credentials.ts';
import { NATS_SERVICES, natsPermissions, type NatsService } from '../../shared/transport/nats-permissions.ts';
import type { Transport } from '../../shared/transport/types.ts';
import { assertNoNatsServersRunning, type NatsServerHandle, startNatsServer } from '../helpers/nats.ts';
import { TEST_QUEUE, transportSuite } from './suite.ts';

const MAX_PAYLOAD = 64 * 1024;
let server: NatsServerHandle;
const connections: NatsConnection[] = [];
const byTransport = new Map<Transport, NatsConnection>();

beforeAll(async () => {
  server = await startNatsServer({ maxPayload: MAX_PAYLOAD });
});

afterAll(async () => {
  for (const nc of connections) expect(nc.isClosed()).toBe(true);
  await server.stop();
  assertNoNatsServersRunning();
});

transportSuite('nats', () => ({
  maxPayload: MAX_PAYLOAD,
  connect: async (name) => {
    const nc = await connectNats({ servers: server.url, name });
    connections.push(nc);
    const t = natsTransport(nc);
    byTransport.set(t, nc);
    return t;
  },
  // A killed process: the connection closes without draining, nothing acknowledged.
  kill: async (t) => {
    await byTransport.get(t)?.close();
  },
}));

const echoImpl = {
  denoise: () => DenoiseResponse.create({ batchRows: 7 }),
  info: () => DenoiserInfo.create({ model: 'm' }),
};
// Every other field at its default, so a new DenoiseRequest field needs no edit here.
const step = DenoiseRequest.create({ model: 'm', t: [1n], y: [0] });

describe('nats only', () => {
  it('reads the max_payload the server announced', async () => {
    const nc = await connectNats({ servers: [server.url] });
    expect(nc.info?.max_payload).toBe(MAX_PAYLOAD);
    await nc.close();
  });

  it('answers malformed control-call bytes from a foreign publisher with INVALID_ARGUMENT in headers', async () => {
    const nc = await connectNats({ servers: server.url, name: 'raw' });
    const t = natsTransport(nc);
    await t.serve(DenoiserDefinition, echoImpl, { scope: 'raw', queueSettings: TEST_QUEUE });
    const reply = await nc.request('ditpipe.v1.denoiser.raw.info.all', new Uint8Array([0x0a, 0xff, 0xff]), { timeout: 2_000 });
    expect(reply.data.length).toBe(0);
    expect(reply.headers?.get(H_STATUS)).toBe(String(Code.INVALID_ARGUMENT));
    expect(reply.headers?.get(H_KIND)).toBe('InvalidArgument');
    expect(decodeURIComponent(reply.headers?.get(H_MESSAGE) ?? '')).toMatch(/^malformed Denoiser\.Info request: /);
    // Garbage published into the work queue is dropped; the queue keeps serving real work.
    await nc.request('ditpipe.v1.denoiser.raw.denoise', new Uint8Array([0x0a, 0xff, 0xff]), { timeout: 2_000 });
    const client = t.client(DenoiserDefinition, { scope: 'raw', queueSettings: TEST_QUEUE });
    expect((await client.denoise(step)).batchRows).toBe(7);
    await expect.poll(() => client.queueOf('denoise').info()).toMatchObject({ pending: 0, ackPending: 0 });
    await t.close();
  });

  it('a server without JetStream is a clear FAILED_PRECONDITION, for replicas and callers alike', async () => {
    const plain = await startNatsServer({ jetstream: false });
    try {
      const t = natsTransport(await connectNats({ servers: plain.url }));
      const err = await t.serve(DenoiserDefinition, echoImpl, { scope: 'nojs' }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(FailedPreconditionError);
      expect((err as Error).message).toMatch(/has no JetStream.*nats-server with -js/);
      const callErr = await t
        .client(DenoiserDefinition, { scope: 'nojs' })
        .denoise(step)
        .catch((e: unknown) => e);
      expect(callErr).toBeInstanceOf(FailedPreconditionError);
      await t.close();
    } finally {
      await plain.stop();
    }
  });

  it('a queue larger than the server can hold is a clear error naming the setting', async () => {
    const t = natsTransport(await connectNats({ servers: server.url }));
    const err = await t
      .serve(DenoiserDefinition, echoImpl, { scope: 'huge', queueSettings: { maxBytes: 64 * 1024 * 1024 * 1024 } })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPreconditionError);
    expect((err as Error).message).toMatch(/cannot hold work queue ditpipe_v1_denoiser_huge.*DITPIPE_QUEUE_MAX_BYTES/);
    await t.close();
  });

  it('a NATS restart that loses the memory store fails no waiting call: queues are made again and work re-sent', async () => {
    const first = await startNatsServer();
    const port = first.port;
    let current = first;
    const conn = (name: string): Promise<NatsConnection> =>
      connectNats({ servers: `nats://127.0.0.1:${port}`, name, reconnectTimeWaitMs: 200 });
    const replicaT = natsTransport(await conn('replica'));
    const clientT = natsTransport(await conn('client'));
    try {
      let calls = 0;
      const srv = await replicaT.serve(
        DenoiserDefinition,
        {
          denoise: async () => {
            calls++;
            await new Promise((r) => setTimeout(r, 50));
            return DenoiseResponse.create({ batchRows: 1 });
          },
          info: echoImpl.info,
        },
        { scope: 'restart', queueSettings: TEST_QUEUE },
      );
      const resent: number[] = [];
      const fallbacks: string[] = [];
      const client = clientT.client(DenoiserDefinition, {
        scope: 'restart',
        queueSettings: TEST_QUEUE,
        onWorkEvent: (e) => {
          if (e.kind === 'resent') resent.push(e.messages);
          if (e.kind === 'fallback') fallbacks.push(e.reason);
        },
      });
      const waiting = Array.from({ length: 10 }, () => client.denoise(step, { timeoutMs: 30_000 }));
      // Observed below; this only keeps a failure here from adding unhandled rejections.
      for (const w of waiting) w.catch(() => undefined);
      await current.stop();
      // The client notices the closed socket asynchronously, a moment after the server exits.
      await expect.poll(() => clientT.connected, { timeout: 10_000, interval: 20 }).toBe(false);
      // A direct call made while NATS is away cannot be sent to its target: it waits for the queue.
      const direct = client.denoise(step, { timeoutMs: 30_000, target: srv.instance });
      direct.catch(() => undefined);
      await new Promise((r) => setTimeout(r, 1_000));
      current = await startNatsServer({ port });
      const results = await Promise.all([...waiting, direct]);
      expect(results.map((r) => r.batchRows)).toEqual(Array(11).fill(1));
      expect(fallbacks).toEqual(['unsent']);
      expect(clientT.connected).toBe(true);
      expect(calls).toBeGreaterThanOrEqual(10);
      // New work after the restart is served without restarting anything.
      expect((await client.denoise(step, { timeoutMs: 10_000 })).batchRows).toBe(1);
      expect(resent.reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    } finally {
      await Promise.all([replicaT.close({ graceMs: 100 }), clientT.close({ graceMs: 100 })]);
      await current.stop();
    }
  });

  it('closes cleanly while the NATS server is down, after serving and calling', async () => {
    const down = await startNatsServer();
    const conn = (name: string): Promise<NatsConnection> => connectNats({ servers: down.url, name, reconnectTimeWaitMs: 100 });
    const replicaT = natsTransport(await conn('replica'));
    const clientT = natsTransport(await conn('client'));
    await replicaT.serve(DenoiserDefinition, echoImpl, { scope: 'close-down', queueSettings: TEST_QUEUE });
    const client = clientT.client(DenoiserDefinition, { scope: 'close-down', queueSettings: TEST_QUEUE });
    expect((await client.denoise(step, { timeoutMs: 10_000 })).batchRows).toBe(7);
    // With the server up, a close drains.
    await expect(natsTransport(await conn('up')).close()).resolves.toEqual({ drained: true });
    await down.stop();
    await new Promise((r) => setTimeout(r, 300));
    // Draining needs a final round trip to the server; without one the connection is closed.
    const results = await Promise.all([replicaT.close({ graceMs: 100 }), clientT.close({ graceMs: 100 })]);
    for (const r of results) {
      expect(r.drained).toBe(false);
      expect(r.reason).toMatch(/NATS unreachable/);
    }
    expect(replicaT.connected || clientT.connected).toBe(false);
  });

  it('tells its logger of the errors it handles itself: a connection listener that throws is logged, the others still hear', async () => {
    const down = await startNatsServer();
    const lines: Array<Record<string, unknown>> = [];
    const log = pino({ level: 'debug' }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) });
    const nc = await connectNats({ servers: down.url, name: 'listener-log', reconnectTimeWaitMs: 100 });
    const bus = new NatsBus(nc, { log });
    const heard: string[] = [];
    bus.onConnection(() => {
      throw new Error('listener boom');
    });
    bus.onConnection((ev) => heard.push(ev));
    try {
      await down.stop();
      await expect.poll(() => heard, { timeout: 10_000 }).toContain('disconnected');
      expect(lines).toContainEqual(
        expect.objectContaining({ level: 50, err: 'Error: listener boom', msg: "a NATS connection listener threw on 'disconnected'" }),
      );
    } finally {
      await nc.close();
    }
  });

  it('validates connection options, naming the field', async () => {
    await expect(connectNats({ servers: [] })).rejects.toThrow(/at least one server URL/);
    const e = await connectNats({ servers: server.url, user: 'a' }).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(InvalidArgumentError);
    expect((e as InvalidArgumentError).field).toBe('password');
    await expect(connectNats({ servers: server.url, user: 'a', password: 'b', token: 't' })).rejects.toThrow(/only one of/);
    await expect(connectNats({ servers: server.url, credsFile: '/nonexistent/x.creds' })).rejects.toThrow(
      /credsFile \/nonexistent\/x\.creds: ENOENT/,
    );
    const down = await connectNats({ servers: 'nats://127.0.0.1:1', connectTimeoutMs: 1_000 }).catch((err: unknown) => err);
    expect(down).toBeInstanceOf(UnavailableError);
    expect((down as Error).message).toContain('cannot connect to NATS at nats://127.0.0.1:1');
  });
});

describe('nats authentication', () => {
  it('user/password: refused without or with wrong credentials, served with the right ones', async () => {
    const secured = await startNatsServer({ auth: { user: 'ditpipe', password: 'p@ss word"' } });
    try {
      await expect(connectNats({ servers: secured.url })).rejects.toBeInstanceOf(UnauthenticatedError);
      await expect(connectNats({ servers: secured.url, user: 'ditpipe', password: 'wrong' })).rejects.toBeInstanceOf(UnauthenticatedError);
      const a = natsTransport(await connectNats({ servers: secured.url, user: 'ditpipe', password: 'p@ss word"' }));
      const b = natsTransport(await connectNats({ servers: secured.url, user: 'ditpipe', password: 'p@ss word"' }));
      await a.serve(DenoiserDefinition, echoImpl, { scope: 'auth' });
      const res = await b.client(DenoiserDefinition, { scope: 'auth' }).denoise(step);
      expect(res.batchRows).toBe(7);
      await Promise.all([a.close(), b.close()]);
    } finally {
      await secured.stop();
    }
  });

  it('token: refused without or with a wrong token, served with the right one', async () => {
    const secured = await startNatsServer({ auth: { token: 's3cret-token' } });
    try {
      const err = await connectNats({ servers: secured.url, token: 'nope' }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnauthenticatedError);
      expect((err as UnauthenticatedError).code).toBe(Code.UNAUTHENTICATED);
      expect((err as Error).message).toContain(`NATS at ${secured.url} refused the credentials`);
      const t = natsTransport(await connectNats({ servers: secured.url, token: 's3cret-token' }));
      await t.serve(DenoiserDefinition, echoImpl, { scope: 'tok' });
      const infos = await t.client(DenoiserDefinition, { scope: 'tok' }).collect('info', {}, { waitMs: 200 });
      expect(infos).toHaveLength(1);
      await t.close();
      expect(await t.closed).toBeNull();
    } finally {
      await secured.stop();
    }
  });

  it("nkey: refused without one or with a stranger's, served with the listed ones; a malformed seed file is named", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ditpipe-nkey-test-'));
    const keys = makeServiceNkeys();
    const seeds = writeSeedFiles(dir, keys);
    const secured = await startNatsServer({
      auth: { users: NATS_SERVICES.map((service) => ({ service, nkey: keys[service].publicKey })) },
    });
    try {
      expect(statSync(seeds.denoiser).mode & 0o777).toBe(0o600);
      await expect(connectNats({ servers: secured.url })).rejects.toBeInstanceOf(UnauthenticatedError);
      const strangers = writeSeedFiles(join(dir, 'strangers'), makeServiceNkeys());
      await expect(connectNats({ servers: secured.url, nkeyFile: strangers.scheduler })).rejects.toBeInstanceOf(UnauthenticatedError);
      writeFileSync(join(dir, 'bad.nk'), 'not a seed\n');
      const bad = await connectNats({ servers: secured.url, nkeyFile: join(dir, 'bad.nk') }).catch((e: unknown) => e);
      expect(bad).toBeInstanceOf(InvalidArgumentError);
      expect((bad as InvalidArgumentError).field).toBe('nkeyFile');
      expect((bad as Error).message).toContain(`nats nkeyFile ${join(dir, 'bad.nk')} does not hold a user nkey seed`);
      await expect(connectNats({ servers: secured.url, nkeyFile: seeds.denoiser, token: 'x' })).rejects.toBeInstanceOf(
        InvalidArgumentError,
      );
      // The denoiser serves, the scheduler calls: both work (stream made by the scheduler's first call).
      const replica = natsTransport(await connectNats({ servers: secured.url, nkeyFile: seeds.denoiser, service: 'denoiser' }));
      const scheduler = natsTransport(await connectNats({ servers: secured.url, nkeyFile: seeds.scheduler, service: 'scheduler' }));
      await replica.serve(DenoiserDefinition, echoImpl, { scope: 'nk', queueSettings: TEST_QUEUE });
      const client = scheduler.client(DenoiserDefinition, { scope: 'nk', queueSettings: TEST_QUEUE, timeoutMs: 10_000 });
      expect((await client.denoise(step)).batchRows).toBe(7);
      expect(await client.collect('info', {}, { waitMs: 200 })).toHaveLength(1);
      await Promise.all([replica.close(), scheduler.close()]);
      expect(secured.log()).not.toMatch(/Violation/);
    } finally {
      await secured.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('creds (operator/JWT mode): a user JWT signed by the account in a creds file is served; one signed by an account the server does not know is refused', async () => {
    // Operator, account (with JetStream) and a user per service, signed as nsc would, with the
    // services' permissions in their user JWTs; the server resolves the account from memory.
    const operator = createOperator();
    const account = createAccount();
    const system = createAccount();
    const opJwt = await encodeOperator('ditpipe-test', operator, { system_account: system.getPublicKey() });
    // Unlimited, JetStream in memory included (an account's limits default to none at all).
    const limits = {
      conn: -1,
      subs: -1,
      data: -1,
      payload: -1,
      imports: -1,
      exports: -1,
      leaf: -1,
      wildcards: true,
      mem_storage: -1,
      disk_storage: -1,
      streams: -1,
      consumer: -1,
    };
    const accJwt = await encodeAccount('ditpipe', account, { limits }, { signer: operator });
    const sysJwt = await encodeAccount('SYS', system, {}, { signer: operator });
    const dir = mkdtempSync(join(tmpdir(), 'ditpipe-creds-test-'));
    const creds = async (service: NatsService, signer = account): Promise<string> => {
      const user = createUser();
      const p = natsPermissions(service);
      const jwt = await encodeUser(service, user, signer, { pub: { allow: p.publish }, sub: { allow: p.subscribe } });
      const file = join(dir, `${service}-${user.getPublicKey().slice(0, 8)}.creds`);
      writeFileSync(file, fmtCreds(jwt, user), { mode: 0o600 });
      return file;
    };
    const secured = await startNatsServer({
      extraConfig: [
        `operator: ${JSON.stringify(opJwt)}`,
        `system_account: ${system.getPublicKey()}`,
        'resolver: MEMORY',
        `resolver_preload: { ${account.getPublicKey()}: ${JSON.stringify(accJwt)}, ${system.getPublicKey()}: ${JSON.stringify(sysJwt)} }`,
      ].join('\n'),
    });
    try {
      await expect(connectNats({ servers: secured.url })).rejects.toBeInstanceOf(UnauthenticatedError);
      const stranger = createAccount(); // an account the server does not know
      await expect(connectNats({ servers: secured.url, credsFile: await creds('scheduler', stranger) })).rejects.toBeInstanceOf(
        UnauthenticatedError,
      );
      const missing = await connectNats({ servers: secured.url, credsFile: join(dir, 'none.creds') }).catch((e: unknown) => e);
      expect((missing as InvalidArgumentError).field).toBe('credsFile');
      const replica = natsTransport(await connectNats({ servers: secured.url, credsFile: await creds('denoiser'), service: 'denoiser' }));
      const scheduler = natsTransport(
        await connectNats({ servers: secured.url, credsFile: await creds('scheduler'), service: 'scheduler' }),
      );
      const srv = await replica.serve(DenoiserDefinition, echoImpl, { scope: 'jwt', queueSettings: TEST_QUEUE });
      const fallbacks: string[] = [];
      const client = scheduler.client(DenoiserDefinition, {
        scope: 'jwt',
        queueSettings: TEST_QUEUE,
        timeoutMs: 10_000,
        onWorkEvent: (e) => e.kind === 'fallback' && fallbacks.push(e.reason),
      });
      expect((await client.denoise(step)).batchRows).toBe(7);
      // Direct calls: the scheduler may send to any replica's instance, the replica listen on its own.
      expect((await client.denoise(step, { target: srv.instance })).batchRows).toBe(7);
      expect(fallbacks).toEqual([]);
      // The permissions in the JWT hold: the denoiser's user cannot enqueue work.
      const intruder = natsTransport(await connectNats({ servers: secured.url, credsFile: await creds('denoiser'), service: 'denoiser' }));
      const denied = await intruder
        .client(DenoiserDefinition, { scope: 'jwt', queueSettings: TEST_QUEUE, timeoutMs: 10_000 })
        .denoise(step)
        .catch((e: unknown) => e);
      expect(denied).toBeInstanceOf(PermissionDeniedError);
      await Promise.all([replica.close(), scheduler.close(), intruder.close()]);
    } finally {
      await secured.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
