import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Integration tests start real nats-server/gRPC/onnxruntime; two cores here, so keep the fan-out small.
    maxWorkers: 2,
  },
});
