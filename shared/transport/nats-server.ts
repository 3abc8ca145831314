// Starts a real nats-server (for `ditpipe up` and the integration tests): a random free port on
// 127.0.0.1 unless one is given (the server picks it, so there is no race between choosing and
// binding), JetStream with memory storage only (ditpipe's work queues; nothing is written to disk),
// optional max_payload, monitoring port and auth (users with per-service permissions, see
// nats-permissions.ts) through a generated config file (mode 0600), ready when the server logs
// that it is.
//
//   const nats = await startNatsServer({ maxPayload: 64 * 1024, auth: { token: 's3cret' } });
//   ... connectNats({ servers: nats.url, token: 's3cret' }) ...
//   await nats.stop();
//   assertNoNatsServersRunning();     // in afterAll: every server started here was stopped
//
// The binary is $NATS_SERVER_BIN, else `nats-server` from PATH, /usr/sbin or /usr/bin.
import { type ChildProcess, spawn } from 'node:child_process';
import { accessSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { natsAuthorization, type NatsUser } from './nats-permissions.ts';

export interface NatsServerOptions {
  /** Port to listen on (default: any free port). */
  port?: number;
  /** Address to listen on (default 127.0.0.1). */
  host?: string;
  /** max_payload in bytes (nats-server default 1 MiB). */
  maxPayload?: number;
  /**
   * Require authentication: one user/password, a token, or users (nkeys or user/password) each
   * with its ditpipe service's permissions (shared/transport/nats-permissions.ts).
   */
  auth?: { user: string; password: string } | { token: string } | { users: NatsUser[] };
  /** Extra environment of the server process (values for `$VARIABLE`s in the config). */
  env?: Record<string, string>;
  /** JetStream memory store in bytes, or false to run without JetStream (default 1 GiB). */
  jetstream?: { maxMemory: number } | false;
  /** HTTP monitoring port (what KEDA's nats-jetstream scaler reads); 0 = any free port (default: off). */
  monitorPort?: number;
  /** Extra lines for the config file. */
  extraConfig?: string;
  /** Milliseconds to wait for readiness (default 10 000). */
  startTimeoutMs?: number;
  /** Own process group, so a terminal's Ctrl-C to the caller's group does not reach it (`ditpipe up`). */
  detached?: boolean;
}

export interface NatsServerHandle {
  /** nats://127.0.0.1:<port> */
  readonly url: string;
  readonly port: number;
  readonly pid: number;
  readonly configPath: string;
  /** http://127.0.0.1:<port> of the monitoring endpoint, when one was asked for. */
  readonly monitorUrl: string | undefined;
  /** Everything the server logged so far. */
  log(): string;
  /** SIGTERM, then SIGKILL after 5 s; resolves when the process has exited. Idempotent. */
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();

function findBinary(): string {
  const env = process.env.NATS_SERVER_BIN;
  if (env) return env;
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/bin', '/usr/local/bin'];
  for (const dir of dirs) {
    if (!dir) continue;
    const candidate = join(dir, 'nats-server');
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  throw new Error('nats-server not found: install it (Debian package nats-server) or set NATS_SERVER_BIN');
}

export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServerHandle> {
  const dir = mkdtempSync(join(tmpdir(), 'ditpipe-nats-'));
  const configPath = join(dir, 'nats.conf');
  const lines = [`listen: "${opts.host ?? '127.0.0.1'}:${opts.port ?? -1}"`];
  if (opts.maxPayload !== undefined) lines.push(`max_payload: ${opts.maxPayload}`);
  if (opts.auth && 'users' in opts.auth) {
    lines.push(natsAuthorization(opts.auth.users));
  } else if (opts.auth && 'token' in opts.auth) {
    lines.push(`authorization { token: ${JSON.stringify(opts.auth.token)} }`);
  } else if (opts.auth) {
    lines.push(`authorization { user: ${JSON.stringify(opts.auth.user)}, password: ${JSON.stringify(opts.auth.password)} }`);
  }
  if (opts.jetstream !== false) {
    const maxMemory = opts.jetstream?.maxMemory ?? 1024 * 1024 * 1024;
    lines.push(`jetstream { store_dir: ${JSON.stringify(join(dir, 'js'))}, max_memory_store: ${maxMemory}, max_file_store: 0 }`);
  }
  if (opts.monitorPort !== undefined) lines.push(`http: "127.0.0.1:${opts.monitorPort === 0 ? -1 : opts.monitorPort}"`);
  if (opts.extraConfig) lines.push(opts.extraConfig);
  // Only this user reads it: it may hold passwords or tokens.
  writeFileSync(configPath, `${lines.join('\n')}\n`, { mode: 0o600 });

  const env = opts.env ? { ...process.env, ...opts.env } : process.env;
  const child = spawn(findBinary(), ['-c', configPath], { stdio: ['ignore', 'pipe', 'pipe'], detached: opts.detached ?? false, env });
  running.add(child);
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => {
      running.delete(child);
      rmSync(dir, { recursive: true, force: true });
      resolve();
    });
  });
  let log = '';
  let monitor: number | undefined;
  const port = await new Promise<number>((resolve, reject) => {
    let found: number | undefined;
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`nats-server not ready within ${opts.startTimeoutMs ?? 10_000} ms:\n${log}`));
    }, opts.startTimeoutMs ?? 10_000);
    const onData = (chunk: Buffer): void => {
      log += chunk.toString();
      const m = /Listening for client connections on [^\s:]+:(\d+)/.exec(log);
      if (m) found = Number(m[1]);
      const h = /Starting http monitor on [^\s:]+:(\d+)/.exec(log);
      if (h) monitor = Number(h[1]);
      if (found !== undefined && log.includes('Server is ready')) {
        clearTimeout(timer);
        resolve(found);
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`nats-server exited during start (code ${code}, signal ${signal}):\n${log}`));
    });
  });

  let stopping: Promise<void> | undefined;
  return {
    url: `nats://${opts.host && opts.host !== '0.0.0.0' ? opts.host : '127.0.0.1'}:${port}`,
    port,
    pid: child.pid ?? -1,
    configPath,
    monitorUrl: monitor === undefined ? undefined : `http://127.0.0.1:${monitor}`,
    log: () => log,
    stop: () => {
      stopping ??= (async () => {
        if (child.exitCode === null && child.signalCode === null) {
          child.kill('SIGTERM');
          const force = setTimeout(() => child.kill('SIGKILL'), 5_000);
          await exited;
          clearTimeout(force);
        } else {
          await exited;
        }
      })();
      return stopping;
    },
  };
}

/** nats-server processes started by this module and not yet exited. */
export function runningNatsServers(): number {
  return running.size;
}

/** Throws when a nats-server started here is still running (a test forgot to stop it). */
export function assertNoNatsServersRunning(): void {
  if (running.size > 0) {
    const pids = [...running].map((c) => c.pid).join(', ');
    throw new Error(`${running.size} nats-server process(es) still running: pid ${pids}`);
  }
}
