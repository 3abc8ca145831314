// Starts a decoder replica on a transport and, when the caller gives one, on its gRPC server (see
// shared/server/replica.ts for the shutdown order).
import { DecodeRequest, DecoderDefinition, DecoderService, ImageFormat } from '../../shared/gen/ditpipe/v1/decoder.ts';
import type { Logger } from '../../shared/log.ts';
import { zeroReplicaWorkSeries, type DecoderMetrics } from '../../shared/metrics.ts';
import type { GrpcServer } from '../../shared/server/grpc.ts';
import { mountReplica, type RunningReplica } from '../../shared/server/replica.ts';
import { f32Tensor } from '../../shared/tensor.ts';
import type { QueueSettings, Transport } from '../../shared/transport/types.ts';
import type { DecoderConfig } from './config.ts';
import { Decoder } from './decoder.ts';

/** Latent side assumed for the size limit when model.json gives none (a 512-pixel image at 8×). */
const DEFAULT_LATENT_SIZE = 64;

/** The largest DecodeRequest this replica accepts: a full batch of latents of the model's size. */
export function maxDecodeRequestBytes(d: Decoder): number {
  const c = d.meta.config;
  const side = c.latent_size ?? DEFAULT_LATENT_SIZE;
  const n = d.config.maxBatch * c.latent_channels * side * side;
  return DecodeRequest.encode({
    model: d.name,
    latents: f32Tensor([d.config.maxBatch, c.latent_channels, side, side], new Float32Array(n)),
    format: ImageFormat.IMAGE_FORMAT_RAW,
    requestId: 'x'.repeat(128),
  }).finish().byteLength;
}

export async function startDecoderService(
  config: DecoderConfig,
  transport: Transport,
  opts: { grpc?: GrpcServer | null; metrics?: DecoderMetrics; log?: Logger; queueSettings?: Partial<QueueSettings> } = {},
): Promise<RunningReplica & { decoder: Decoder }> {
  const decoder = await Decoder.create(config, opts.metrics);
  decoder.onDead((err) =>
    opts.log?.error({ err: err.message }, `${err.message}: this replica answers UNAVAILABLE and reports NOT_SERVING until it is restarted`),
  );
  zeroReplicaWorkSeries(decoder.metrics, decoder.name);
  const replica = await mountReplica(transport, {
    definition: DecoderDefinition,
    grpcDefinition: DecoderService,
    impl: decoder.impl(),
    scope: decoder.name,
    instance: decoder.info.instanceId,
    drivers: { decode: (source) => decoder.attach(source) },
    queueSettings: opts.queueSettings,
    log: opts.log,
    onWorkEvent: (ev) => {
      if (ev.kind === 'redelivered') decoder.metrics.redelivered.inc({ model: decoder.name }, ev.calls);
      else decoder.metrics.dropped.inc({ model: decoder.name, reason: ev.reason }, ev.calls);
    },
    grpc: opts.grpc,
    maxRequestBytes: maxDecodeRequestBytes(decoder),
    dead: () => decoder.dead,
    onDead: (fn) => decoder.onDead(fn),
    close: () => decoder.close(),
  });
  return { ...replica, decoder };
}
