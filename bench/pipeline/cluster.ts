// Plumbing for the pipeline benchmarks: a real nats-server plus `ditpipe scheduler|denoiser`
// processes (each its own Node process, as deployed), readiness from their logs, /metrics scraping,
// model directories built once into a cache folder, and wall-clock helpers.
//
// A cluster can run this tree's services or those of another git revision (`baselineTree`), so a
// benchmark can take the dispatch of an earlier ditpipe (push through NATS queue groups, before
// 2026-12-02) and today's (pull from JetStream work queues) in turns in one run.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import { cpus, freemem, loadavg, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { GRAPH_REVISION } from '../../shared/model/modeldir.ts';
import { startNatsServer, type NatsServerHandle } from '../../test/helpers/nats.ts';

export const ROOT = resolve(import.meta.dirname, '../..');
const BIN = join(ROOT, 'bin/ditpipe.js');

/** The services a cluster runs: a ditpipe tree, and the flags its commands need beyond the common ones. */
export interface Variant {
  /** "pull" (this tree) or the label of a baseline. */
  name: string;
  root: string;
  schedulerArgs: string[];
}

/** This tree: pull dispatch. The HTTP API is off so clusters side by side do not compete for its port. */
// The repeat cache is off: a benchmark repeating a seed measures sampling, not the cache.
export const PULL: Variant = { name: 'pull', root: ROOT, schedulerArgs: ['--http-port', '-1', '--repeat-cache-mib', '0'] };

/**
 * Another git revision of ditpipe as a variant (e.g. the last commit with push dispatch), checked
 * out once into $TMPDIR as a detached worktree that shares this tree's node_modules.
 */
export function baselineTree(ref: string, name: string): Variant {
  const sha = spawnSync('git', ['rev-parse', '--verify', `${ref}^{commit}`], { cwd: ROOT, encoding: 'utf8' }).stdout.trim();
  if (!/^[0-9a-f]{40}$/.test(sha)) throw new Error(`--baseline ${ref}: not a commit of this repository (needs its git history)`);
  const dir = join(tmpdir(), `ditpipe-baseline-${sha.slice(0, 12)}`);
  if (!existsSync(join(dir, 'bin/ditpipe.js'))) {
    log(`checking out ${ref} (${sha.slice(0, 12)}) into ${dir} as the "${name}" variant`);
    const r = spawnSync('git', ['worktree', 'add', '--force', '--detach', dir, sha], { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
    if (r.status !== 0) throw new Error(`git worktree add ${dir} ${sha} failed`);
  }
  if (!existsSync(join(dir, 'node_modules'))) symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  return { name, root: dir, schedulerArgs: [] };
}
/** Keyed by the compiler's graph revision: a benchmark never runs graphs an older compiler wrote. */
export const CACHE = join(tmpdir(), `ditpipe-bench-models-${process.getuid?.() ?? 0}-rev${GRAPH_REVISION}`);

export function log(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

/** Builds (once) a DiT model directory with random weights from a preset, via the CLI like a user. */
export function benchModel(preset: string, inputSize: number): { dir: string; name: string } {
  const name = `${preset.toLowerCase().replace(/[^a-z0-9]+/g, '-')}-${inputSize}`;
  const dir = join(CACHE, name);
  if (existsSync(join(dir, 'model.json'))) return { dir, name };
  mkdirSync(CACHE, { recursive: true });
  const weights = join(CACHE, `${name}.safetensors`);
  const tmp = `${dir}.tmp-${process.pid}`;
  log(`building ${name} (random weights, seed 0) in ${CACHE}`);
  const run = (args: string[]): void => {
    const r = spawnSync(process.execPath, [BIN, ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
    if (r.status !== 0) throw new Error(`ditpipe ${args.slice(0, 3).join(' ')} failed (exit ${r.status})`);
  };
  run(['model', 'init', 'dit', '--preset', preset, '--input-size', String(inputSize), '--init', 'random', '--seed', '0', '--out', weights]);
  run([
    'model',
    'build',
    'dit',
    '--weights',
    weights,
    '--preset',
    preset,
    '--input-size',
    String(inputSize),
    '--name',
    name,
    '--quiet',
    '--out',
    tmp,
  ]);
  rmSync(weights, { force: true });
  renameSync(tmp, dir);
  return { dir, name };
}

export interface ServiceProcess {
  readonly kind: string;
  readonly proc: ChildProcess;
  readonly metricsPort: number;
  /** gRPC port (scheduler only). */
  readonly grpcPort: number;
  metrics(): Promise<Metrics>;
  /** SIGTERM, SIGKILL after 10 s; resolves on exit. */
  stop(): Promise<void>;
}

/** Parsed Prometheus text: metric sample name → sum over all label sets. */
export type Metrics = Map<string, number>;

export function parseMetrics(text: string): Metrics {
  const m: Metrics = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const v = Number(match[3]);
    if (!Number.isFinite(v)) continue;
    m.set(match[1], (m.get(match[1]) ?? 0) + v);
    if (match[2]) m.set(match[1] + match[2], v); // the series itself, for metricWhere
  }
  return m;
}

/** A metric summed over its series. */
export function metric(m: Metrics, name: string): number {
  return m.get(name) ?? 0;
}

/** A metric summed over the series whose labels (`{a="x",b="y"}`) match `labels`. */
export function metricWhere(m: Metrics, name: string, labels: RegExp): number {
  let sum = 0;
  for (const [key, v] of m) if (key.startsWith(`${name}{`) && labels.test(key.slice(name.length))) sum += v;
  return sum;
}

/**
 * Starts `ditpipe <kind> ...args` and resolves once it logged its metrics endpoint (the last
 * thing a service does before it is ready). `nodeArgs` go to node (e.g. `--cpu-prof`).
 */
export async function startService(
  kind: 'scheduler' | 'denoiser' | 'decoder',
  args: string[],
  opts: { nodeArgs?: string[]; cwd?: string; variant?: Variant } = {},
): Promise<ServiceProcess> {
  const root = opts.variant?.root ?? ROOT;
  const proc = spawn(
    process.execPath,
    [...(opts.nodeArgs ?? []), join(root, 'bin/ditpipe.js'), kind, '--metrics-port', '0', '--log-level', 'info', ...args],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
      cwd: opts.cwd ?? root,
    },
  );
  let logText = '';
  let grpcPort = -1;
  const exited = new Promise<void>((res) => proc.once('exit', () => res()));
  const metricsPort = await new Promise<number>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`${kind} not ready within 120 s:\n${logText}`)), 120_000);
    proc.stderr?.on('data', (chunk: Buffer) => {
      logText = (logText + chunk.toString()).slice(-20_000);
      const api = /"msg":"Sampler API on [^"]*:(\d+)/.exec(logText);
      if (api) grpcPort = Number(api[1]);
      const m = /"msg":"metrics on http:\/\/[^"]*:(\d+)\/metrics/.exec(logText);
      if (m) {
        clearTimeout(timer);
        res(Number(m[1]));
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      rej(new Error(`${kind} exited during start (code ${code}):\n${logText}`));
    });
  });
  let stopping: Promise<void> | undefined;
  return {
    kind,
    proc,
    metricsPort,
    grpcPort,
    async metrics() {
      // Bounded: a stopped (SIGSTOP) process accepts the connection but never answers.
      const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`, { signal: AbortSignal.timeout(5_000) });
      return parseMetrics(await res.text());
    },
    stop() {
      stopping ??= (async () => {
        if (proc.exitCode !== null || proc.signalCode !== null) return;
        proc.kill('SIGTERM');
        const force = setTimeout(() => proc.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(force);
      })();
      return stopping;
    },
  };
}

export interface Cluster {
  nats: NatsServerHandle;
  scheduler: ServiceProcess;
  denoisers: ServiceProcess[];
  /** gRPC address of the scheduler. */
  address: string;
  stop(): Promise<void>;
}

export interface ClusterOptions {
  modelDir: string;
  model: string;
  denoisers: number;
  /** Extra denoiser flags (e.g. --threads 2, --simulate 0+0). */
  denoiserArgs?: string[];
  schedulerArgs?: string[];
  schedulerNodeArgs?: string[];
  /** Node flags for the first denoiser only (e.g. --cpu-prof). */
  firstDenoiserNodeArgs?: string[];
  /** Per-denoiser extra flags (index i gets perDenoiserArgs[i]), e.g. a slower --simulate for some. */
  perDenoiserArgs?: string[][];
  /** Which ditpipe runs (default: this tree). */
  variant?: Variant;
}

/** nats-server + denoisers + one scheduler, each its own process; no decoder (raw-latent output). */
export async function startCluster(o: ClusterOptions): Promise<Cluster> {
  const nats = await startNatsServer();
  const started: ServiceProcess[] = [];
  try {
    // Start denoisers a few at a time: on a small machine 16 tsx start-ups at once take longer than serially.
    const denoisers: ServiceProcess[] = [];
    for (let i = 0; i < o.denoisers; i += 4) {
      const batch = await Promise.all(
        Array.from({ length: Math.min(4, o.denoisers - i) }, (_, k) =>
          startService(
            'denoiser',
            [
              '--nats-url',
              nats.url,
              '--model-dir',
              o.modelDir,
              '--name',
              o.model,
              '--grpc-port',
              '-1',
              ...(o.denoiserArgs ?? []),
              ...(o.perDenoiserArgs?.[i + k] ?? []),
            ],
            {
              nodeArgs: i + k === 0 ? o.firstDenoiserNodeArgs : undefined,
              variant: o.variant,
            },
          ),
        ),
      );
      denoisers.push(...batch);
      started.push(...batch);
    }
    const scheduler = await startService(
      'scheduler',
      [
        '--nats-url',
        nats.url,
        '--models',
        o.model,
        '--grpc-port',
        '0',
        '--host',
        '127.0.0.1',
        ...(o.variant ?? PULL).schedulerArgs,
        ...(o.schedulerArgs ?? []),
      ],
      { nodeArgs: o.schedulerNodeArgs, variant: o.variant },
    );
    started.push(scheduler);
    return {
      nats,
      scheduler,
      denoisers,
      address: `127.0.0.1:${scheduler.grpcPort}`,
      async stop() {
        await scheduler.stop();
        await Promise.all(denoisers.map((d) => d.stop()));
        await nats.stop();
      },
    };
  } catch (err) {
    await Promise.all(started.map((s) => s.stop()));
    await nats.stop();
    throw err;
  }
}

/** The machine, for the JSON and BENCHMARKS.md. */
export function machine(): Record<string, string | number> {
  return {
    cpu: cpus()[0]?.model ?? 'unknown',
    nproc: cpus().length,
    memGiB: Number((totalmem() / 2 ** 30).toFixed(1)),
    freeGiB: Number((freemem() / 2 ** 30).toFixed(1)),
    loadavg1: Number(loadavg()[0].toFixed(2)),
    node: process.version,
  };
}

export function round(x: number, digits = 3): number {
  return Number(x.toFixed(digits));
}
