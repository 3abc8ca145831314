// Starts a denoiser replica on a transport (see shared/server/replica.ts for the shutdown order).
import { DenoiserDefinition, DenoiserService } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import type { DenoiserMetrics } from '../../shared/metrics.ts';
import { mountReplica, type RunningReplica } from '../../shared/server/replica.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { DenoiserConfig } from './config.ts';
import { Denoiser } from './denoiser.ts';

export async function startDenoiserService(
  config: DenoiserConfig,
  transport: Transport,
  opts: { grpcPort?: number | null; metrics?: DenoiserMetrics; queueSettings?: Partial<QueueSettings> } = {},
): Promise<RunningReplica & { denoiser: Denoiser }> {
  const denoiser = await Denoiser.create(config, opts.metrics);
  const replica = await mountReplica(transport, {
    definition: DenoiserDefinition,
    grpcDefinition: DenoiserService,
    impl: denoiser.impl(),
    scope: denoiser.name,
    drivers: { denoise: (source) => denoiser.attach(source) },
    queueSettings: opts.queueSettings,
    onWorkEvent: (ev) => {
      if (ev.kind === 'redelivered') denoiser.metrics.redelivered.inc({ model: denoiser.name }, ev.calls);
      else denoiser.metrics.dropped.inc({ model: denoiser.name, reason: ev.reason }, ev.calls);
    },
    grpcPort: opts.grpcPort,
    close: () => denoiser.close(),
  });
  return { ...replica, denoiser };
}
