// Entry point of the transport layer. Services take a `Transport` from their caller and never
// know whether NATS or the in-process bus carries their calls:
//
//   const transport = await openTransport(process.env.NATS_URL
//     ? { nats: { servers: process.env.NATS_URL, name: 'ditpipe-denoiser' } }
//     : { bus: sharedBus, name: 'denoiser' });
//
// API summary (details in each file's header):
//   types.ts   Transport, RpcServer, RpcClient<D>, ServiceImpl<D>, CallContext, CallOptions, ...
//   nats.ts    connectNats(opts), natsTransport(nc), serveOnNats(nc, def, impl, opts), natsClient(nc, def, opts)
//   inproc.ts  new InProcBus({ maxPayload }), bus.connect(name) → Transport
//   rpc.ts     subject scheme, wire headers, shared serve/client logic (Bus interface)
import { InProcBus } from './inproc.ts';
import { connectNats, type NatsConnectOptions, natsTransport } from './nats.ts';
import type { Transport } from './types.ts';

export * from './types.ts';
export { connectNats, NatsBus, natsClient, natsTransport, serveOnNats, type NatsConnectOptions } from './nats.ts';
export { InProcBus, type InProcBusOptions } from './inproc.ts';
export { collectSubject, DEFAULT_PREFIX, methodSubject } from './rpc.ts';

export type OpenTransportOptions =
  | { nats: NatsConnectOptions }
  | { bus: InProcBus; name?: string };

/** Connects to NATS (`{ nats }`) or joins an in-process bus (`{ bus }`). */
export async function openTransport(opts: OpenTransportOptions): Promise<Transport> {
  if ('nats' in opts) return natsTransport(await connectNats(opts.nats));
  return opts.bus.connect(opts.name);
}
