// The transport suite against a real nats-server (max_payload 64 KiB), plus what only NATS has:
// authentication, connection options, malformed bytes from a foreign publisher.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NatsConnection } from '@nats-io/transport-node';

import { Code, InvalidArgumentError, UnauthenticatedError, UnavailableError } from '../../shared/errors.ts';
import { DenoiserDefinition, DenoiserInfo, DenoiseResponse } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { connectNats, natsClient, natsTransport, serveOnNats } from '../../shared/transport/nats.ts';
import { H_KIND, H_MESSAGE, H_STATUS } from '../../shared/transport/rpc.ts';
import { assertNoNatsServersRunning, type NatsServerHandle, startNatsServer } from '../helpers/nats.ts';
import { transportSuite } from './suite.ts';

const MAX_PAYLOAD = 64 * 1024;
let server: NatsServerHandle;
const connections: NatsConnection[] = [];

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
    return natsTransport(nc);
  },
}));

const echoImpl = {
  denoise: () => DenoiseResponse.create({ batchRows: 7 }),
  info: () => DenoiserInfo.create({ model: 'm' }),
};

describe('nats only', () => {
  it('reads the max_payload the server announced', async () => {
    const nc = await connectNats({ servers: [server.url] });
    expect(nc.info?.max_payload).toBe(MAX_PAYLOAD);
    await nc.close();
  });

  it('answers malformed bytes from a foreign publisher with INVALID_ARGUMENT in headers', async () => {
    const nc = await connectNats({ servers: server.url, name: 'raw' });
    const srv = await serveOnNats(nc, DenoiserDefinition, echoImpl, { scope: 'raw' });
    const reply = await nc.request('ditpipe.v1.denoiser.raw.denoise', new Uint8Array([0x0a, 0xff, 0xff]), { timeout: 2_000 });
    expect(reply.data.length).toBe(0);
    expect(reply.headers?.get(H_STATUS)).toBe(String(Code.INVALID_ARGUMENT));
    expect(reply.headers?.get(H_KIND)).toBe('InvalidArgument');
    expect(decodeURIComponent(reply.headers?.get(H_MESSAGE) ?? '')).toMatch(/^malformed Denoiser\.Denoise request: /);
    // And the typed client on the same connection works.
    const client = natsClient(nc, DenoiserDefinition, { scope: 'raw' });
    expect((await client.denoise({ model: 'm', t: [], y: [], guidanceChannels: 0, requestId: '', stepIndex: 0 })).batchRows).toBe(7);
    await srv.stop();
    await nc.drain();
  });

  it('a replica whose connection dies mid-request: the idempotent call is retried on the other one', async () => {
    const ncHung = await connectNats({ servers: server.url, name: 'hung' });
    const ncOk = await connectNats({ servers: server.url, name: 'ok' });
    const ncClient = await connectNats({ servers: server.url, name: 'client' });
    connections.push(ncHung, ncOk, ncClient);
    let hungCalls = 0;
    let okCalls = 0;
    let died!: () => void;
    const diedPromise = new Promise<void>((r) => {
      died = r;
    });
    await serveOnNats(ncHung, DenoiserDefinition, {
      denoise: async () => {
        hungCalls++;
        // The process "dies": its connection closes without answering.
        await ncHung.close();
        died();
        return DenoiseResponse.create({ batchRows: -1 });
      },
      info: echoImpl.info,
    }, { scope: 'crash' });
    const client = natsClient(ncClient, DenoiserDefinition, { scope: 'crash', retries: 3, attemptTimeoutMs: 300 });
    // Only the doomed replica listens when the call goes out, so it surely gets the first attempt.
    const call = client.denoise({ model: 'm', t: [5n], y: [1], guidanceChannels: 0, requestId: '', stepIndex: 0 });
    await diedPromise;
    await serveOnNats(ncOk, DenoiserDefinition, {
      denoise: () => {
        okCalls++;
        return DenoiseResponse.create({ batchRows: 1 });
      },
      info: echoImpl.info,
    }, { scope: 'crash' });
    expect((await call).batchRows).toBe(1);
    expect([hungCalls, okCalls]).toEqual([1, 1]);
    await Promise.all([ncOk.drain(), ncClient.drain()]);
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
      await expect(connectNats({ servers: secured.url, user: 'ditpipe', password: 'wrong' })).rejects.toBeInstanceOf(
        UnauthenticatedError,
      );
      const a = natsTransport(await connectNats({ servers: secured.url, user: 'ditpipe', password: 'p@ss word"' }));
      const b = natsTransport(await connectNats({ servers: secured.url, user: 'ditpipe', password: 'p@ss word"' }));
      await a.serve(DenoiserDefinition, echoImpl, { scope: 'auth' });
      const res = await b.client(DenoiserDefinition, { scope: 'auth' }).denoise({ model: 'm', t: [1n], y: [0], guidanceChannels: 0, requestId: '', stepIndex: 0 });
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
});
