// GET /ditpipe/cluster: what this scheduler knows of the cluster, for the playground's live panel.
// A scheduler cannot read its replicas' /metrics; it knows its own metrics registry (requests,
// samples in flight, the compute of the steps it got answers for, the batch rows the denoisers
// reported with each answer, its decode calls) and ListModels (replicas answering over the bus).
// Counters are cumulative: the page turns two readings into rates.
import type { Histogram, Counter, Gauge } from 'prom-client';
import type { ModelInfo } from '../../../shared/gen/ditpipe/v1/sampler.ts';
import type { Scheduler } from '../scheduler.ts';

type Labels = Record<string, string | number | undefined>;

async function values(
  m: Counter<string> | Gauge<string> | Histogram<string>,
): Promise<Array<{ value: number; labels: Labels; metricName?: string }>> {
  return (await m.get()).values;
}

function sum(vs: Array<{ value: number; labels: Labels; metricName?: string }>, match: Labels, suffix?: string): number {
  let s = 0;
  for (const v of vs) {
    if (suffix !== undefined && !v.metricName?.endsWith(suffix)) continue;
    if (Object.entries(match).every(([k, x]) => v.labels[k] === x)) s += v.value;
  }
  return s;
}

export const CLUSTER_SOURCE =
  "This scheduler's own metrics registry and ListModels (replicas that answered the scheduler's info call over the bus within 150 ms). " +
  'Batch rows and queue waits are what the denoisers reported with each step answer; sampling compute is counted by the scheduler per step answered; ' +
  "steps waiting are read from the model's work queue on the NATS server (every scheduler's steps). " +
  "Nothing here is read from the replicas' own /metrics endpoints; other schedulers' requests are not counted.";

export class ClusterView {
  private cached: { at: number; models: ModelInfo[] } | null = null;
  private loading: Promise<ModelInfo[]> | null = null;

  constructor(
    private readonly scheduler: Scheduler,
    private readonly cacheMs: number,
    private readonly grpcAddress: string | (() => string | undefined) | undefined,
  ) {}

  private async models(): Promise<ModelInfo[]> {
    if (this.cached && Date.now() - this.cached.at < this.cacheMs) return this.cached.models;
    this.loading ??= this.scheduler.catalog
      .list()
      .then((models) => {
        this.cached = { at: Date.now(), models };
        return models;
      })
      .finally(() => {
        this.loading = null;
      });
    return this.loading;
  }

  async snapshot(): Promise<Record<string, unknown>> {
    const m = this.scheduler.metrics;
    const [models, reqs, samples, images, steps, resent, rejected, gflops, rows, queue, decodes, previews, requestSeconds, pending] =
      await Promise.all([
        this.models(),
        values(m.requestsInFlight),
        values(m.samplesInFlight),
        values(m.images),
        values(m.stepsDispatched),
        values(m.resent),
        values(m.rejected),
        values(m.samplingGflops),
        values(m.stepBatchRows),
        values(m.stepQueueSeconds),
        values(m.decodes),
        values(m.previews),
        values(m.requestSeconds),
        values(m.queuePending),
      ]);
    return {
      time: Date.now(),
      source: CLUSTER_SOURCE,
      scheduler: {
        grpc_address: (typeof this.grpcAddress === 'function' ? this.grpcAddress() : this.grpcAddress) ?? null,
        requests_in_flight: sum(reqs, {}),
        samples_in_flight: sum(samples, {}),
        max_samples_in_flight: this.scheduler.config.maxSamplesInFlight,
        requests_total: sum(requestSeconds, {}, '_count'),
        requests_rejected_total: sum(rejected, {}),
        images_total: sum(images, {}),
        work_resent_messages_total: sum(resent, {}),
      },
      models: models.map((info) => {
        const model = { model: info.name };
        return {
          name: info.name,
          replicas: info.replicas,
          decoder_replicas: info.decoderReplicas,
          gflops_per_forward: info.gflops,
          image_size: info.imageSize,
          steps_dispatched_total: sum(steps, model),
          sampling_gflops_total: sum(gflops, model),
          step_batch_rows: { sum: sum(rows, model, '_sum'), count: sum(rows, model, '_count') },
          step_queue_wait_seconds: { sum: sum(queue, model, '_sum'), count: sum(queue, model, '_count') },
          steps_waiting_for_a_replica: sum(pending, { queue: 'denoise', model: info.name }),
          decodes_total: { final: sum(decodes, { ...model, purpose: 'final' }), preview: sum(decodes, { ...model, purpose: 'preview' }) },
          previews_total: Object.fromEntries(
            ['sent', 'skipped', 'late', 'failed'].map((o) => [o, sum(previews, { ...model, outcome: o })]),
          ),
          images_total: sum(images, model),
        };
      }),
    };
  }
}
