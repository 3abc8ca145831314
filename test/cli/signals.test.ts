// A stop signal that reaches a service before it serves (model loading, the first NATS connect)
// exits it at once with 0 and a log line, instead of Node's default action (dying by the signal,
// no exit code, nothing logged) — what Kubernetes does to a pod that is rolled while it starts.
import { createServer } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { testModels } from '../helpers/models.ts';
import { liveServiceProcesses, spawnService } from '../helpers/processes.ts';

afterAll(() => {
  expect(liveServiceProcesses()).toBe(0);
});

/** A TCP port nothing listens on (bound once by us, then released). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

describe('a service signalled while it starts', () => {
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    it(`exits 0 on ${signal} while waiting for its first NATS connection, and says so`, async () => {
      const { ditDir } = testModels();
      const port = await closedPort();
      // The password in the URL is never logged: the log names hosts only.
      const url = `nats://ditpipe:s3cret-pass@127.0.0.1:${port}`;
      const p = spawnService('denoiser', [
        'denoiser',
        '--nats-url',
        url,
        '--nats-connect-timeout',
        '60000',
        '--metrics-port',
        '-1',
        '--grpc-port',
        '-1',
        '--model-dir',
        ditDir,
        '--threads',
        '1',
      ]);
      try {
        const connecting = await p.waitFor(/^connecting to NATS/, 60_000);
        expect(connecting).toMatchObject({ servers: [`127.0.0.1:${port}`], msg: `connecting to NATS at 127.0.0.1:${port}` });
        expect(await p.stop(signal)).toBe(0);
        expect(p.proc.signalCode).toBeNull();
        expect(p.log()).toMatch(new RegExp(`"signal":"${signal}".*"msg":"${signal} while starting: exiting now"`));
        expect(p.log()).not.toMatch(/s3cret-pass/);
      } finally {
        await p.stop('SIGKILL');
      }
    });
  }
});
