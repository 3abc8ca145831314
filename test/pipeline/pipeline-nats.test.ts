import { afterAll, beforeAll } from 'vitest';
import { assertNoNatsServersRunning, startNatsServer, type NatsServerHandle } from '../helpers/nats.ts';
import { pipelineSuite } from './suite.ts';

let nats: NatsServerHandle;
beforeAll(async () => {
  nats = await startNatsServer();
});
afterAll(async () => {
  await nats?.stop();
  assertNoNatsServersRunning();
});

pipelineSuite('NATS', () => ({ kind: 'nats', url: nats.url }));
