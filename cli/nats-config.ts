// `ditpipe nats-config`: the NATS side of ditpipe's least-privilege set-up for a deployment — the
// nats-server `authorization {}` block giving each service (scheduler, denoiser, decoder) its
// nkey and only its permissions (shared/transport/nats-permissions.ts), and fresh per-service
// nkeys as seed files or as the Kubernetes Secret k8s/base reads (rotate by applying a new one
// and restarting NATS and the services).
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { stringify } from 'yaml';
import { makeServiceNkeys, writeSeedFiles } from '../shared/transport/nats-credentials.ts';
import { NATS_SERVICES, natsAuthorization, type NatsService } from '../shared/transport/nats-permissions.ts';

/** The environment variable through which the k8s NATS pod gets a service's public nkey. */
export function nkeyVariable(service: NatsService): string {
  return `DITPIPE_NATS_${service.toUpperCase()}_NKEY`;
}

/** The authorization block of k8s/base/nats.yaml: public keys from the server's environment. */
export function k8sAuthorization(): string {
  return natsAuthorization(NATS_SERVICES.map((service) => ({ service, nkey: `$${nkeyVariable(service)}` })));
}

export const DEFAULT_SECRET = 'ditpipe-nats-nkeys';

export const command = new Command('nats-config')
  .description(
    'Print the nats-server authorization block that gives each ditpipe service its nkey and only its permissions; with --nkeys or --secret, make fresh per-service nkeys.',
  )
  .addOption(
    new Option(
      '--nkeys <dir>',
      "make fresh nkeys: write <dir>/<service>.nk (seed, mode 0600, for the service's --nats-nkey) and print the block with their public keys",
    ),
  )
  .addOption(
    new Option(
      '--secret',
      'make fresh nkeys and print them as the Kubernetes Secret k8s/base reads (seeds <service>.nk, public keys <service>.pub), for `kubectl apply -f -`',
    ),
  )
  .addOption(new Option('--secret-name <name>', 'name of that Secret').default(DEFAULT_SECRET))
  .action((o: { nkeys?: string; secret?: boolean; secretName: string }) => {
    if (o.nkeys && o.secret) throw new Error('give --nkeys or --secret, not both');
    if (o.secret) {
      const keys = makeServiceNkeys();
      const stringData: Record<string, string> = {};
      for (const s of NATS_SERVICES) {
        stringData[`${s}.nk`] = `${keys[s].seed}\n`;
        stringData[`${s}.pub`] = keys[s].publicKey;
      }
      const secret = {
        apiVersion: 'v1',
        kind: 'Secret',
        metadata: { name: o.secretName, labels: { 'app.kubernetes.io/name': 'ditpipe', 'app.kubernetes.io/part-of': 'ditpipe' } },
        type: 'Opaque',
        stringData,
      };
      process.stdout.write(`# NATS nkeys of the ditpipe services, made by \`ditpipe nats-config --secret\`.\n${stringify(secret)}`);
      return;
    }
    if (o.nkeys) {
      const keys = makeServiceNkeys();
      const files = writeSeedFiles(o.nkeys, keys);
      for (const s of NATS_SERVICES) writeFileSync(join(o.nkeys, `${s}.pub`), `${keys[s].publicKey}\n`);
      process.stderr.write(
        `seeds: ${NATS_SERVICES.map((s) => files[s]).join(', ')} (give each service its own with --nats-nkey / NATS_NKEY)\n`,
      );
      process.stdout.write(`${natsAuthorization(NATS_SERVICES.map((service) => ({ service, nkey: keys[service].publicKey })))}\n`);
      return;
    }
    process.stdout.write(
      `# Public nkeys come from the server's environment (${NATS_SERVICES.map(nkeyVariable).join(', ')}).\n${k8sAuthorization()}\n`,
    );
  });
