// The transport suite on the in-process bus, plus bus-level checks (no subscription leaks).
import { afterAll, expect, it } from 'vitest';

import { InProcBus } from '../../shared/transport/inproc.ts';
import { transportSuite } from './suite.ts';

const MAX_PAYLOAD = 64 * 1024;
const bus = new InProcBus({ maxPayload: MAX_PAYLOAD });

transportSuite('in-process bus', () => ({
  maxPayload: MAX_PAYLOAD,
  connect: (name) => Promise.resolve(bus.connect(name)),
  kill: async (t) => bus.kill(t),
}));

it('in-process bus: closing every member leaves no subscription behind', () => {
  expect(bus.subscriptionCount).toBe(0);
});

it('in-process bus: rejects a bad maxPayload naming it', () => {
  expect(() => new InProcBus({ maxPayload: 0 })).toThrow(/maxPayload must be a positive integer/);
});

afterAll(() => {
  expect(bus.subscriptionCount).toBe(0);
});
