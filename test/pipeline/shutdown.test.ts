// A scheduler shutting down whose drain grace runs out before its requests finish: every request
// still in flight, over gRPC and HTTP, fails UNAVAILABLE with a message that says why (so a client
// retries it elsewhere), instead of a bare "Call cancelled" when the server is closed under it.
import { afterAll, describe, expect, it } from 'vitest';
import { SamplerApi } from '../../shared/client.ts';
import { Code } from '../../shared/errors.ts';
import { assertNoNatsServersRunning, startNatsServer } from '../helpers/nats.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type TransportKind } from '../helpers/pipeline.ts';
import { failureOf } from '../helpers/failure.ts';

afterAll(() => assertNoNatsServersRunning());

const GRACE_MS = 500;

describe.each(['inproc', 'nats'] as const)('a drain whose grace runs out, over %s', (kind) => {
  it('fails the requests still in flight UNAVAILABLE, naming the grace, on gRPC and HTTP', async () => {
    const nats = kind === 'nats' ? await startNatsServer() : null;
    const transport: TransportKind = nats ? { kind: 'nats', url: nats.url } : { kind: 'inproc' };
    // Simulated denoiser passes of 10 ms: 1,000 steps outlast the grace on any machine.
    const p = await startPipeline({ transport, http: {}, denoiser: { simulate: { baseMs: 10, perRowMs: 0 } } });
    const api = new SamplerApi(p.address);
    let stopped: Promise<void> | undefined;
    try {
      let steps = 0;
      let started!: () => void;
      const running = new Promise<void>((r) => (started = r));
      const grpc = failureOf(
        (async () => {
          for await (const ev of api.generateStream({ model: DIT_NAME, classLabels: [{ index: 2 }], numSteps: 1000, seed: 5n })) {
            if (ev.progress && ++steps === 3) started();
          }
        })(),
      );
      await running;
      const http = fetch(`${p.http!.url}/v1/images/generations`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: DIT_NAME, prompt: 'three', n: 1, ditpipe: { steps: 1000, seed: 6 } }),
      });
      const inFlight = async (): Promise<string> => await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_requests_in_flight');
      await expect.poll(inFlight, { timeout: 20_000 }).toMatch(/^ditpipe_requests_in_flight 2$/m);

      stopped = p.stop(GRACE_MS);
      const err = await grpc;
      expect(err.code, err.message).toBe(Code.UNAVAILABLE);
      expect(err.message).toContain(
        `the scheduler shut down before this request finished (its drain grace of ${GRACE_MS} ms passed); retry`,
      );
      expect(steps).toBeLessThan(1000);
      const res = await http;
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toMatch(/^\d+$/);
      const body = (await res.json()) as { error: { message: string } };
      expect(body.error.message).toContain(`drain grace of ${GRACE_MS} ms passed`);
      await stopped;
      const outcomes = await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_request_seconds');
      expect(outcomes).toMatch(/ditpipe_request_seconds_count\{[^}]*outcome="UNAVAILABLE"[^}]*\} 2/);
    } finally {
      api.close();
      await (stopped ?? p.stop());
      await nats?.stop();
    }
  });
});
