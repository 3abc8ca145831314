// gRPC security against real servers: TLS and mutual TLS with certificates made by the test,
// bearer tokens (UNAUTHENTICATED / PERMISSION_DENIED, never logged), health reachable for probes
// (plaintext health port, no token), reflection behind the token unless public; and the clients'
// errors say what to fix.
import { Writable } from 'node:stream';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SamplerApi, checkAddress } from '../../shared/client.ts';
import { Code, InvalidArgumentError } from '../../shared/errors.ts';
import { ListModelsResponse, ModelInfo, SamplerService, type SamplerServer } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { TokenSet } from '../../shared/server/auth.ts';
import { GrpcServer, loadGrpcTls, SERVICE_NAMES } from '../../shared/server/grpc.ts';
import { healthStatus } from '../helpers/grpc.ts';
import { makeTestPki, type TestPki } from '../helpers/certs.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';
import { failureOf } from '../helpers/failure.ts';

const FULL = 'full-access-token-0123456789abcdef';
const LIST_ONLY = 'list-only-token-0123456789abcdef';

let pki: TestPki;
beforeAll(() => {
  pki = makeTestPki();
});
afterAll(() => pki?.cleanup());

/** A server-reflection list request; resolves with the status code (0 = answered). */
async function reflectionCode(address: string, creds: grpc.ChannelCredentials): Promise<number> {
  const client = new grpc.Client(address, creds);
  try {
    return await new Promise<number>((resolve) => {
      const s = client.makeBidiStreamRequest(
        '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
        (b: Buffer) => b,
        (b: Buffer) => b,
      );
      s.on('data', () => {
        resolve(0);
        s.cancel();
      });
      s.on('error', (e: grpc.ServiceError) => resolve(e.code));
      s.write(Buffer.from([0x3a, 0x01, 0x2a])); // list_services: "*"
      s.end();
    });
  } finally {
    client.close();
  }
}

describe('TLS and bearer tokens on the Sampler API', () => {
  let p: Pipeline;
  let logged = '';
  beforeAll(async () => {
    const sink = new Writable({ write: (chunk, _enc, cb) => ((logged += chunk.toString()), cb()) });
    const tokens = TokenSet.parse(`# test tokens\n${FULL}\n${LIST_ONLY} ditpipe.v1.Sampler/ListModels\n`, 'test tokens');
    p = await startPipeline({
      transport: { kind: 'inproc' },
      grpc: {
        tls: loadGrpcTls({ certFile: pki.server.cert, keyFile: pki.server.key }),
        tokens,
        healthPort: 0,
        log: pino({ level: 'info' }, sink),
      },
      client: { tls: { caFile: pki.ca.cert }, token: FULL },
    });
  });
  afterAll(async () => {
    await p?.stop();
  });

  it('serves a TLS client holding a valid token', async () => {
    const res = await p.api.generate({ model: DIT_NAME, classLabels: [{ index: 3 }], numSteps: 3, seed: 1n });
    expect(res.images).toHaveLength(1);
    expect(p.grpc.security).toBe('TLS, bearer tokens (2)');
  });

  it("answers UNAUTHENTICATED without a token or with a wrong one, PERMISSION_DENIED outside a token's scope", async () => {
    const tls = { caFile: pki.ca.cert };
    for (const token of [undefined, 'not-the-token-0123456789abcdef']) {
      const api = new SamplerApi(p.address, { tls, token });
      try {
        const e = await failureOf(api.listModels());
        expect(e.code).toBe(Code.UNAUTHENTICATED);
      } finally {
        api.close();
      }
    }
    const scoped = new SamplerApi(p.address, { tls, token: LIST_ONLY });
    try {
      expect((await scoped.listModels()).map((m) => m.name)).toEqual([DIT_NAME]);
      const e = await failureOf(scoped.generate({ model: DIT_NAME, classLabels: [{ index: 1 }], numSteps: 2 }));
      expect(e.code).toBe(Code.PERMISSION_DENIED);
      expect(e.message).toContain('/ditpipe.v1.Sampler/Generate');
    } finally {
      scoped.close();
    }
    // Refusals are logged (rate-limited), tokens never.
    await p.grpc.stop(1_000).catch(() => undefined);
    expect(logged).toMatch(/refused a call to \/ditpipe.v1.Sampler\/ListModels: UNAUTHENTICATED/);
    expect(logged).toMatch(/PERMISSION_DENIED/);
    for (const t of [FULL, LIST_ONLY, 'not-the-token']) expect(logged).not.toContain(t);
  });
});

describe('health, reflection and mutual TLS', () => {
  let server: GrpcServer;
  const impl: SamplerServer = {
    generate: (_c, cb) => cb({ code: Code.UNIMPLEMENTED, details: 'no' }),
    generateStream: (c) => c.end(),
    listModels: (_c, cb) => cb(null, ListModelsResponse.create({ models: [ModelInfo.create({ name: 'm' })] })),
  };
  beforeAll(async () => {
    server = new GrpcServer({
      host: '127.0.0.1',
      port: 0,
      tls: loadGrpcTls({ certFile: pki.server.cert, keyFile: pki.server.key, clientCaFile: pki.ca.cert }),
      tokens: TokenSet.fromList(FULL, 'test'),
      reflection: 'public',
      healthPort: 0,
    });
    server.addService({ fullName: SERVICE_NAMES.sampler, definition: SamplerService, impl, maxRequestBytes: 1024 });
    await server.listen();
  });
  afterAll(async () => {
    await server?.stop(500);
  });

  const clientCreds = (c: { certPem: Buffer; keyPem: Buffer } | null, ca = pki.ca.certPem): grpc.ChannelCredentials =>
    grpc.credentials.createSsl(ca, c?.keyPem ?? null, c?.certPem ?? null);

  it('accepts only clients with a certificate signed by the client CA', async () => {
    expect(server.security).toBe('mutual TLS, bearer tokens (1)');
    const ok = new SamplerApi(server.address, {
      tls: { caFile: pki.ca.cert, certFile: pki.client.cert, keyFile: pki.client.key },
      token: FULL,
    });
    try {
      expect((await ok.listModels()).map((m) => m.name)).toEqual(['m']);
    } finally {
      ok.close();
    }
    for (const [name, tls] of [
      ['no client certificate', { caFile: pki.ca.cert }],
      ['a certificate from another CA', { caFile: pki.ca.cert, certFile: pki.strangerClient.cert, keyFile: pki.strangerClient.key }],
    ] as const) {
      const api = new SamplerApi(server.address, { tls, token: FULL });
      try {
        const e = await failureOf(api.listModels({ timeoutMs: 5_000 }));
        expect(e.code, name).toBe(Code.UNAVAILABLE);
      } finally {
        api.close();
      }
    }
  });

  it('keeps health reachable for probes: without a token over TLS, and on the plaintext health port', async () => {
    expect(await healthStatus(server.address, '', clientCreds(pki.client))).toBe(1);
    expect(server.healthPort).toBeGreaterThan(0);
    expect(await healthStatus(`127.0.0.1:${server.healthPort}`, '', grpc.credentials.createInsecure())).toBe(1);
    // The health port serves health only.
    const api = new SamplerApi(`127.0.0.1:${server.healthPort}`, { token: FULL });
    try {
      expect((await failureOf(api.listModels())).code).toBe(Code.UNIMPLEMENTED);
    } finally {
      api.close();
    }
  });

  it('serves reflection without a token when public, and behind the token otherwise', async () => {
    expect(await reflectionCode(server.address, clientCreds(pki.client))).toBe(0);
    const guarded = new GrpcServer({ host: '127.0.0.1', port: 0, tokens: TokenSet.fromList(FULL, 'test') });
    guarded.addService({ fullName: SERVICE_NAMES.sampler, definition: SamplerService, impl, maxRequestBytes: 1024 });
    await guarded.listen();
    try {
      expect(await reflectionCode(guarded.address, grpc.credentials.createInsecure())).toBe(Code.UNAUTHENTICATED);
      expect(await healthStatus(guarded.address, '', grpc.credentials.createInsecure())).toBe(1);
    } finally {
      await guarded.stop(500);
    }
  });

  it('tells a client what to fix when it cannot connect', async () => {
    const p2 = new GrpcServer({ host: '127.0.0.1', port: 0 });
    p2.addService({ fullName: SERVICE_NAMES.sampler, definition: SamplerService, impl, maxRequestBytes: 1024 });
    await p2.listen();
    const plain = new SamplerApi(server.address);
    const wrongCa = new SamplerApi(server.address, {
      tls: { caFile: pki.otherCa.cert, certFile: pki.client.cert, keyFile: pki.client.key },
    });
    const nobody = new SamplerApi('127.0.0.1:1');
    try {
      expect((await failureOf(plain.listModels({ timeoutMs: 5_000 }))).message).toMatch(/if it serves TLS, add --tls/);
      expect((await failureOf(wrongCa.listModels({ timeoutMs: 5_000 }))).message).toMatch(
        /not trusted: give the CA that signed it with --tls-ca/,
      );
      expect((await failureOf(nobody.listModels({ timeoutMs: 5_000 }))).message).toMatch(
        /is a server listening on 127\.0\.0\.1:1\? try npm start/,
      );
      const tlsToPlain = new SamplerApi(p2.address, { tls: { caFile: pki.ca.cert } });
      try {
        expect((await failureOf(tlsToPlain.listModels({ timeoutMs: 5_000 }))).message).toMatch(/does not speak TLS: drop --tls/);
      } finally {
        tlsToPlain.close();
      }
    } finally {
      [plain, wrongCa, nobody].forEach((a) => a.close());
      await p2.stop(500);
    }
  });
});

describe('configuration errors name what is wrong', () => {
  it("refuses a host without a port, a key that is not the certificate's, short tokens", () => {
    expect(() => checkAddress('127.0.0.1', '--server')).toThrow(
      /--server "127.0.0.1" is not host:port; a port is required \(e.g. 127.0.0.1:50051\)/,
    );
    expect(() => new SamplerApi('localhost')).toThrow(InvalidArgumentError);
    expect(checkAddress('[::1]:50051')).toBe('[::1]:50051');
    expect(() => loadGrpcTls({ certFile: pki.server.cert, keyFile: pki.client.key })).toThrow(
      /--tls-key .*client-key\.pem is not the key of the certificate/,
    );
    expect(() => loadGrpcTls({ certFile: pki.server.cert })).toThrow(/TLS needs both --tls-cert and --tls-key/);
    expect(() => loadGrpcTls({ certFile: '/nonexistent.pem', keyFile: pki.server.key })).toThrow(
      /--tls-cert \/nonexistent.pem: no such file/,
    );
    expect(() => TokenSet.parse('short\n', 'tokens file t')).toThrow(/tokens file t line 1: a token must have at least 16 characters/);
    expect(() => TokenSet.parse(`${FULL} not/a/scope\n`, 'tokens file t')).toThrow(/line 1: scope "not\/a\/scope"/);
  });
});
