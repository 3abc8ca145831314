// Who may do what on NATS: one least-privilege permission set per ditpipe service, derived from
// the service definitions and the subject scheme of rpc.ts and work.ts, so renaming a method or a
// subject changes the permissions with it. `ditpipe up` writes them into the nats-server config it
// starts (with an nkey per service), `ditpipe nats-config` prints them for Kubernetes
// (k8s/base/nats.yaml holds that output, and test/k8s checks it is current).
//
//   natsPermissions('denoiser')   // { publish: [...], subscribe: [...] }
//   natsAuthorization([{ service: 'scheduler', nkey: 'UA...' }, ...])   // an `authorization {}` block
//
// What each service does on NATS (prefix ditpipe.v1, `*` = any scope, i.e. model name):
//   scheduler  creates the work queues (JetStream streams and consumers) and reads their lag;
//              appends work to `<prefix>.denoiser.*.denoise` and `<prefix>.decoder.*.decode`
//              (stored-message acks come back on its inbox), sends direct calls to one replica
//              on `<work subject>.to.*` and cancel notices on `<work subject>.cancel`, asks Info
//              on `<prefix>.<replica>.*.info.all`; it reads only its own inbox
//              `_INBOX.scheduler.>` (answers, acks, Info replies).
//   denoiser   pulls from the consumer named `denoiser` ($JS.API.CONSUMER.MSG.NEXT.*.denoiser),
//   decoder    acknowledges its deliveries ($JS.ACK.*.denoiser.>), reads that consumer's info
//              (to wait for the scheduler to create the queue), listens for Info on
//              `<prefix>.denoiser.*.info.all`, for cancel notices and for direct calls on
//              `<work subject>.to.*` (any instance: a replica draws its id when it starts, so the
//              id is not known when the permissions are made; it may read its peers' direct
//              calls, work it may take from the queue anyway), and answers on the scheduler's
//              inbox; it reads only its own inbox `_INBOX.denoiser.>`.
// The load tester (`ditpipe loadtest`) and `ditpipe generate` talk gRPC to the scheduler only:
// they need no NATS credential.
// So a replica's credential cannot enqueue work, create or change streams, take another
// service's work, subscribe to another service's subjects or read anyone else's replies. A
// replica may publish to the scheduler's inbox (it must answer there): a compromised replica can
// answer steps with garbage, which no subject permission can prevent.
import { DecoderDefinition } from '../gen/ditpipe/v1/decoder.ts';
import { DenoiserDefinition } from '../gen/ditpipe/v1/denoiser.ts';
import { PermissionDeniedError } from '../errors.ts';
import { DEFAULT_PREFIX } from './rpc.ts';
import type { ServiceDefinition } from './types.ts';

export const NATS_SERVICES = ['scheduler', 'denoiser', 'decoder'] as const;
export type NatsService = (typeof NATS_SERVICES)[number];

/** The replica services and the definition each serves. */
const REPLICAS: Record<Exclude<NatsService, 'scheduler'>, ServiceDefinition> = {
  denoiser: DenoiserDefinition,
  decoder: DecoderDefinition,
};

export interface NatsPermissions {
  publish: string[];
  subscribe: string[];
}

/** The inbox prefix of a service's connection: its replies come only there. */
export function inboxPrefixOf(service: NatsService): string {
  return `_INBOX.${service}`;
}

/** The subjects a replica service's definition uses, `*` for the scope (rpc.ts and work.ts name them). */
function serviceSubjects(
  definition: ServiceDefinition,
  prefix: string,
): { work: string[]; cancel: string[]; direct: string[]; control: string[] } {
  const out = { work: [] as string[], cancel: [] as string[], direct: [] as string[], control: [] as string[] };
  for (const m of Object.values(definition.methods)) {
    if (m.requestStream || m.responseStream) continue;
    // methodSubject(): <prefix>.<service>.<scope>.<method>
    const subject = `${prefix}.${definition.name.toLowerCase()}.*.${m.name.toLowerCase()}`;
    const level = m.options.idempotencyLevel;
    if (level === 'IDEMPOTENT') {
      out.work.push(subject); // queueSpec(): the stream captures the method subject
      out.cancel.push(`${subject}.cancel`); // cancelSubject()
      // directSubject(): <work subject>.to.<replica instance>. Instances are random ids a replica
      // draws when it starts, unknown when the permissions are made: any instance, hence `*`.
      out.direct.push(`${subject}.to.*`);
    } else if (level === 'NO_SIDE_EFFECTS') {
      out.control.push(`${subject}.all`); // collectSubject(): every replica answers
    } else {
      out.control.push(subject); // a queue group answers
    }
  }
  return out;
}

/** The least-privilege permissions of one service (subject prefix `prefix`, default ditpipe.v1). */
export function natsPermissions(service: NatsService, prefix = DEFAULT_PREFIX): NatsPermissions {
  // Every JetStream client first asks for the account's JetStream info.
  const jsInfo = '$JS.API.INFO';
  if (service === 'scheduler') {
    const publish = [
      jsInfo,
      // The work queues: a stream per method and scope, one durable consumer each (NatsBus.ensureQueue), and their lag.
      '$JS.API.STREAM.INFO.*',
      '$JS.API.STREAM.CREATE.*',
      '$JS.API.STREAM.UPDATE.*',
      '$JS.API.CONSUMER.CREATE.*.*',
      '$JS.API.CONSUMER.DURABLE.CREATE.*.*',
      '$JS.API.CONSUMER.INFO.*.*',
    ];
    for (const def of Object.values(REPLICAS)) {
      const s = serviceSubjects(def, prefix);
      publish.push(...s.work, ...s.cancel, ...s.direct, ...s.control);
    }
    return { publish, subscribe: [`${inboxPrefixOf('scheduler')}.>`] };
  }
  const def = REPLICAS[service];
  const consumer = def.name.toLowerCase(); // queueSpec(): the consumer is named after the service
  const s = serviceSubjects(def, prefix);
  return {
    publish: [
      jsInfo,
      `$JS.API.CONSUMER.INFO.*.${consumer}`,
      `$JS.API.CONSUMER.MSG.NEXT.*.${consumer}`,
      // Acks of its deliveries: $JS.ACK.<stream>.<consumer>.… (and the layout with domain and account hash).
      `$JS.ACK.*.${consumer}.>`,
      `$JS.ACK.*.*.*.${consumer}.>`,
      // Answers (work results, Info replies) go to the caller's inbox.
      `${inboxPrefixOf('scheduler')}.>`,
    ],
    subscribe: [`${inboxPrefixOf(service)}.>`, ...s.control, ...s.cancel, ...s.direct],
  };
}

/** One user of the nats-server config: an nkey (public key, or a `$VARIABLE` the server reads from its environment) or a user and password. */
export type NatsUser = { service: NatsService } & ({ nkey: string } | { user: string; password: string });

const quote = (s: string): string => JSON.stringify(s);
/** A value as written in the config: `$NAME` unquoted (the server substitutes the variable), anything else quoted. */
const value = (s: string): string => (/^\$[A-Za-z_][A-Za-z0-9_]*$/.test(s) ? s : quote(s));

/** The nats-server `authorization { users = [...] }` block giving each user its service's permissions. */
export function natsAuthorization(users: NatsUser[], prefix = DEFAULT_PREFIX): string {
  const lines = ['authorization {', '  users = ['];
  for (const u of users) {
    const p = natsPermissions(u.service, prefix);
    const who = 'nkey' in u ? `nkey: ${value(u.nkey)}` : `user: ${quote(u.user)}, password: ${value(u.password)}`;
    lines.push(`    # ${u.service}`);
    lines.push(`    { ${who}, permissions: {`);
    lines.push(`        publish: { allow: [${p.publish.map(quote).join(', ')}] }`);
    lines.push(`        subscribe: { allow: [${p.subscribe.map(quote).join(', ')}] }`);
    lines.push('    } }');
  }
  lines.push('  ]', '}');
  return lines.join('\n');
}

/** A permission violation the server reported, in words that say what to fix. */
export function permissionDenied(
  err: { operation: string; subject: string; message: string },
  service: string | undefined,
): PermissionDeniedError {
  const op = err.operation === 'publish' ? 'publish' : 'subscription';
  const fix = service
    ? `this connection is the ${service}'s, and the ${service}'s permissions do not allow it; check that this process has the ${service}'s credential`
    : "this credential's permissions do not allow it; check that each service has its own credential";
  return new PermissionDeniedError(
    `NATS permission denied for ${op} on ${err.subject}: ${fix} (permissions: shared/transport/nats-permissions.ts)`,
    { cause: err },
  );
}
