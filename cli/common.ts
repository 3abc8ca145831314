// Options and plumbing shared by the service commands: NATS connection flags (each with an env
// var), logging, metrics endpoint, and ordered shutdown on SIGTERM/SIGINT.
import { readFileSync } from 'node:fs';
import { Option, type Command } from 'commander';
import { pino, type Logger } from 'pino';
import type { Registry } from 'prom-client';
import { serveMetrics } from '../shared/metrics.ts';
import { connectNats, natsTransport, type NatsConnectOptions } from '../shared/transport/nats.ts';
import type { QueueSettings, Transport } from '../shared/transport/types.ts';
import { DEFAULT_QUEUE_SETTINGS, queueSettings } from '../shared/transport/work.ts';

export interface NatsFlags {
  natsUrl?: string;
  natsUser?: string;
  natsPassword?: string;
  natsToken?: string;
  natsCreds?: string;
  natsTlsCa?: string;
  natsTlsCert?: string;
  natsTlsKey?: string;
  queueAckWait: number;
  queueMaxDeliver: number;
  queueMaxMessages: number;
  queueMaxBytes: number;
  queueMaxAge: number;
}

export function addNatsOptions(cmd: Command, required: boolean): Command {
  const url = new Option('--nats-url <urls>', `NATS server URL(s), comma-separated${required ? '' : '; unset runs every service in this process on an in-process bus'}`).env('NATS_URL');
  if (required) url.makeOptionMandatory();
  return cmd
    .addOption(url)
    .addOption(new Option('--nats-user <user>', 'NATS user (with --nats-password)').env('NATS_USER'))
    .addOption(new Option('--nats-password <password>', 'NATS password').env('NATS_PASSWORD'))
    .addOption(new Option('--nats-token <token>', 'NATS token').env('NATS_TOKEN'))
    .addOption(new Option('--nats-creds <file>', 'NATS credentials file (JWT + nkey seed)').env('NATS_CREDS'))
    .addOption(new Option('--nats-tls-ca <file>', 'CA certificate to verify the NATS server').env('NATS_TLS_CA'))
    .addOption(new Option('--nats-tls-cert <file>', 'client certificate for NATS mutual TLS').env('NATS_TLS_CERT'))
    .addOption(new Option('--nats-tls-key <file>', 'client key for NATS mutual TLS').env('NATS_TLS_KEY'))
    .addOption(new Option('--queue-ack-wait <ms>', 'work queues: a step or decode a replica took and stopped confirming goes to another replica after this long').env('DITPIPE_QUEUE_ACK_WAIT_MS').default(DEFAULT_QUEUE_SETTINGS.ackWaitMs).argParser(intArg('--queue-ack-wait', 100, 3_600_000)))
    .addOption(new Option('--queue-max-deliver <n>', 'work queues: deliveries of one message (attempts) before it is given up').env('DITPIPE_QUEUE_MAX_DELIVER').default(DEFAULT_QUEUE_SETTINGS.maxDeliver).argParser(intArg('--queue-max-deliver', 1, 1000)))
    .addOption(new Option('--queue-max-messages <n>', 'work queues: most messages a queue holds (then RESOURCE_EXHAUSTED)').env('DITPIPE_QUEUE_MAX_MESSAGES').default(DEFAULT_QUEUE_SETTINGS.maxMessages).argParser(intArg('--queue-max-messages', 1)))
    .addOption(new Option('--queue-max-bytes <bytes>', 'work queues: most bytes a queue holds in the NATS server\'s memory (then RESOURCE_EXHAUSTED)').env('DITPIPE_QUEUE_MAX_BYTES').default(DEFAULT_QUEUE_SETTINGS.maxBytes).argParser(intArg('--queue-max-bytes', 1024)))
    .addOption(new Option('--queue-max-age <ms>', 'work queues: messages older than this are dropped').env('DITPIPE_QUEUE_MAX_AGE_MS').default(DEFAULT_QUEUE_SETTINGS.maxAgeMs).argParser(intArg('--queue-max-age', 1000)));
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

export function natsOptions(f: NatsFlags & { natsUrl: string }, name: string): NatsConnectOptions {
  const tls = f.natsTlsCa || f.natsTlsCert || f.natsTlsKey ? { caFile: f.natsTlsCa, certFile: f.natsTlsCert, keyFile: f.natsTlsKey } : undefined;
  return {
    servers: f.natsUrl,
    name,
    user: f.natsUser,
    password: f.natsPassword,
    token: f.natsToken,
    credsFile: f.natsCreds,
    tls,
    waitOnFirstConnect: true,
  };
}

export async function natsFromFlags(f: NatsFlags & { natsUrl: string }, name: string): Promise<Transport> {
  return natsTransport(await connectNats(natsOptions(f, name)));
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

export function numberArg(flag: string, min: number): (v: string) => number {
  return (v) => {
    const x = Number(v);
    if (!Number.isFinite(x) || x < min) throw new Error(`${flag} must be a number >= ${min}, got "${v}"`);
    return x;
  };
}

export function addServiceOptions(cmd: Command, defaults: { metricsPort: number }): Command {
  return cmd
    .addOption(new Option('--metrics-port <port>', 'port of the Prometheus /metrics endpoint (0 = any free port, -1 = off)').env('DITPIPE_METRICS_PORT').default(defaults.metricsPort).argParser(intArg('--metrics-port', -1, 65535)))
    .addOption(new Option('--shutdown-grace <ms>', 'time in-flight work gets to finish on SIGTERM').env('DITPIPE_SHUTDOWN_GRACE_MS').default(10_000).argParser(intArg('--shutdown-grace', 0)))
    .addOption(new Option('--log-level <level>', 'log level').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace']).env('DITPIPE_LOG_LEVEL').default('info'));
}

/** `--http-port`: the scheduler's HTTP API and playground (OpenAI-compatible images API); -1 turns it off. */
export function httpPortOption(defaultPort: number): Option {
  return new Option('--http-port <port>', 'port of the HTTP API (OpenAI-compatible /v1/images/generations, /v1/models) and the playground page at / (0 = any free port, -1 = off)')
    .env('DITPIPE_HTTP_PORT')
    .default(defaultPort)
    .argParser(intArg('--http-port', -1, 65535));
}

export function logger(name: string, level: string): Logger {
  return pino({ name, level }, pino.destination(2));
}

/**
 * Runs until SIGTERM/SIGINT, then stops the parts in the given order (each gets the grace period),
 * closes the transports and exits. A second signal exits at once.
 */
export async function serveUntilSignal(opts: {
  log: Logger;
  parts: Array<{ name: string; stop: (graceMs: number) => Promise<void> }>;
  transports: Transport[];
  registries: Registry[];
  metricsPort: number;
  graceMs: number;
}): Promise<void> {
  const metrics = opts.metricsPort >= 0 ? await serveMetrics(opts.registries, opts.metricsPort) : null;
  if (metrics) opts.log.info({ port: metrics.port }, `metrics on http://0.0.0.0:${metrics.port}/metrics`);
  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) {
      opts.log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    opts.log.info({ signal, graceMs: opts.graceMs }, 'shutting down');
    for (const p of opts.parts) {
      await p.stop(opts.graceMs);
      opts.log.info(`${p.name} stopped`);
    }
    await Promise.all(opts.transports.map((t) => t.close({ graceMs: opts.graceMs })));
    await metrics?.close();
    opts.log.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  for (const t of opts.transports) {
    void t.closed.then((err) => {
      if (err && !stopping) {
        opts.log.fatal({ err: err.message }, 'transport closed for good');
        process.exit(1);
      }
    });
  }
}
