// Server reflection lists every service a ditpipe gRPC server serves (its own, health, and
// reflection v1 and v1alpha), nothing it does not serve, and can describe each one, on the
// scheduler's public server and on a replica's health server alike.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compileDenoiserConfig } from '../../services/denoiser/config.ts';
import { startDenoiserService } from '../../services/denoiser/service.ts';
import type { RunningReplica } from '../../shared/server/replica.ts';
import { InProcBus } from '../../shared/transport/inproc.ts';
import { GrpcServer, SERVICE_NAMES, STANDARD_SERVICES } from '../../shared/server/grpc.ts';
import { healthStatus, reflectedServices, reflectionDescribes } from '../helpers/grpc.ts';
import { testModels } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

let pipeline: Pipeline;
let replica: RunningReplica;
const replicaGrpc = new GrpcServer({ host: '127.0.0.1', port: 0 });
beforeAll(async () => {
  pipeline = await startPipeline({ transport: { kind: 'inproc' } });
  replica = await startDenoiserService(
    compileDenoiserConfig({ modelDir: testModels().ditDir, intraOpThreads: 1 }),
    new InProcBus().connect('replica'),
    { grpc: replicaGrpc },
  );
  await replicaGrpc.listen();
});
afterAll(async () => {
  await replica?.stop(1_000);
  await replicaGrpc.stop(500);
  await pipeline?.stop();
});

describe.each([
  { server: 'scheduler', own: SERVICE_NAMES.sampler, notServed: SERVICE_NAMES.denoiser, address: () => pipeline.address },
  { server: 'denoiser replica', own: SERVICE_NAMES.denoiser, notServed: SERVICE_NAMES.sampler, address: () => replicaGrpc.address },
])('reflection on the $server', ({ own, notServed, address }) => {
  it('lists its own service, health and both reflection versions, through v1 and v1alpha', async () => {
    const want = [own, ...STANDARD_SERVICES].sort();
    expect(await reflectedServices(address())).toEqual(want);
    expect(await reflectedServices(address(), 'v1alpha')).toEqual(want);
  });

  it('describes every service it lists, and nothing it does not serve', async () => {
    for (const svc of await reflectedServices(address())) expect(await reflectionDescribes(address(), svc), svc).toBe(true);
    expect(await reflectedServices(address())).not.toContain(notServed);
    expect(await healthStatus(address(), own)).toBe(1);
  });
});
