// `ditpipe up`: a local cluster — a nats-server (from PATH) and separate processes for the
// scheduler, N denoisers and M decoders, their logs prefixed. Ctrl-C shuts it down in order:
// scheduler (drains requests), then denoisers and decoders, then NATS.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { readDitModelDir, readVaeModelDir } from '../shared/model/modeldir.ts';
import { startNatsServer, type NatsServerHandle } from '../shared/transport/nats-server.ts';
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
}

interface Child {
  name: string;
  proc: ChildProcess;
  exited: Promise<number | null>;
}

function startChild(name: string, args: string[]): Child {
  // Own process group: a terminal's Ctrl-C reaches only `up`, which then stops the children in order.
  const proc = spawn(process.execPath, [resolve(ROOT, 'bin/ditpipe.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  process.once('exit', () => proc.kill('SIGKILL'));
  for (const stream of [proc.stdout, proc.stderr]) {
    if (!stream) continue;
    createInterface({ input: stream }).on('line', (line) => process.stderr.write(`[${name}] ${line}\n`));
  }
  const exited = new Promise<number | null>((res) => proc.once('exit', (code) => res(code)));
  return { name, proc, exited };
}

async function stopChild(c: Child, graceMs: number): Promise<void> {
  if (c.proc.exitCode !== null || c.proc.signalCode !== null) return;
  c.proc.kill('SIGTERM');
  const timer = setTimeout(() => c.proc.kill('SIGKILL'), graceMs + 5_000);
  await c.exited;
  clearTimeout(timer);
}

export const command = new Command('up')
  .description('Start a local cluster: nats-server plus separate scheduler, denoiser and decoder processes (Ctrl-C stops it in order).')
  .addOption(new Option('--model-dir <dir>', 'DiT model directory (default: the Fashion-MNIST model)'))
  .addOption(new Option('--vae-dir <dir>', 'VAE model directory (default: the Fashion-MNIST VAE)'))
  .addOption(new Option('--denoisers <n>', 'denoiser processes').default(2).argParser(intArg('--denoisers', 1, 256)))
  .addOption(new Option('--decoders <n>', 'decoder processes').default(1).argParser(intArg('--decoders', 1, 256)))
  .addOption(new Option('--grpc-port <port>', 'scheduler gRPC port (0 = a free port)').default(50051).argParser(intArg('--grpc-port', 0, 65535)))
  .addOption(httpPortOption(8080))
  .addOption(new Option('--nats-port <port>', 'nats-server port (0 = any free port)').default(4222).argParser(intArg('--nats-port', 0, 65535)))
  .addOption(new Option('--metrics-port <port>', 'first metrics port: scheduler, then each denoiser and decoder in turn (0 = free ports, -1 = off)').default(9464).argParser(intArg('--metrics-port', -1, 65535)))
  .addOption(new Option('--threads <n>', 'onnxruntime intra-op threads per process (0 = all cores)').default(1).argParser(intArg('--threads', 0, 1024)))
  .addOption(new Option('--shutdown-grace <ms>', 'time each process gets to drain on Ctrl-C').default(10_000).argParser(intArg('--shutdown-grace', 0)))
  .addOption(new Option('--simulate <base+perRow>', 'run the denoisers in simulation mode (no model compute)'))
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
    // The cluster's nats-server lives in this process's lifetime only.
    const nats: NatsServerHandle = await startNatsServer({ port: o.natsPort === 0 ? undefined : o.natsPort, maxPayload: 8 * 1024 * 1024 });
    process.stderr.write(`[up] nats-server on ${nats.url} (max_payload 8 MiB)\n`);
    // Ports are fixed here, before the processes start, so the banner below can list them all.
    const n = o.denoisers + o.decoders;
    const free = await freePorts(n + (o.metricsPort === 0 ? n + 1 : 0) + (o.grpcPort === 0 ? 1 : 0));
    const take = (): number => free.shift() as number;
    const grpcPort = o.grpcPort === 0 ? take() : o.grpcPort;
    const health = Array.from({ length: n }, take);
    const metrics = portRange(o.metricsPort, 1 + n, take); // the scheduler's first
    const common = ['--nats-url', nats.url, '--shutdown-grace', String(o.shutdownGrace)];
    const replicas: Child[] = [];
    const banner: string[] = [];
    const metricsUrl = (port: number): string => (port < 0 ? 'metrics off' : `metrics http://127.0.0.1:${port}/metrics`);
    for (let i = 0; i < n; i++) {
      const denoiser = i < o.denoisers;
      const name = denoiser ? `denoiser-${i}` : `decoder-${i - o.denoisers}`;
      const args = [denoiser ? 'denoiser' : 'decoder', ...common, '--model-dir', denoiser ? ditDir : vaeDir, '--grpc-port', String(health[i]), '--threads', String(o.threads), '--metrics-port', String(metrics[1 + i])];
      if (denoiser && o.simulate) args.push('--simulate', o.simulate);
      replicas.push(startChild(name, args));
      banner.push(`[up]   ${name.padEnd(12)} health 127.0.0.1:${health[i]}  ${metricsUrl(metrics[1 + i])}`);
    }
    const scheduler = startChild('scheduler', [
      'scheduler', ...common, '--models', dit.name, '--vae', `${dit.name}=${dit.vae ?? vae.name}`, '--grpc-port', String(grpcPort), '--metrics-port', String(metrics[0]),
      '--http-port', String(o.httpPort),
    ]);
    process.stderr.write(
      [
        `[up] model ${dit.name}, ${o.denoisers} denoiser(s), ${o.decoders} decoder(s); Ctrl-C to stop`,
        `[up]   ${'scheduler'.padEnd(12)} gRPC 127.0.0.1:${grpcPort}  ${metricsUrl(metrics[0])}`,
        ...banner,
        '',
      ].join('\n'),
    );
    if (o.httpPort > 0) process.stderr.write(`[up] playground: open http://127.0.0.1:${o.httpPort}/ (OpenAI-compatible images API under /v1)\n`);

    let stopping = false;
    const stopAll = async (why: string): Promise<void> => {
      if (stopping) return;
      stopping = true;
      process.stderr.write(`[up] ${why}: stopping the scheduler, then replicas, then NATS\n`);
      await stopChild(scheduler, o.shutdownGrace);
      await Promise.all(replicas.map((c) => stopChild(c, o.shutdownGrace)));
      await nats.stop();
      process.stderr.write('[up] stopped\n');
      process.exit(0);
    };
    process.on('SIGINT', () => void stopAll('SIGINT'));
    process.on('SIGTERM', () => void stopAll('SIGTERM'));
    void scheduler.exited.then((code) => {
      if (!stopping) void stopAll(`scheduler exited (code ${code})`);
    });
    // A replica that dies only shrinks its pool (its steps are retried on the others).
    for (const c of replicas) {
      void c.exited.then((code) => {
        if (!stopping) process.stderr.write(`[up] ${c.name} exited (code ${code}); ${replicas.filter((r) => r.proc.exitCode === null && r.proc.signalCode === null).length} replica process(es) left\n`);
      });
    }
  });
