// A service that loses NATS says so and keeps reconnecting, comes back when NATS does, and shuts
// down cleanly on SIGTERM while NATS is gone: no uncaught "connection disconnected" trace.
import { afterAll, describe, expect, it } from 'vitest';
import { testModels } from '../helpers/models.ts';
import { assertNoNatsServersRunning, startNatsServer } from '../helpers/nats.ts';
import { liveServiceProcesses, spawnService } from '../helpers/processes.ts';

afterAll(() => {
  assertNoNatsServersRunning();
  expect(liveServiceProcesses()).toBe(0);
});

describe('a lost NATS connection', () => {
  it('is logged, reconnected, and does not stop an orderly shutdown', async () => {
    const { ditDir } = testModels();
    let nats = await startNatsServer();
    const port = nats.port;
    const common = ['--nats-url', nats.url, '--metrics-port', '-1', '--shutdown-grace', '1000'];
    const denoiser = spawnService('denoiser', ['denoiser', ...common, '--model-dir', ditDir, '--grpc-port', '-1', '--threads', '1']);
    const scheduler = spawnService('scheduler', ['scheduler', ...common, '--models', 'dit-tiny', '--grpc-port', '0', '--http-port', '-1']);
    try {
      await denoiser.waitFor(/^serving /);
      await scheduler.waitFor(/^Sampler API on/);
      await nats.stop();
      for (const p of [denoiser, scheduler]) expect(await p.waitFor(/^lost the NATS connection/, 30_000)).toMatchObject({ level: 40 });
      // NATS comes back on the same port: both reconnect.
      nats = await startNatsServer({ port });
      for (const p of [denoiser, scheduler]) await p.waitFor(/^reconnected to NATS/, 30_000);
      await nats.stop();
      for (const p of [denoiser, scheduler]) {
        await expect.poll(() => (p.log().match(/lost the NATS connection/g) ?? []).length, { timeout: 30_000 }).toBe(2);
      }
      // SIGTERM with NATS gone: the shutdown finishes, exit 0, no trace.
      const codes = await Promise.all([denoiser.stop(), scheduler.stop()]);
      expect(codes).toEqual([0, 0]);
      for (const p of [denoiser, scheduler]) {
        expect(p.log()).toMatch(/closed the NATS connection without draining it/);
        expect(p.log()).not.toMatch(/triggerUncaughtException|\[RequestError|Uncaught|unhandled rejection/i);
      }
    } finally {
      await Promise.all([denoiser.stop('SIGKILL'), scheduler.stop('SIGKILL')]);
      await nats.stop();
    }
  });
});
