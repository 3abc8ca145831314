// Bootstrap for worker threads written in TypeScript: workers do not inherit the main thread's tsx
// loader, so each registers it before importing its real module (passed as workerData.__module).
import { workerData } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
await import(workerData.__module);
