// Starts a denoiser replica on a transport and, when the caller gives one, on its gRPC server (see
// shared/server/replica.ts for the shutdown order).
import { DenoiseRequest, DenoiserDefinition, DenoiserService } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { GuidanceChannels, StepCachePolicy } from '../../shared/gen/ditpipe/v1/common.ts';
import type { Logger } from '../../shared/log.ts';
import { zeroReplicaWorkSeries, type DenoiserMetrics } from '../../shared/metrics.ts';
import type { GrpcServer } from '../../shared/server/grpc.ts';
import { mountReplica, type RunningReplica } from '../../shared/server/replica.ts';
import { f32Tensor } from '../../shared/tensor.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { DenoiserConfig } from './config.ts';
import { Denoiser } from './denoiser.ts';

/** The largest DenoiseRequest this replica accepts: a full row budget of latents, every field set. */
export function maxDenoiseRequestBytes(d: Denoiser): number {
  const c = d.meta.config;
  const rows = d.config.maxBatchRows;
  return DenoiseRequest.encode({
    model: d.name,
    x: f32Tensor([rows, c.in_channels, c.input_size, c.input_size], new Float32Array(rows * c.in_channels * c.input_size * c.input_size)),
    t: new Array<bigint>(rows).fill(-1n),
    y: new Array<number>(rows).fill(-1),
    cfgScale: Number.MAX_VALUE,
    guidanceChannels: GuidanceChannels.GUIDANCE_CHANNELS_ALL,
    requestId: 'x'.repeat(128),
    omitVariance: true,
    // Every step-cache field at its widest: the key's 256 characters as 3-byte UTF-8.
    stepCache: {
      preset: '',
      policy: StepCachePolicy.STEP_CACHE_POLICY_ADAPTIVE,
      interval: 0xffffffff,
      threshold: Number.MAX_VALUE,
      warmupSteps: 0xffffffff,
      maxCachedSteps: 0xffffffff,
    },
    cacheKey: '\u0800'.repeat(256),
    numSteps: 0xffffffff,
    stepIndex: 0xffffffff,
  }).finish().byteLength;
}

export async function startDenoiserService(
  config: DenoiserConfig,
  transport: Transport,
  opts: { grpc?: GrpcServer | null; metrics?: DenoiserMetrics; log?: Logger; queueSettings?: Partial<QueueSettings> } = {},
): Promise<RunningReplica & { denoiser: Denoiser }> {
  const denoiser = await Denoiser.create(config, opts.metrics);
  denoiser.onDead((err) =>
    opts.log?.error({ err: err.message }, `${err.message}: this replica answers UNAVAILABLE and reports NOT_SERVING until it is restarted`),
  );
  zeroReplicaWorkSeries(denoiser.metrics, denoiser.name);
  // Said once at start: requests asking for step caching are then served as full steps.
  const sc = denoiser.stepCache;
  if (!sc.enabled && config.stepCacheMib > 0 && !config.simulate)
    opts.log?.warn({}, `step cache unavailable: ${sc.reason}; cached-policy steps run in full`);
  const replica = await mountReplica(transport, {
    definition: DenoiserDefinition,
    grpcDefinition: DenoiserService,
    impl: denoiser.impl(),
    scope: denoiser.name,
    // The instance its answers name as the step cache's holder is the one direct calls reach.
    instance: denoiser.info.instanceId,
    drivers: { denoise: (source) => denoiser.attach(source) },
    queueSettings: opts.queueSettings,
    log: opts.log,
    onWorkEvent: (ev) => {
      if (ev.kind === 'redelivered') denoiser.metrics.redelivered.inc({ model: denoiser.name }, ev.calls);
      else denoiser.metrics.dropped.inc({ model: denoiser.name, reason: ev.reason }, ev.calls);
    },
    grpc: opts.grpc,
    maxRequestBytes: maxDenoiseRequestBytes(denoiser),
    dead: () => denoiser.dead,
    onDead: (fn) => denoiser.onDead(fn),
    close: () => denoiser.close(),
  });
  return { ...replica, denoiser };
}
