// A cluster as deployed, for fault tests: a real nats-server plus scheduler, denoisers and decoders
// as separate `ditpipe` processes (the golden tiny models), each with its metrics endpoint read
// from its log.
import { SamplerApi } from '../../shared/client.ts';
import { type NatsServerHandle, startNatsServer } from './nats.ts';
import { DIT_NAME, testModels, VAE_NAME } from './models.ts';
import { spawnService, type ServiceProcess } from './processes.ts';

export interface ClusterProcess extends ServiceProcess {
  /** http://127.0.0.1:<port>/metrics of the process. */
  metricsUrl: string;
}

export interface Cluster {
  nats: NatsServerHandle;
  scheduler: ClusterProcess;
  denoisers: ClusterProcess[];
  decoders: ClusterProcess[];
  api: SamplerApi;
  /** Sum of a metric's samples on one process (lines starting with `name`, optionally matching `filter`). */
  scrape(p: ClusterProcess, name: string, filter?: RegExp): Promise<number>;
  /** Stops nats-server and starts a new one on the same port (its memory store is lost). */
  restartNats(downMs: number): Promise<void>;
  stop(): Promise<Array<number | null>>;
}

export interface ClusterOptions {
  denoisers?: string[][];
  decoders?: number;
  /** Extra scheduler flags. */
  scheduler?: string[];
}

async function withMetrics(p: ServiceProcess): Promise<ClusterProcess> {
  const line = await p.waitFor(/^metrics on/);
  return Object.assign(p, { metricsUrl: `http://127.0.0.1:${Number(line.port)}/metrics` });
}

/** `denoisers` gives each denoiser's extra flags (default: two plain ones). */
export async function startCluster(opts: ClusterOptions = {}): Promise<Cluster> {
  const { ditDir, vaeDir } = testModels();
  let nats = await startNatsServer();
  const url = nats.url;
  const common = ['--nats-url', url, '--metrics-port', '0', '--shutdown-grace', '2000', '--log-level', 'info'];
  const denoiserFlags = opts.denoisers ?? [[], []];
  const denoisers = denoiserFlags.map((extra, i) =>
    spawnService(`denoiser-${i}`, ['denoiser', ...common, '--model-dir', ditDir, '--grpc-port', '-1', '--threads', '1', ...extra]),
  );
  const decoders = Array.from({ length: opts.decoders ?? 1 }, (_, i) =>
    spawnService(`decoder-${i}`, ['decoder', ...common, '--model-dir', vaeDir, '--grpc-port', '-1', '--threads', '1']),
  );
  // The repeat cache is off: the fault tests repeat seeds to compare bytes, and a cache hit would
  // answer them without a step in flight when the fault strikes.
  const scheduler = spawnService('scheduler', [
    'scheduler',
    ...common,
    '--repeat-cache-mib',
    '0',
    '--models',
    DIT_NAME,
    '--vae',
    `${DIT_NAME}=${VAE_NAME}`,
    '--grpc-port',
    '0',
    '--host',
    '127.0.0.1',
    '--http-port',
    '-1',
    ...(opts.scheduler ?? []),
  ]);
  const all = [...denoisers, ...decoders, scheduler];
  try {
    await Promise.all([...denoisers, ...decoders].map((p) => p.waitFor(/^serving /)));
    const ready = await scheduler.waitFor(/^Sampler API on/);
    const [s, ...rest] = await Promise.all([scheduler, ...denoisers, ...decoders].map(withMetrics));
    const api = new SamplerApi(`127.0.0.1:${Number(ready.port)}`);
    return {
      get nats() {
        return nats;
      },
      scheduler: s,
      denoisers: rest.slice(0, denoisers.length),
      decoders: rest.slice(denoisers.length),
      api,
      async scrape(p, name, filter) {
        const text = await (await fetch(p.metricsUrl)).text();
        return text
          .split('\n')
          .filter((l) => l.startsWith(name) && (!filter || filter.test(l)))
          .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
      },
      async restartNats(downMs) {
        const port = nats.port;
        await nats.stop();
        await new Promise((r) => setTimeout(r, downMs));
        nats = await startNatsServer({ port });
      },
      async stop() {
        api.close();
        const codes = await Promise.all([scheduler, ...denoisers, ...decoders].map((p) => p.stop()));
        await nats.stop();
        return codes;
      },
    };
  } catch (err) {
    await Promise.all(all.map((p) => p.stop('SIGKILL')));
    await nats.stop();
    throw err;
  }
}
