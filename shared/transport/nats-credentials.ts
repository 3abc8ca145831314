// Per-service NATS credentials: one nkey pair per ditpipe service (scheduler, denoiser, decoder),
// made with @nats-io/nkeys. The seed (secret) goes to the service as a file it alone reads (mode
// 0600); the server's config lists only the public keys, with each service's permissions
// (nats-permissions.ts). `ditpipe up` makes a fresh set per run; `ditpipe nats-config --nkeys`
// makes one for a deployment (k8s: the ditpipe-nats-nkeys Secret).
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createUser } from '@nats-io/nkeys';
import { NATS_SERVICES, type NatsService } from './nats-permissions.ts';

export interface ServiceNkey {
  service: NatsService;
  /** The public key (`U…`), for the server's config. */
  publicKey: string;
  /** The seed (`SU…`): the secret. */
  seed: string;
}

/** A fresh nkey pair for every service. */
export function makeServiceNkeys(): Record<NatsService, ServiceNkey> {
  const out = {} as Record<NatsService, ServiceNkey>;
  for (const service of NATS_SERVICES) {
    const kp = createUser();
    out[service] = { service, publicKey: kp.getPublicKey(), seed: new TextDecoder().decode(kp.getSeed()) };
    kp.clear();
  }
  return out;
}

/** Writes `<dir>/<service>.nk` (the seed, mode 0600; dir made mode 0700 if missing); returns each file's path. */
export function writeSeedFiles(dir: string, keys: Record<NatsService, ServiceNkey>): Record<NatsService, string> {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const out = {} as Record<NatsService, string>;
  for (const service of NATS_SERVICES) {
    const file = join(dir, `${service}.nk`);
    writeFileSync(file, `${keys[service].seed}\n`, { mode: 0o600 });
    chmodSync(file, 0o600); // also when the file was there already
    out[service] = file;
  }
  return out;
}
