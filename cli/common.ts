// Options and plumbing shared by the service commands: NATS connection flags (each with an env
// var), the gRPC server flags (address, TLS, tokens, health port), gRPC client flags, logging,
// the metrics endpoint, and ordered shutdown on SIGTERM/SIGINT.
import { readFileSync } from 'node:fs';
import { Option, type Command } from 'commander';
import { type NatsConnection, PermissionViolationError } from '@nats-io/transport-node';
import type { Registry } from 'prom-client';
import { schedulerConfigDefault } from '../services/scheduler/config.ts';
import { bearerTokens } from '../services/scheduler/http/auth.ts';
import type { HttpAuthorize, HttpTlsOptions } from '../services/scheduler/http/config.ts';
import type { SamplerApiOptions } from '../shared/client.ts';
import { createLogger, LOG_FORMATS, RateLimitedLog, type LogFormat, type Logger } from '../shared/log.ts';
import { serveMetrics } from '../shared/metrics.ts';
import { TokenSet } from '../shared/server/auth.ts';
import { GrpcServer, loadGrpcTls, type ReflectionMode } from '../shared/server/grpc.ts';
import { connectNats, natsTransport, type NatsConnectOptions } from '../shared/transport/nats.ts';
import { type NatsService, permissionDenied } from '../shared/transport/nats-permissions.ts';
import type { QueueSettings, Transport } from '../shared/transport/types.ts';
import { DEFAULT_QUEUE_SETTINGS, queueSettings } from '../shared/transport/work.ts';

export interface NatsFlags {
  natsUrl?: string;
  natsUser?: string;
  natsPassword?: string;
  natsToken?: string;
  natsCreds?: string;
  natsNkey?: string;
  natsTlsCa?: string;
  natsTlsCert?: string;
  natsTlsKey?: string;
  queueAckWait: number;
  queueMaxDeliver: number;
  queueMaxMessages: number;
  queueMaxBytes: number;
  queueMaxAge: number;
  natsConnectTimeout?: number;
}

export function addNatsOptions(cmd: Command, required: boolean): Command {
  const url = new Option(
    '--nats-url <urls>',
    `NATS server URL(s), comma-separated${required ? '' : '; unset runs every service in this process on an in-process bus'}`,
  ).env('NATS_URL');
  if (required) url.makeOptionMandatory();
  return cmd
    .addOption(url)
    .addOption(new Option('--nats-user <user>', 'NATS user (with --nats-password)').env('NATS_USER'))
    .addOption(new Option('--nats-password <password>', 'NATS password').env('NATS_PASSWORD'))
    .addOption(new Option('--nats-token <token>', 'NATS token').env('NATS_TOKEN'))
    .addOption(new Option('--nats-creds <file>', 'NATS credentials file (JWT + nkey seed, operator mode)').env('NATS_CREDS'))
    .addOption(
      new Option(
        '--nats-nkey <file>',
        "file holding this service's NATS nkey seed (SU...; `ditpipe up` and `ditpipe nats-config --nkeys` make them)",
      ).env('NATS_NKEY'),
    )
    .addOption(new Option('--nats-tls-ca <file>', 'CA certificate to verify the NATS server').env('NATS_TLS_CA'))
    .addOption(new Option('--nats-tls-cert <file>', 'client certificate for NATS mutual TLS').env('NATS_TLS_CERT'))
    .addOption(new Option('--nats-tls-key <file>', 'client key for NATS mutual TLS').env('NATS_TLS_KEY'))
    .addOption(
      new Option(
        '--nats-connect-timeout <ms>',
        'how long to wait for NATS at start before exiting with an error (TLS and credential mismatches fail at once)',
      )
        .env('NATS_CONNECT_TIMEOUT_MS')
        .default(30_000)
        .argParser(intArg('--nats-connect-timeout', 1)),
    )
    .addOption(
      new Option(
        '--queue-ack-wait <ms>',
        'work queues: a step or decode a replica took and stopped confirming goes to another replica after this long',
      )
        .env('DITPIPE_QUEUE_ACK_WAIT_MS')
        .default(DEFAULT_QUEUE_SETTINGS.ackWaitMs)
        .argParser(intArg('--queue-ack-wait', 100, 3_600_000)),
    )
    .addOption(
      new Option('--queue-max-deliver <n>', 'work queues: deliveries of one message (attempts) before it is given up')
        .env('DITPIPE_QUEUE_MAX_DELIVER')
        .default(DEFAULT_QUEUE_SETTINGS.maxDeliver)
        .argParser(intArg('--queue-max-deliver', 1, 1000)),
    )
    .addOption(
      new Option('--queue-max-messages <n>', 'work queues: most messages a queue holds (then RESOURCE_EXHAUSTED)')
        .env('DITPIPE_QUEUE_MAX_MESSAGES')
        .default(DEFAULT_QUEUE_SETTINGS.maxMessages)
        .argParser(intArg('--queue-max-messages', 1)),
    )
    .addOption(
      new Option('--queue-max-bytes <bytes>', "work queues: most bytes a queue holds in the NATS server's memory (then RESOURCE_EXHAUSTED)")
        .env('DITPIPE_QUEUE_MAX_BYTES')
        .default(DEFAULT_QUEUE_SETTINGS.maxBytes)
        .argParser(intArg('--queue-max-bytes', 1024)),
    )
    .addOption(
      new Option('--queue-max-age <ms>', 'work queues: messages older than this are dropped')
        .env('DITPIPE_QUEUE_MAX_AGE_MS')
        .default(DEFAULT_QUEUE_SETTINGS.maxAgeMs)
        .argParser(intArg('--queue-max-age', 1000)),
    );
}

/** The work queue settings the flags give (every service of a deployment must use the same). */
export function queueFromFlags(f: NatsFlags): QueueSettings {
  return queueSettings({
    ackWaitMs: f.queueAckWait,
    maxDeliver: f.queueMaxDeliver,
    maxMessages: f.queueMaxMessages,
    maxBytes: f.queueMaxBytes,
    maxAgeMs: f.queueMaxAge,
    duplicateWindowMs: Math.min(DEFAULT_QUEUE_SETTINGS.duplicateWindowMs, f.queueMaxAge),
  });
}

/** Connection options from the flags; `service` is the ditpipe service connecting (its inbox prefix and permissions). */
export function natsOptions(f: NatsFlags & { natsUrl: string }, name: string, service?: NatsService): NatsConnectOptions {
  const tls =
    f.natsTlsCa || f.natsTlsCert || f.natsTlsKey ? { caFile: f.natsTlsCa, certFile: f.natsTlsCert, keyFile: f.natsTlsKey } : undefined;
  return {
    servers: f.natsUrl,
    name,
    user: f.natsUser,
    password: f.natsPassword,
    token: f.natsToken,
    credsFile: f.natsCreds,
    nkeyFile: f.natsNkey,
    service,
    tls,
    waitOnFirstConnect: true,
    firstConnectTimeoutMs: f.natsConnectTimeout ?? 30_000,
  };
}

/**
 * Logs what happens to a NATS connection (lost, reconnecting, back, errors), rate-limited: a
 * service that lost NATS says so instead of going quiet, and keeps reconnecting.
 */
export function watchNatsConnection(nc: NatsConnection, log: Logger, service?: NatsService): void {
  const events = new RateLimitedLog(log, { windowMs: 30_000 });
  void (async () => {
    for await (const s of nc.status()) {
      const server = 'server' in s ? String(s.server) : undefined;
      switch (s.type) {
        case 'disconnect':
          events.event(
            'warn',
            'disconnect',
            { server },
            `lost the NATS connection${server ? ` to ${server}` : ''}; reconnecting (calls in flight fail UNAVAILABLE and are retried)`,
          );
          break;
        case 'reconnecting':
          events.event('info', 'reconnecting', { server }, 'reconnecting to NATS');
          break;
        case 'reconnect':
          events.flush();
          log.info({ server }, `reconnected to NATS${server ? ` at ${server}` : ''}`);
          break;
        case 'error':
          if (s.error instanceof PermissionViolationError) {
            const e = permissionDenied(s.error, service);
            events.event(
              'error',
              `denied|${s.error.operation}|${s.error.subject}`,
              { subject: s.error.subject, operation: s.error.operation },
              e.message,
            );
            break;
          }
          events.event(
            'warn',
            `error|${String((s as { error?: Error }).error?.message)}`,
            { err: String((s as { error?: Error }).error?.message) },
            'NATS connection error',
          );
          break;
        default:
          break;
      }
    }
  })().catch((err: unknown) => log.debug({ err: String(err) }, 'NATS status stream ended'));
}

/** The host:port of each URL in --nats-url, without any user or password it carries (for logs). */
function natsHosts(urls: string): string[] {
  return urls.split(',').map((u) => {
    const url = u.trim();
    try {
      return new URL(url.includes('://') ? url : `nats://${url}`).host;
    } catch {
      return url.replace(/^.*@/, '');
    }
  });
}

export async function natsFromFlags(
  f: NatsFlags & { natsUrl: string },
  name: string,
  log?: Logger,
  service?: NatsService,
): Promise<Transport> {
  const opts = natsOptions(f, name, service);
  const servers = natsHosts(f.natsUrl);
  log?.info({ servers }, `connecting to NATS at ${servers.join(', ')}`);
  const nc = await connectNats(opts);
  if (log) watchNatsConnection(nc, log, service);
  return natsTransport(nc, { log });
}

/**
 * A `--config`-style argument: inline JSON (starting with `{`) or a JSON file. Returns the parsed
 * value and how to name the source in errors; `fail` builds the caller's error type.
 */
export function readJsonArg(flag: string, arg: string, fail: (message: string) => Error): { raw: unknown; source: string } {
  const inline = arg.trimStart().startsWith('{');
  const source = `${flag} ${inline ? '(inline)' : arg}`;
  try {
    return { raw: JSON.parse(inline ? arg : readFileSync(arg, 'utf8')), source };
  } catch (err) {
    throw fail(`${source}: ${(err as Error).message}`);
  }
}

export function intArg(flag: string, min: number, max = Number.MAX_SAFE_INTEGER): (v: string) => number {
  return (v) => {
    const x = Number(v);
    if (!Number.isInteger(x) || x < min || x > max) throw new Error(`${flag} must be an integer within ${min}..${max}, got "${v}"`);
    return x;
  };
}

export function numberArg(flag: string, min: number, max = Number.POSITIVE_INFINITY): (v: string) => number {
  return (v) => {
    const x = Number(v);
    if (!Number.isFinite(x) || x < min || x > max) {
      throw new Error(`${flag} must be a number ${max === Number.POSITIVE_INFINITY ? `>= ${min}` : `within ${min}..${max}`}, got "${v}"`);
    }
    return x;
  };
}

export interface ServiceFlags {
  metricsPort: number;
  metricsHost: string;
  shutdownGrace: number;
  logLevel: string;
  logFormat: LogFormat;
}

export function addServiceOptions(cmd: Command, defaults: { metricsPort: number }): Command {
  return cmd
    .addOption(
      new Option('--metrics-port <port>', 'port of the Prometheus /metrics endpoint (0 = any free port, -1 = off)')
        .env('DITPIPE_METRICS_PORT')
        .default(defaults.metricsPort)
        .argParser(intArg('--metrics-port', -1, 65535)),
    )
    .addOption(
      new Option('--metrics-host <addr>', 'address the metrics endpoint binds (0.0.0.0 = every interface; the container image sets that)')
        .env('DITPIPE_METRICS_HOST')
        .default('127.0.0.1'),
    )
    .addOption(
      new Option('--shutdown-grace <ms>', 'time in-flight work gets to finish on SIGTERM')
        .env('DITPIPE_SHUTDOWN_GRACE_MS')
        .default(10_000)
        .argParser(intArg('--shutdown-grace', 0)),
    )
    .addOption(
      new Option('--log-level <level>', 'log level')
        .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace'])
        .env('DITPIPE_LOG_LEVEL')
        .default('info'),
    )
    .addOption(
      new Option(
        '--log-format <format>',
        'log lines: pretty (for a person), json (for a collector), auto = pretty when stderr is a terminal',
      )
        .choices([...LOG_FORMATS])
        .env('DITPIPE_LOG_FORMAT')
        .default('auto'),
    );
}

/** `--http-port`: the scheduler's HTTP API and playground (OpenAI-compatible images API); -1 turns it off. */
export function httpPortOption(defaultPort: number): Option {
  return new Option(
    '--http-port <port>',
    'port of the HTTP API (OpenAI-compatible /v1/images/generations, /v1/models) and the playground page at / (0 = any free port, -1 = off)',
  )
    .env('DITPIPE_HTTP_PORT')
    .default(defaultPort)
    .argParser(intArg('--http-port', -1, 65535));
}

/** `--repeat-cache-mib`: the scheduler's repeat cache budget in MiB; 0 turns it off. */
export function repeatCacheOption(): Option {
  return new Option(
    '--repeat-cache-mib <n>',
    'MiB of finished images kept to answer exact repeats (same model, settings, seed, class and sample index) without sampling; fractions allowed, 0 = off',
  )
    .env('DITPIPE_REPEAT_CACHE_MIB')
    .default(schedulerConfigDefault('repeatCacheMiB'))
    .argParser(numberArg('--repeat-cache-mib', 0, 1024 * 1024));
}

export function logger(name: string, f: { logLevel: string; logFormat?: LogFormat }): Logger {
  return createLogger(name, { level: f.logLevel, format: f.logFormat ?? 'auto' });
}

export interface GrpcServerFlags {
  host: string;
  grpcPort: number;
  tlsCert?: string;
  tlsKey?: string;
  tlsClientCa?: string;
  authTokensFile?: string;
  healthPort: number;
  reflection: ReflectionMode;
}

/**
 * The gRPC server flags: where it listens (loopback unless told otherwise), TLS and mutual TLS,
 * bearer tokens, a plaintext health-only port for probes, reflection.
 */
export function addGrpcServerOptions(cmd: Command, d: { port: number; portHelp: string; minPort?: number }): Command {
  return cmd
    .addOption(
      new Option('--host <addr>', 'address gRPC binds (0.0.0.0 = every interface; the container image sets that)')
        .env('DITPIPE_HOST')
        .default('127.0.0.1'),
    )
    .addOption(
      new Option('--grpc-port <port>', d.portHelp)
        .env('DITPIPE_GRPC_PORT')
        .default(d.port)
        .argParser(intArg('--grpc-port', d.minPort ?? 0, 65535)),
    )
    .addOption(new Option('--tls-cert <file>', 'serve gRPC over TLS with this certificate (PEM, with --tls-key)').env('DITPIPE_TLS_CERT'))
    .addOption(new Option('--tls-key <file>', 'private key of --tls-cert (PEM)').env('DITPIPE_TLS_KEY'))
    .addOption(
      new Option('--tls-client-ca <file>', 'mutual TLS: accept only clients with a certificate signed by this CA').env(
        'DITPIPE_TLS_CLIENT_CA',
      ),
    )
    .addOption(
      new Option(
        '--auth-tokens-file <file>',
        'require a bearer token from this file (one per line, optionally followed by the services or methods it may call); DITPIPE_AUTH_TOKENS may add comma-separated tokens',
      ).env('DITPIPE_AUTH_TOKENS_FILE'),
    )
    .addOption(
      new Option(
        '--health-port <port>',
        'plaintext port serving only grpc.health.v1, for probes that speak neither TLS nor tokens (-1 = off)',
      )
        .env('DITPIPE_HEALTH_PORT')
        .default(-1)
        .argParser(intArg('--health-port', -1, 65535)),
    )
    .addOption(
      new Option('--reflection <mode>', 'server reflection: on (needs the token when tokens are set), public (no token), off')
        .choices(['on', 'public', 'off'])
        .env('DITPIPE_REFLECTION')
        .default('on'),
    );
}

/** Bearer tokens from --auth-tokens-file and DITPIPE_AUTH_TOKENS; null when neither is set. */
export function tokensFromFlags(f: { authTokensFile?: string }, env = process.env): TokenSet | null {
  const fromFile = f.authTokensFile ? TokenSet.fromFile(f.authTokensFile) : null;
  const list = env.DITPIPE_AUTH_TOKENS?.trim();
  const fromEnv = list ? TokenSet.fromList(list, 'DITPIPE_AUTH_TOKENS') : null;
  if (fromFile && fromEnv) return TokenSet.union(fromFile, fromEnv);
  return fromFile ?? fromEnv;
}

/** The gRPC server the flags describe (not listening yet: services add themselves first). */
export function grpcServerFromFlags(f: GrpcServerFlags, log: Logger): GrpcServer {
  return new GrpcServer({
    host: f.host,
    port: f.grpcPort < 0 ? null : f.grpcPort,
    tls: loadGrpcTls({ certFile: f.tlsCert, keyFile: f.tlsKey, clientCaFile: f.tlsClientCa }),
    tokens: tokensFromFlags(f),
    healthPort: f.healthPort < 0 ? null : f.healthPort,
    reflection: f.reflection,
    log,
  });
}

/** The HTTP API's TLS and bearer tokens: the same as the gRPC server's. */
export function httpSecurity(grpc: GrpcServer): { tls?: HttpTlsOptions; authorize?: HttpAuthorize } {
  const tls = grpc.options.tls;
  const tokens = grpc.options.tokens;
  return {
    tls: tls ? { key: tls.key, cert: tls.cert, ca: tls.clientCa ?? undefined, requestCert: Boolean(tls.clientCa) } : undefined,
    authorize: tokens ? bearerTokens(tokens) : undefined,
  };
}

/** Listens and logs where (the bound address) and how (TLS, tokens). */
export async function listenGrpc(server: GrpcServer, log: Logger, what: string): Promise<void> {
  await server.listen();
  if (server.port !== null)
    log.info(
      { port: server.port, address: server.address, security: server.security },
      `${what} on ${server.address} (${server.security})`,
    );
  if (server.healthPort !== null)
    log.info(
      { healthPort: server.healthPort },
      `gRPC health on ${server.options.healthHost ?? server.host}:${server.healthPort} (plaintext, health only)`,
    );
}

export interface GrpcClientFlags {
  tls?: boolean;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  tokenFile?: string;
}

/** Client flags of `generate` (and friends): TLS, mutual TLS, bearer token. */
export function addGrpcClientOptions(cmd: Command): Command {
  return cmd
    .option('--tls', 'use TLS to the server (with the system CAs unless --tls-ca)')
    .addOption(new Option('--tls-ca <file>', "CA certificate that signed the server's (implies --tls)").env('DITPIPE_TLS_CA'))
    .addOption(new Option('--tls-cert <file>', 'client certificate for mutual TLS (implies --tls)').env('DITPIPE_TLS_CLIENT_CERT'))
    .addOption(new Option('--tls-key <file>', 'key of --tls-cert').env('DITPIPE_TLS_CLIENT_KEY'))
    .addOption(
      new Option('--token-file <file>', 'file holding the bearer token to send (DITPIPE_TOKEN may hold the token itself)').env(
        'DITPIPE_TOKEN_FILE',
      ),
    );
}

export function clientOptionsFromFlags(f: GrpcClientFlags, env = process.env): SamplerApiOptions {
  const useTls = Boolean(f.tls || f.tlsCa || f.tlsCert || f.tlsKey);
  let token: string | undefined;
  if (f.tokenFile) {
    try {
      token = readFileSync(f.tokenFile, 'utf8').trim();
    } catch (err) {
      throw new Error(
        `--token-file ${f.tokenFile}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`,
        { cause: err },
      );
    }
    if (!token) throw new Error(`--token-file ${f.tokenFile} is empty`);
  } else if (env.DITPIPE_TOKEN?.trim()) token = env.DITPIPE_TOKEN.trim();
  return { tls: useTls ? { caFile: f.tlsCa, certFile: f.tlsCert, keyFile: f.tlsKey } : false, token };
}

/** What SIGTERM/SIGINT do once a service serves (set by serveUntilSignal); null while it starts. */
let onStopSignal: ((signal: string) => void) | null = null;

/**
 * Listens for SIGTERM/SIGINT from the moment a service command starts, so that a signal never
 * meets Node's default action (the process dying by the signal, with no exit code and nothing
 * logged). While the service starts (model loading, the first NATS connect) a signal exits at
 * once with 0: there is nothing to finish yet, and work a replica has just taken and not answered
 * goes back to its queue for another replica. Once serveUntilSignal runs, a signal stops in order.
 * Idempotent.
 */
let signalsCaught = false;
function catchStopSignals(log: Logger): void {
  if (signalsCaught) return;
  signalsCaught = true;
  const on = (signal: string): void => {
    if (onStopSignal) return onStopSignal(signal);
    log.info({ signal }, `${signal} while starting: exiting now`);
    process.exit(0);
  };
  process.on('SIGTERM', () => on('SIGTERM'));
  process.on('SIGINT', () => on('SIGINT'));
}

/**
 * Runs until SIGTERM/SIGINT, then stops the parts in the given order (each gets the grace period),
 * closes the transports and exits. A second signal exits at once. A part or transport that fails
 * to stop (NATS already gone) is logged and the shutdown goes on: never an uncaught rejection.
 */
export async function serveUntilSignal(opts: {
  log: Logger;
  parts: Array<{ name: string; stop: (graceMs: number) => Promise<void> }>;
  transports: Transport[];
  registries: Registry[];
  metricsPort: number;
  metricsHost?: string;
  graceMs: number;
}): Promise<void> {
  catchStopSignals(opts.log);
  const host = opts.metricsHost ?? '127.0.0.1';
  const metrics = opts.metricsPort >= 0 ? await serveMetrics(opts.registries, opts.metricsPort, host) : null;
  if (metrics) opts.log.info({ port: metrics.port, host: metrics.host }, `metrics on http://${metrics.address}/metrics`);
  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) {
      opts.log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    opts.log.info({ signal, graceMs: opts.graceMs }, 'shutting down');
    let failed = false;
    for (const p of opts.parts) {
      try {
        await p.stop(opts.graceMs);
        opts.log.info(`${p.name} stopped`);
      } catch (err) {
        failed = true;
        opts.log.error({ err: (err as Error).message }, `${p.name} did not stop cleanly`);
      }
    }
    await Promise.all(
      opts.transports.map((t) =>
        t.close({ graceMs: opts.graceMs }).then(
          (r) => {
            // Draining needs the server; with NATS gone there is nothing left to drain.
            if (!r.drained) opts.log.warn({ reason: r.reason }, 'closed the NATS connection without draining it (NATS unreachable)');
          },
          (err: unknown) => {
            failed = true;
            opts.log.error({ err: (err as Error).message }, 'the transport did not close cleanly');
          },
        ),
      ),
    );
    await metrics?.close();
    opts.log.info('stopped');
    process.exit(failed ? 1 : 0);
  };
  const onSignal = (signal: string): void => {
    stop(signal).catch((err: unknown) => {
      opts.log.fatal({ err: (err as Error).message }, 'shutdown failed');
      process.exit(1);
    });
  };
  onStopSignal = onSignal;
  for (const t of opts.transports) {
    void t.closed.then((err) => {
      if (err && !stopping) {
        opts.log.fatal({ err: err.message }, 'transport closed for good');
        process.exit(1);
      }
    });
  }
}

/**
 * The first call of every service command. Logs an unhandled rejection or exception as one fatal
 * line and exits non-zero, instead of Node's raw trace: the last line of defence; the known
 * sources are handled where they arise. And catches stop signals from here on (catchStopSignals).
 */
export function guardProcess(log: Logger): void {
  catchStopSignals(log);
  const fatal =
    (kind: string) =>
    (err: unknown): void => {
      log.fatal(
        { err: err instanceof Error ? { message: err.message, stack: err.stack } : String(err) },
        `${kind}: ${err instanceof Error ? err.message : String(err)}`,
      );
      process.exit(1);
    };
  process.on('unhandledRejection', fatal('unhandled rejection'));
  process.on('uncaughtException', fatal('uncaught exception'));
}
