// Configuration of the scheduler's HTTP front end (OpenAI-compatible images API and playground):
// validated once, defaults filled.
import type { IncomingMessage } from 'node:http';
import { z } from 'zod';
import { compileConfig } from '../../../shared/config.ts';

const schema = z.object({
  /** TCP port (0 = any free port). */
  port: z.number().int().min(0).max(65535).default(8080),
  /** Address to bind. */
  host: z.string().min(1).default('127.0.0.1'),
  /** Largest request body accepted; a larger one gets 413. */
  maxBodyBytes: z
    .number()
    .int()
    .min(1024)
    .default(1024 * 1024),
  /** Seconds sent in Retry-After with 429 (scheduler full) and 503 (no replica answers). */
  retryAfterS: z.number().int().min(0).default(1),
  /** Interval of SSE comment lines that keep idle proxies from closing a long stream. */
  keepAliveMs: z.number().int().min(100).default(15_000),
  /** How long the cluster panel's view of ListModels (replica counts) is reused. */
  clusterCacheMs: z.number().int().min(0).default(2_000),
});

export type HttpConfig = z.output<typeof schema>;
export type HttpConfigInput = z.input<typeof schema>;

/** Server TLS, as node:https takes it (PEM). With `ca` and `requestCert`, clients must show a certificate. */
export interface HttpTlsOptions {
  key: string | Buffer;
  cert: string | Buffer;
  ca?: string | Buffer;
  requestCert?: boolean;
}

/**
 * Caller authentication, run before every API route (the playground's static files are public):
 * throw UnauthenticatedError (401) or PermissionDeniedError (403) to refuse.
 */
export type HttpAuthorize = (req: IncomingMessage) => void | Promise<void>;

export function compileHttpConfig(input: HttpConfigInput): HttpConfig {
  return compileConfig('http', schema, input);
}
