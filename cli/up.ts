// `ditpipe up`: a local cluster — a nats-server (from PATH) and separate processes for the
// scheduler, N denoisers and M decoders, their logs prefixed. NATS requires credentials: a fresh
// nkey per service each run, with that service's permissions only; each child finds its seed
// file through NATS_NKEY. Ctrl-C shuts it down in order:
// scheduler (drains requests), then denoisers and decoders, then NATS. Every child runs in its own
// process group, so a terminal's Ctrl-C (SIGINT to the whole foreground group) reaches only `up`,
// which then stops them in that order itself. Exit status: 0 after an ordered stop, 1 when a
// child failed to start or died (a replica's death alone keeps the cluster up while its pool has
// another replica, but still makes the final status 1).
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { readDitModelDir, readVaeModelDir } from '../shared/model/modeldir.ts';
import { makeServiceNkeys, writeSeedFiles } from '../shared/transport/nats-credentials.ts';
import { NATS_SERVICES, type NatsService } from '../shared/transport/nats-permissions.ts';
import { startNatsServer, type NatsServerHandle } from '../shared/transport/nats-server.ts';
import { LOG_FORMATS, prettyFor, type LogFormat } from '../shared/log.ts';
import { httpPortOption, intArg } from './common.ts';
import { freePorts, portRange } from './ports.ts';
import { ensureDefaultModels, ROOT } from './default-model.ts';

interface Flags {
  modelDir?: string;
  vaeDir?: string;
  denoisers: number;
  decoders: number;
  grpcPort: number;
  httpPort: number;
  natsPort: number;
  metricsPort: number;
  threads: number;
  shutdownGrace: number;
  simulate?: string;
  host: string;
  logFormat: LogFormat;
}

interface Child {
  name: string;
  proc: ChildProcess;
  /** Exit code, or the signal's name when it was killed. */
  exited: Promise<string>;
  /** Whether the process has logged that it serves (gRPC bound, replica subscribed). */
  ready: boolean;
  /** Set once `up` itself asked it to stop. */
  stopping: boolean;
}

/** What a service logs once it serves, in JSON or pretty form alike. */
const READY = /"msg":"(?:serving |Sampler API on )|\b(?:serving \S+|Sampler API on \S+)/;

function startChild(name: string, args: string[], env: Record<string, string>, onLine?: (line: string) => void): Child {
  // Own process group: a terminal's Ctrl-C reaches only `up`, which then stops the children in order.
  // Credentials travel in the environment (a file's path), never on the command line `ps` shows.
  const childEnv = { ...process.env, ...env };
  // Other NATS credentials in the caller's environment would clash with the one given here.
  for (const k of ['NATS_USER', 'NATS_PASSWORD', 'NATS_TOKEN', 'NATS_CREDS']) delete childEnv[k];
  const proc = spawn(process.execPath, [resolve(ROOT, 'bin/ditpipe.js'), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
    env: childEnv,
  });
  const kill = (): void => {
    proc.kill('SIGKILL');
  };
  process.once('exit', kill);
  const child: Child = { name, proc, exited: Promise.resolve(''), ready: false, stopping: false };
  for (const stream of [proc.stdout, proc.stderr]) {
    if (!stream) continue;
    createInterface({ input: stream }).on('line', (line) => {
      if (!child.ready && READY.test(line)) child.ready = true;
      process.stderr.write(`[${name}] ${line}\n`);
      onLine?.(line);
    });
  }
  child.exited = new Promise<string>((res) =>
    proc.once('exit', (code, signal) => {
      process.off('exit', kill);
      res(code === null ? String(signal) : String(code));
    }),
  );
  return child;
}

async function stopChild(c: Child, graceMs: number): Promise<string> {
  c.stopping = true;
  if (c.proc.exitCode === null && c.proc.signalCode === null) {
    c.proc.kill('SIGTERM');
    const timer = setTimeout(() => c.proc.kill('SIGKILL'), graceMs + 5_000);
    const code = await c.exited;
    clearTimeout(timer);
    return code;
  }
  return c.exited;
}

export const command = new Command('up')
  .description(
    'Start a local cluster: nats-server (an nkey per service, each with only its permissions) plus separate scheduler, denoiser and decoder processes (Ctrl-C stops it in order).',
  )
  .addOption(new Option('--model-dir <dir>', 'DiT model directory (default: the Fashion-MNIST model)'))
  .addOption(new Option('--vae-dir <dir>', 'VAE model directory (default: the Fashion-MNIST VAE)'))
  .addOption(new Option('--denoisers <n>', 'denoiser processes').default(2).argParser(intArg('--denoisers', 1, 256)))
  .addOption(new Option('--decoders <n>', 'decoder processes').default(1).argParser(intArg('--decoders', 1, 256)))
  .addOption(
    new Option('--grpc-port <port>', 'scheduler gRPC port (0 = a free port)').default(50051).argParser(intArg('--grpc-port', 0, 65535)),
  )
  .addOption(httpPortOption(8080))
  .addOption(
    new Option('--nats-port <port>', 'nats-server port (0 = any free port)').default(4222).argParser(intArg('--nats-port', 0, 65535)),
  )
  .addOption(
    new Option('--metrics-port <port>', 'first metrics port: scheduler, then each denoiser and decoder in turn (0 = free ports, -1 = off)')
      .default(9464)
      .argParser(intArg('--metrics-port', -1, 65535)),
  )
  .addOption(
    new Option('--threads <n>', 'onnxruntime intra-op threads per process (0 = all cores)')
      .default(1)
      .argParser(intArg('--threads', 0, 1024)),
  )
  .addOption(
    new Option('--shutdown-grace <ms>', 'time each process gets to drain on Ctrl-C')
      .default(10_000)
      .argParser(intArg('--shutdown-grace', 0)),
  )
  .addOption(new Option('--simulate <base+perRow>', 'run the denoisers in simulation mode (no model compute)'))
  .addOption(
    new Option('--host <addr>', "address the scheduler's gRPC binds (replicas, metrics and NATS stay on loopback)").default('127.0.0.1'),
  )
  .addOption(
    new Option('--log-format <format>', "children's log lines: pretty, json, auto = pretty when stderr is a terminal")
      .choices([...LOG_FORMATS])
      .default('auto'),
  )
  .action(async (o: Flags) => {
    let ditDir = o.modelDir;
    let vaeDir = o.vaeDir;
    if (!ditDir || !vaeDir) {
      const d = ensureDefaultModels({ log: (l) => process.stderr.write(`[up] ${l}\n`) });
      ditDir ??= d.ditDir;
      vaeDir ??= d.vaeDir;
    }
    const dit = readDitModelDir(ditDir).meta;
    const vae = readVaeModelDir(vaeDir).meta;
    // The cluster's nats-server lives in this process's lifetime only, in its own process group too,
    // so a terminal's Ctrl-C does not take NATS away from services that are still draining.
    // Every service gets its own nkey, made for this run (seeds in a directory only this user
    // reads, removed on exit), and only its permissions (shared/transport/nats-permissions.ts):
    // nothing reaches NATS without one of them.
    const credDir = mkdtempSync(join(tmpdir(), 'ditpipe-up-nkeys-'));
    const removeCreds = (): void => rmSync(credDir, { recursive: true, force: true });
    process.once('exit', removeCreds);
    const keys = makeServiceNkeys();
    const seeds = writeSeedFiles(credDir, keys);
    const nats: NatsServerHandle = await startNatsServer({
      port: o.natsPort === 0 ? undefined : o.natsPort,
      maxPayload: 8 * 1024 * 1024,
      detached: true,
      auth: { users: NATS_SERVICES.map((service) => ({ service, nkey: keys[service].publicKey })) },
    });
    process.stderr.write(
      `[up] nats-server on ${nats.url} (max_payload 8 MiB; an nkey per service, each with only its service's permissions)\n`,
    );
    const credentials = (service: NatsService): Record<string, string> => ({ NATS_NKEY: seeds[service] });
    // Ports are fixed here, before the processes start, so the banner below can list them all.
    const n = o.denoisers + o.decoders;
    const free = await freePorts(n + (o.metricsPort === 0 ? n + 1 : 0) + (o.grpcPort === 0 ? 1 : 0));
    const take = (): number => free.shift() as number;
    const grpcPort = o.grpcPort === 0 ? take() : o.grpcPort;
    const health = Array.from({ length: n }, take);
    const metrics = portRange(o.metricsPort, 1 + n, take); // the scheduler's first
    // Children log to pipes; decide pretty or JSON by this process's terminal.
    const logFormat = prettyFor(o.logFormat, Boolean(process.stderr.isTTY)) ? 'pretty' : 'json';
    const common = [
      '--nats-url',
      nats.url,
      '--shutdown-grace',
      String(o.shutdownGrace),
      '--log-format',
      logFormat,
      '--metrics-host',
      '127.0.0.1',
    ];
    const replicas: Child[] = [];
    const banner: string[] = [];
    const metricsUrl = (port: number): string => (port < 0 ? 'metrics off' : `metrics http://127.0.0.1:${port}/metrics`);
    // The ready line comes once the scheduler serves and every replica has logged that it serves,
    // so whatever waits for it (a script, a person) can send work straight away.
    let announced = false;
    let schedulerAddress: string | undefined;
    const announceWhenReady = (): void => {
      if (announced || schedulerAddress === undefined || !replicas.every((c) => c.ready)) return;
      announced = true;
      process.stderr.write(
        `[up] scheduler gRPC on ${schedulerAddress}, model ${dit.name}, ${o.denoisers} denoiser(s), ${o.decoders} decoder(s) serving; Ctrl-C to stop\n`,
      );
    };
    for (let i = 0; i < n; i++) {
      const denoiser = i < o.denoisers;
      const name = denoiser ? `denoiser-${i}` : `decoder-${i - o.denoisers}`;
      const args = [
        denoiser ? 'denoiser' : 'decoder',
        ...common,
        '--model-dir',
        denoiser ? ditDir : vaeDir,
        '--grpc-port',
        String(health[i]),
        '--host',
        '127.0.0.1',
        '--threads',
        String(o.threads),
        '--metrics-port',
        String(metrics[1 + i]),
      ];
      if (denoiser && o.simulate) args.push('--simulate', o.simulate);
      replicas.push(startChild(name, args, credentials(denoiser ? 'denoiser' : 'decoder'), announceWhenReady));
      banner.push(`[up]   ${name.padEnd(12)} health 127.0.0.1:${health[i]}  ${metricsUrl(metrics[1 + i])}`);
    }
    const scheduler = startChild(
      'scheduler',
      [
        'scheduler',
        ...common,
        '--models',
        dit.name,
        '--vae',
        `${dit.name}=${dit.vae ?? vae.name}`,
        '--grpc-port',
        String(grpcPort),
        '--host',
        o.host,
        '--metrics-port',
        String(metrics[0]),
        '--http-port',
        String(o.httpPort),
      ],
      credentials('scheduler'),
      (line) => {
        // Print the address the scheduler bound, as it logged it.
        const m = /Sampler API on (\S+)/.exec(line);
        if (m && schedulerAddress === undefined) schedulerAddress = m[1];
        announceWhenReady();
      },
    );
    process.stderr.write(
      [
        `[up] model ${dit.name}, ${o.denoisers} denoiser(s), ${o.decoders} decoder(s)`,
        `[up]   ${'scheduler'.padEnd(12)} gRPC ${o.host}:${grpcPort}  ${metricsUrl(metrics[0])}`,
        ...banner,
        '',
      ].join('\n'),
    );
    if (o.httpPort > 0)
      process.stderr.write(`[up] playground: open http://127.0.0.1:${o.httpPort}/ (OpenAI-compatible images API under /v1)\n`);
    const failures: string[] = [];
    const all = [scheduler, ...replicas];

    let stopping = false;
    const stopAll = async (why: string): Promise<void> => {
      if (stopping) return;
      stopping = true;
      process.stderr.write(`[up] ${why}: stopping the scheduler, then replicas, then NATS\n`);
      const codes = [
        await stopChild(scheduler, o.shutdownGrace),
        ...(await Promise.all(replicas.map((c) => stopChild(c, o.shutdownGrace)))),
      ];
      codes.forEach((code, i) => {
        if (code !== '0' && !failures.some((f) => f.startsWith(`${all[i].name} `)))
          failures.push(`${all[i].name} exited with ${code} while stopping`);
      });
      await nats.stop();
      removeCreds();
      if (failures.length) process.stderr.write(`[up] stopped; failed: ${failures.join('; ')}\n`);
      else process.stderr.write('[up] stopped\n');
      process.exit(failures.length ? 1 : 0);
    };
    const onSignal = (signal: string): void => {
      stopAll(signal).catch((err: unknown) => {
        process.stderr.write(`[up] stopping failed: ${(err as Error).message}\n`);
        process.exit(1);
      });
    };
    process.on('SIGINT', () => onSignal('SIGINT'));
    process.on('SIGTERM', () => onSignal('SIGTERM'));
    const alive = (c: Child): boolean => c.proc.exitCode === null && c.proc.signalCode === null;
    for (const c of all) {
      void c.exited.then((code) => {
        if (stopping || c.stopping) return;
        const what = `${c.name} ${c.ready ? 'died' : 'failed to start'} (exit ${code})`;
        failures.push(what);
        if (c === scheduler) {
          onSignal(what);
          return;
        }
        // A replica that dies only shrinks its pool (its steps are retried on the others), unless it was the last.
        const pool = replicas.filter((r) => r.name.split('-')[0] === c.name.split('-')[0]);
        const left = pool.filter(alive).length;
        if (left === 0) onSignal(`${what}, no ${c.name.split('-')[0]} left`);
        else process.stderr.write(`[up] ${what}; ${left} ${c.name.split('-')[0]}(s) left, exit status will be 1\n`);
      });
    }
  });
