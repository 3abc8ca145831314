// Tests start real nats-servers through the same code as `ditpipe up`.
export * from '../../shared/transport/nats-server.ts';
