// NATS connection failures a person can see: a bounded first connect naming the URL, and TLS
// mismatches against a real nats-server configured with TLS (certificates made by the test) that
// fail at once with what to fix, instead of retrying forever; services exit non-zero on them.
import { spawnSync } from 'node:child_process';
import { resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FailedPreconditionError, UnavailableError } from '../../shared/errors.ts';
import { DenoiseRequest, DenoiserDefinition, DenoiserInfo, DenoiseResponse } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { connectNats, natsTransport } from '../../shared/transport/nats.ts';
import { probeNatsInfo } from '../../shared/transport/nats-diagnose.ts';
import { makeTestPki, type TestPki } from '../helpers/certs.ts';
import { testModels } from '../helpers/models.ts';
import { assertNoNatsServersRunning, startNatsServer, type NatsServerHandle } from '../helpers/nats.ts';

const BIN = resolve(import.meta.dirname, '../../bin/ditpipe.js');

let pki: TestPki;
let mtls: NatsServerHandle;
let plain: NatsServerHandle;
let tls: NatsServerHandle;

beforeAll(async () => {
  pki = makeTestPki();
  mtls = await startNatsServer({
    extraConfig: `tls { cert_file: ${JSON.stringify(pki.server.cert)}, key_file: ${JSON.stringify(pki.server.key)}, ca_file: ${JSON.stringify(pki.ca.cert)}, verify: true, timeout: 2 }`,
  });
  plain = await startNatsServer();
  // Server-verified TLS: clients check the server's certificate, the server asks for none.
  tls = await startNatsServer({
    extraConfig: `tls { cert_file: ${JSON.stringify(pki.server.cert)}, key_file: ${JSON.stringify(pki.server.key)}, timeout: 2 }`,
  });
});

afterAll(async () => {
  await Promise.all([mtls?.stop(), plain?.stop(), tls?.stop()]);
  assertNoNatsServersRunning();
  pki?.cleanup();
});

async function failure(p: Promise<unknown>): Promise<Error> {
  try {
    const nc = (await p) as { close(): Promise<void> };
    await nc.close();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected the connection to fail');
}

// Each waits up to a minute if it had to: a test that hangs instead of failing fast times out.
const patient = { waitOnFirstConnect: true, firstConnectTimeoutMs: 60_000 };

const echoImpl = {
  denoise: () => DenoiseResponse.create({ batchRows: 3 }),
  info: () => DenoiserInfo.create({ model: 'm' }),
};
// Every other field at its default, so a new DenoiseRequest field needs no edit here.
const step = DenoiseRequest.create({ model: 'm', t: [1n], y: [0] });

/** A replica and a caller on two TLS connections: work and a control call go through. */
async function serveAndCall(url: string, tlsOpts: { caFile: string; certFile?: string; keyFile?: string }, scope: string): Promise<void> {
  const a = natsTransport(await connectNats({ servers: url, tls: tlsOpts, name: `${scope}-replica` }));
  const b = natsTransport(await connectNats({ servers: url, tls: tlsOpts, name: `${scope}-caller` }));
  try {
    await a.serve(DenoiserDefinition, echoImpl, { scope });
    const client = b.client(DenoiserDefinition, { scope, timeoutMs: 10_000 });
    expect((await client.denoise(step)).batchRows).toBe(3);
    expect((await client.info({})).model).toBe('m');
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
}

describe('NATS over TLS', () => {
  it('server-verified TLS: serves and calls with the CA that signed the server; refuses without it', async () => {
    expect(await probeNatsInfo(tls.url)).toMatchObject({ tls_required: true });
    expect((await probeNatsInfo(tls.url))?.tls_verify).toBeFalsy();
    await serveAndCall(tls.url, { caFile: pki.ca.cert }, 'tls');
    const untrusted = await failure(connectNats({ servers: tls.url, ...patient }));
    expect(untrusted).toBeInstanceOf(FailedPreconditionError);
    expect(untrusted.message).toContain('--nats-tls-ca');
  });

  it("mutual TLS: serves and calls with a client certificate the server trusts; a stranger's is refused", async () => {
    await serveAndCall(mtls.url, { caFile: pki.ca.cert, certFile: pki.client.cert, keyFile: pki.client.key }, 'mtls');
    const stranger = await failure(
      connectNats({
        servers: mtls.url,
        tls: { caFile: pki.ca.cert, certFile: pki.strangerClient.cert, keyFile: pki.strangerClient.key },
        connectTimeoutMs: 3_000,
        ...patient,
      }),
    );
    expect(stranger).toBeInstanceOf(FailedPreconditionError);
    expect(stranger.message).toContain(`with the client certificate ${pki.strangerClient.cert}: is it signed by a CA the server trusts?`);
  });
});

describe('NATS connect', () => {
  it('gives up after the first-connect timeout with an error naming the URL', async () => {
    const e = await failure(connectNats({ servers: 'nats://127.0.0.1:1', waitOnFirstConnect: true, firstConnectTimeoutMs: 1_500 }));
    expect(e).toBeInstanceOf(UnavailableError);
    expect(e.message).toMatch(
      /^cannot connect to NATS at nats:\/\/127\.0\.0\.1:1 within 2 s \(\d+ attempts\): .*is a nats-server running there/,
    );
  });

  it('fails at once, saying what to fix, on every TLS mismatch against a mutual-TLS nats-server', async () => {
    expect(await probeNatsInfo(mtls.url)).toMatchObject({ tls_required: true, tls_verify: true });
    const noTls = await failure(connectNats({ servers: mtls.url, ...patient }));
    expect(noTls).toBeInstanceOf(FailedPreconditionError);
    expect(noTls.message).toContain(`NATS at ${mtls.url} uses TLS with a certificate this process does not trust`);
    expect(noTls.message).toContain('--nats-tls-ca');

    const wrongCa = await failure(connectNats({ servers: mtls.url, tls: { caFile: pki.otherCa.cert }, ...patient }));
    expect(wrongCa).toBeInstanceOf(FailedPreconditionError);
    expect(wrongCa.message).toContain(`signed by the CA in ${pki.otherCa.cert}`);

    const noCert = await failure(connectNats({ servers: mtls.url, tls: { caFile: pki.ca.cert }, connectTimeoutMs: 3_000, ...patient }));
    expect(noCert).toBeInstanceOf(FailedPreconditionError);
    expect(noCert.message).toContain('requires a client certificate (mutual TLS): give --nats-tls-cert and --nats-tls-key');

    const nc = await connectNats({
      servers: mtls.url,
      tls: { caFile: pki.ca.cert, certFile: pki.client.cert, keyFile: pki.client.key },
      ...patient,
    });
    await nc.flush();
    await nc.close();
  });

  it('fails at once when TLS is configured against a server without TLS', async () => {
    const e = await failure(connectNats({ servers: plain.url, tls: { caFile: pki.ca.cert }, ...patient }));
    expect(e).toBeInstanceOf(FailedPreconditionError);
    expect(e.message).toContain(`NATS at ${plain.url} does not use TLS, but TLS is configured`);
  });

  it('a service exits non-zero with the error when NATS is unreachable or mismatched', () => {
    const { ditDir } = testModels();
    const run = (args: string[]): { status: number | null; out: string } => {
      const r = spawnSync(
        process.execPath,
        [BIN, 'denoiser', '--model-dir', ditDir, '--grpc-port', '-1', '--metrics-port', '-1', ...args],
        { encoding: 'utf8', timeout: 90_000 },
      );
      return { status: r.status, out: `${r.stdout}${r.stderr}` };
    };
    const down = run(['--nats-url', 'nats://127.0.0.1:1', '--nats-connect-timeout', '1000']);
    expect(down.status, down.out).toBe(1);
    expect(down.out).toMatch(/cannot connect to NATS at nats:\/\/127\.0\.0\.1:1 within 1 s/);
    const tls = run(['--nats-url', mtls.url]);
    expect(tls.status, tls.out).toBe(1);
    expect(tls.out).toContain('--nats-tls-ca');
    expect(tls.out).not.toMatch(/\n\s+at /); // an explanation, not a stack trace
  });
});
