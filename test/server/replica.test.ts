// A replica's gRPC health follows its liveness on the bus: work it holds stuck past its attempt
// time turns health NOT_SERVING (so Kubernetes' liveness probe restarts the pod), and it turns
// back to SERVING once that work returns. Real nats-server (JetStream), real gRPC health checks.
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { DeadlineExceededError } from '../../shared/errors.ts';
import {
  DenoiseRequest,
  DenoiseResponse,
  DenoiserDefinition,
  DenoiserInfo,
  DenoiserService,
} from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { createLogger } from '../../shared/log.ts';
import { GrpcServer } from '../../shared/server/grpc.ts';
import { mountReplica, type RunningReplica } from '../../shared/server/replica.ts';
import { connectNats, natsTransport } from '../../shared/transport/nats.ts';
import type { Transport } from '../../shared/transport/types.ts';
import { healthStatus } from '../helpers/grpc.ts';
import { type NatsServerHandle, startNatsServer } from '../helpers/nats.ts';

let nats: NatsServerHandle;
const transports: Transport[] = [];

beforeAll(async () => {
  nats = await startNatsServer();
});
afterAll(async () => {
  await Promise.all(transports.map((t) => t.close({ graceMs: 100 })));
  await nats.stop();
});

async function transport(name: string): Promise<Transport> {
  const t = natsTransport(await connectNats({ servers: nats.url, name }));
  transports.push(t);
  return t;
}

describe('replica health follows bus liveness', () => {
  it('reports NOT_SERVING while a step is stuck past its attempt time, SERVING again once it returns', async () => {
    let release: () => void = () => undefined;
    const stuck = new Promise<void>((r) => {
      release = r;
    });
    const grpc = new GrpcServer({ host: '127.0.0.1', port: 0 });
    const replica: RunningReplica = await mountReplica(await transport('replica'), {
      definition: DenoiserDefinition,
      grpcDefinition: DenoiserService,
      impl: {
        // Ignores its deadline, as a model call that hangs would.
        denoise: async (): Promise<DenoiseResponse> => {
          await stuck;
          return DenoiseResponse.create({ batchRows: 1 });
        },
        info: () => DenoiserInfo.create({ model: 'health-test' }),
      },
      scope: 'health-test',
      grpc,
      close: async () => undefined,
    });
    await grpc.listen();
    try {
      const port = grpc.port ?? 0;
      expect(await healthStatus(`127.0.0.1:${port}`, '')).toBe(1);
      const client = (await transport('client')).client(DenoiserDefinition, { scope: 'health-test', retries: 0 });
      const err = await client.denoise(DenoiseRequest.create({ model: 'health-test' }), { timeoutMs: 100 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DeadlineExceededError);
      // Past the attempt time plus the 1 s grace, the replica is stuck: health down.
      await expect.poll(() => healthStatus(`127.0.0.1:${port}`, ''), { timeout: 5_000, interval: 100 }).toBe(2);
      expect(await healthStatus(`127.0.0.1:${port}`, 'ditpipe.v1.Denoiser')).toBe(2);
      expect(replica.server.live).toBe(false);
      release();
      await expect.poll(() => healthStatus(`127.0.0.1:${port}`, ''), { timeout: 5_000, interval: 100 }).toBe(1);
      expect(await healthStatus(`127.0.0.1:${port}`, 'ditpipe.v1.Denoiser')).toBe(1);
      expect(replica.server.live).toBe(true);
    } finally {
      release();
      await replica.stop(500);
      await grpc.stop(500);
    }
  });
});

describe('errors no caller can be told of', () => {
  it('are logged by the replica (rate-limited), e.g. a malformed work message it drops', async () => {
    let text = '';
    const sink = new Writable({ write: (chunk: Buffer, _enc, cb) => ((text += chunk.toString()), cb()) });
    const log = createLogger('replica-test', { format: 'json', stream: sink });
    const replica = await mountReplica(await transport('replica-log'), {
      definition: DenoiserDefinition,
      grpcDefinition: DenoiserService,
      impl: { denoise: () => DenoiseResponse.create({ batchRows: 1 }), info: () => DenoiserInfo.create({ model: 'log-test' }) },
      scope: 'log-test',
      log,
      close: async () => undefined,
    });
    const raw = await connectNats({ servers: nats.url, name: 'raw' });
    try {
      const subject = replica.server.queues.denoise.subject;
      // Three messages with no reply subject and no valid batch: one line now, the rest counted.
      for (let i = 0; i < 3; i++) raw.publish(subject, new Uint8Array([0xff, 0x01, i]));
      await raw.flush();
      await expect.poll(() => text, { timeout: 10_000, interval: 50 }).toMatch(/malformed .*work message dropped/);
      const lines = text
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { level: number; method?: string; code?: string; msg: string });
      const dropped = lines.filter((l) => /work message dropped/.test(l.msg));
      expect(dropped).toHaveLength(1);
      expect(dropped[0]).toMatchObject({ level: 40, method: 'Denoise', code: 'INVALID_ARGUMENT' });
    } finally {
      await raw.close();
      await replica.stop(500);
    }
    // stop() writes the count of the lines held back.
    expect(text).toMatch(/2 more/);
  });
});
