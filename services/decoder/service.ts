// Starts a decoder replica on a transport (see shared/server/replica.ts for the shutdown order).
import { DecoderDefinition, DecoderService } from '../../shared/gen/ditpipe/v1/decoder.ts';
import type { DecoderMetrics } from '../../shared/metrics.ts';
import { mountReplica, type RunningReplica } from '../../shared/server/replica.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { DecoderConfig } from './config.ts';
import { Decoder } from './decoder.ts';

export async function startDecoderService(
  config: DecoderConfig,
  transport: Transport,
  opts: { grpcPort?: number | null; metrics?: DecoderMetrics; queueSettings?: Partial<QueueSettings> } = {},
): Promise<RunningReplica & { decoder: Decoder }> {
  const decoder = await Decoder.create(config, opts.metrics);
  const replica = await mountReplica(transport, {
    definition: DecoderDefinition,
    grpcDefinition: DecoderService,
    impl: decoder.impl(),
    scope: decoder.name,
    drivers: { decode: (source) => decoder.attach(source) },
    queueSettings: opts.queueSettings,
    onWorkEvent: (ev) => {
      if (ev.kind === 'redelivered') decoder.metrics.redelivered.inc({ model: decoder.name }, ev.calls);
      else decoder.metrics.dropped.inc({ model: decoder.name, reason: ev.reason }, ev.calls);
    },
    grpcPort: opts.grpcPort,
    close: () => decoder.close(),
  });
  return { ...replica, decoder };
}
