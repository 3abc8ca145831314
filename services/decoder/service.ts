// Starts a decoder replica on a transport (see shared/server/replica.ts for the shutdown order).
import { DecoderDefinition, DecoderService } from '../../shared/gen/ditpipe/v1/decoder.ts';
import type { DecoderMetrics } from '../../shared/metrics.ts';
import { mountReplica, type RunningReplica } from '../../shared/server/replica.ts';
import type { Transport } from '../../shared/transport/types.ts';
import type { DecoderConfig } from './config.ts';
import { Decoder } from './decoder.ts';

export async function startDecoderService(
  config: DecoderConfig,
  transport: Transport,
  opts: { grpcPort?: number | null; metrics?: DecoderMetrics } = {},
): Promise<RunningReplica & { decoder: Decoder }> {
  const decoder = await Decoder.create(config, opts.metrics);
  const replica = await mountReplica(transport, {
    definition: DecoderDefinition,
    grpcDefinition: DecoderService,
    impl: decoder.impl(),
    scope: decoder.name,
    grpcPort: opts.grpcPort,
    close: () => decoder.close(),
  });
  return { ...replica, decoder };
}
