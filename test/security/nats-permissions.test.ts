// Least privilege on NATS, against a real nats-server configured with an nkey per service and the
// permissions of shared/transport/nats-permissions.ts: the whole pipeline serves images under them
// (and the server logs no violation), a client without credentials is refused, and the denoiser's
// credential can do nothing but a denoiser's part: it cannot take or snoop on work as another
// service would, enqueue work, create streams, publish to the decoder's or scheduler's subjects,
// or read the scheduler's or decoder's replies.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { headers as natsHeaders, type MsgHdrs, type NatsConnection, PermissionViolationError } from '@nats-io/transport-node';
import { jetstreamManager, RetentionPolicy, StorageType } from '@nats-io/jetstream';
import { PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError } from '../../shared/errors.ts';
import { DenoiseRequest, DenoiserDefinition, DenoiserInfo, DenoiseResponse } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { connectNats, natsTransport } from '../../shared/transport/nats.ts';
import { makeServiceNkeys, type ServiceNkey, writeSeedFiles } from '../../shared/transport/nats-credentials.ts';
import { NATS_SERVICES, type NatsService } from '../../shared/transport/nats-permissions.ts';
import { DIT_NAME, testModels, VAE_NAME } from '../helpers/models.ts';
import { assertNoNatsServersRunning, type NatsServerHandle, startNatsServer } from '../helpers/nats.ts';
import { type Pipeline, startPipeline } from '../helpers/pipeline.ts';

const BIN = resolve(import.meta.dirname, '../../bin/ditpipe.js');
let nats: NatsServerHandle;
let dir: string;
let seeds: Record<NatsService, string>;
let keys: Record<NatsService, ServiceNkey>;
let pipeline: Pipeline;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'ditpipe-nkeys-'));
  keys = makeServiceNkeys();
  seeds = writeSeedFiles(dir, keys);
  nats = await startNatsServer({ auth: { users: NATS_SERVICES.map((service) => ({ service, nkey: keys[service].publicKey })) } });
  pipeline = await startPipeline({ transport: { kind: 'nats', url: nats.url, connect: (service) => ({ nkeyFile: seeds[service] }) } });
}, 60_000);

afterAll(async () => {
  await pipeline?.stop();
  await nats?.stop();
  assertNoNatsServersRunning();
  rmSync(dir, { recursive: true, force: true });
});

/** The permission violations the server reports to a connection, as they come. */
function violations(nc: NatsConnection): PermissionViolationError[] {
  const seen: PermissionViolationError[] = [];
  void (async () => {
    for await (const s of nc.status()) if (s.type === 'error' && s.error instanceof PermissionViolationError) seen.push(s.error);
  })();
  return seen;
}

const denoiserStream = `ditpipe_v1_denoiser_${DIT_NAME}`;
const decoderStream = `ditpipe_v1_decoder_${VAE_NAME}`;

describe('NATS permissions per service', () => {
  it('the pipeline serves images with each service on its own credential, and the server logs no violation', async () => {
    const res = await pipeline.api.generate({ model: DIT_NAME, classLabels: [{ index: 1 }, { index: 2 }], numSteps: 4, seed: 5n });
    expect(res.images).toHaveLength(2);
    for (const img of res.images) expect(img.png.length).toBeGreaterThan(100);
    expect(nats.log()).not.toMatch(/Violation/);
  }, 60_000);

  it('refuses a client with no credentials or an unknown nkey', async () => {
    const none = await connectNats({ servers: nats.url }).catch((e: unknown) => e);
    expect(none).toBeInstanceOf(UnauthenticatedError);
    expect((none as Error).message).toContain(`NATS at ${nats.url} refused the credentials`);
    const strangerDir = mkdtempSync(join(tmpdir(), 'ditpipe-nkeys-stranger-'));
    try {
      const stranger = writeSeedFiles(strangerDir, makeServiceNkeys());
      await expect(connectNats({ servers: nats.url, nkeyFile: stranger.denoiser })).rejects.toBeInstanceOf(UnauthenticatedError);
    } finally {
      rmSync(strangerDir, { recursive: true, force: true });
    }
  });

  it("the denoiser's credential cannot subscribe to other services' work, subjects or replies", async () => {
    const nc = await connectNats({ servers: nats.url, nkeyFile: seeds.denoiser, service: 'denoiser', name: 'intruder-sub' });
    const seen = violations(nc);
    try {
      const denied = [
        // Snooping on the work as it is enqueued (the scheduler's publishes) or on the decoder's.
        `ditpipe.v1.denoiser.${DIT_NAME}.denoise`,
        `ditpipe.v1.decoder.${VAE_NAME}.decode`,
        `ditpipe.v1.decoder.${VAE_NAME}.info.all`,
        // Direct calls to the decoder's replicas.
        `ditpipe.v1.decoder.${VAE_NAME}.decode.to.x`,
        // Replies to the scheduler (answers, Info) and to the decoder (its pulls).
        '_INBOX.scheduler.>',
        '_INBOX.decoder.>',
        '_INBOX.>',
        '>',
      ];
      const errors = new Map<string, Error>();
      for (const subject of denied)
        nc.subscribe(subject, {
          callback: (err) => {
            if (err) errors.set(subject, err);
          },
        });
      await nc.flush();
      await expect
        .poll(
          () =>
            seen
              .filter((e) => e.operation === 'subscription')
              .map((e) => e.subject)
              .sort(),
          { timeout: 5_000 },
        )
        .toEqual([...denied].sort());
      for (const subject of denied) expect(errors.get(subject), subject).toBeInstanceOf(PermissionViolationError);
      // What a denoiser needs is allowed.
      nc.subscribe(`ditpipe.v1.denoiser.${DIT_NAME}.info.all`);
      nc.subscribe(`ditpipe.v1.denoiser.${DIT_NAME}.denoise.to.x`);
      nc.subscribe('_INBOX.denoiser.x.>');
      await nc.flush();
      await new Promise((r) => setTimeout(r, 200));
      expect(seen).toHaveLength(denied.length);
    } finally {
      await nc.close();
    }
  });

  it("the denoiser's credential cannot enqueue work, take the decoder's, create streams or publish to the scheduler's or decoder's subjects", async () => {
    const nc = await connectNats({ servers: nats.url, nkeyFile: seeds.denoiser, service: 'denoiser', name: 'intruder-pub' });
    const seen = violations(nc);
    const t = natsTransport(nc);
    try {
      // Enqueueing Denoise work through the normal client: refused at once, naming the credential.
      const client = t.client(DenoiserDefinition, { scope: DIT_NAME, timeoutMs: 10_000 });
      const err = await client.denoise(DenoiseRequest.create({ model: DIT_NAME, t: [1n], y: [0] })).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PermissionDeniedError);
      expect((err as Error).message).toBe(
        `NATS permission denied for publish on ditpipe.v1.denoiser.${DIT_NAME}.denoise: this connection is the denoiser's, and the denoiser's permissions do not allow it; check that this process has the denoiser's credential (permissions: shared/transport/nats-permissions.ts)`,
      );
      const denied = [
        `ditpipe.v1.decoder.${VAE_NAME}.decode`,
        `ditpipe.v1.decoder.${VAE_NAME}.decode.cancel`,
        `ditpipe.v1.denoiser.${DIT_NAME}.denoise.cancel`,
        // Direct calls are the scheduler's to send, as is all work.
        `ditpipe.v1.denoiser.${DIT_NAME}.denoise.to.x`,
        `ditpipe.v1.decoder.${VAE_NAME}.info.all`,
        `$JS.API.CONSUMER.MSG.NEXT.${decoderStream}.decoder`,
        `$JS.ACK.${decoderStream}.decoder.1.1.1.1.0`,
        `$JS.API.STREAM.UPDATE.${denoiserStream}`,
        `$JS.API.STREAM.DELETE.${denoiserStream}`,
        `$JS.API.STREAM.PURGE.${denoiserStream}`,
        `$JS.API.CONSUMER.DELETE.${denoiserStream}.denoiser`,
        '_INBOX.decoder.x.1',
      ];
      for (const subject of denied) nc.publish(subject, new Uint8Array([1]));
      await nc.flush();
      // A stream capturing the scheduler's inbox would copy its replies: creating streams is the scheduler's alone.
      const jsm = await jetstreamManager(nc);
      await expect(
        jsm.streams.add({
          name: 'snoop',
          subjects: ['_INBOX.scheduler.>'],
          retention: RetentionPolicy.Limits,
          storage: StorageType.Memory,
        }),
      ).rejects.toThrow(/permission/i);
      const expected = [`ditpipe.v1.denoiser.${DIT_NAME}.denoise`, ...denied, '$JS.API.STREAM.CREATE.snoop'].sort();
      await expect
        .poll(() => [...new Set(seen.filter((e) => e.operation === 'publish').map((e) => e.subject))].sort(), { timeout: 5_000 })
        .toEqual(expected);
      expect(nats.log()).toMatch(/Publish Violation - Nkey "[A-Z0-9]+", Subject "ditpipe\.v1\.decoder\./);
      // The pipeline is unharmed.
      const res = await pipeline.api.generate({ model: DIT_NAME, classLabels: [{ index: 3 }], numSteps: 3, seed: 9n });
      expect(res.images).toHaveLength(1);
    } finally {
      await t.close({ graceMs: 500 });
    }
  }, 60_000);
});

describe("a service given another service's credential", () => {
  it('exits 1 at start, naming what was refused and whose credential it needs', () => {
    const { ditDir } = testModels();
    const r = spawnSync(
      process.execPath,
      [
        BIN,
        'denoiser',
        '--nats-url',
        nats.url,
        '--model-dir',
        ditDir,
        '--grpc-port',
        '-1',
        '--metrics-port',
        '-1',
        '--nats-connect-timeout',
        '5000',
      ],
      {
        encoding: 'utf8',
        timeout: 90_000,
        env: { ...process.env, NATS_NKEY: seeds.scheduler },
      },
    );
    const out = `${r.stdout}${r.stderr}`;
    expect(r.status, out).toBe(1);
    expect(out).toMatch(
      /NATS permission denied for subscription on _INBOX\.denoiser\.[^:]+: this connection is the denoiser's, and the denoiser's permissions do not allow it; check that this process has the denoiser's credential/,
    );
    // The error it exits with says the same, not the client library's raw words.
    expect(out).not.toMatch(/Permissions Violation/);
    expect(out).not.toMatch(/\n\s+at /);
  }, 120_000);
});

describe('work queues are bounded, whoever sends', () => {
  it('a flood of the work subject is refused once the queue is full, clearly, and real calls succeed afterwards', async () => {
    const scope = 'flood';
    const settings = { maxMessages: 20, maxBytes: 1024 * 1024, ackWaitMs: 1_000 };
    const replica = natsTransport(
      await connectNats({ servers: nats.url, nkeyFile: seeds.denoiser, service: 'denoiser', name: 'flood-replica' }),
    );
    const scheduler = natsTransport(
      await connectNats({ servers: nats.url, nkeyFile: seeds.scheduler, service: 'scheduler', name: 'flood-scheduler' }),
    );
    // Only the scheduler's credential may publish work at all (above); flood with it, as a runaway scheduler would.
    const raw = await connectNats({ servers: nats.url, nkeyFile: seeds.scheduler, service: 'scheduler', name: 'flood-raw' });
    let open = (): void => undefined;
    const gate = new Promise<void>((r) => (open = r));
    let served = 0;
    try {
      await replica.serve(
        DenoiserDefinition,
        {
          denoise: async () => {
            await gate;
            served++;
            return DenoiseResponse.create({ batchRows: 1 });
          },
          info: () => DenoiserInfo.create({ model: scope }),
        },
        { scope, queueSettings: settings },
      );
      const client = scheduler.client(DenoiserDefinition, { scope, queueSettings: settings, timeoutMs: 30_000 });
      // The replica holds one call (gated): it stays in the queue until answered, with 19 more
      // waiting, which makes the 20 the queue may hold; the rest are refused.
      const first = client.denoise(step).then(
        () => 'ok',
        (e: unknown) => e,
      );
      await expect.poll(() => client.queueOf('denoise').info(), { timeout: 10_000 }).toMatchObject({ pending: 0, ackPending: 1 });
      const calls = [
        first,
        ...Array.from({ length: 59 }, () =>
          client.denoise(step).then(
            () => 'ok',
            (e: unknown) => e,
          ),
        ),
      ];
      const refused: unknown[] = await Promise.race([
        Promise.all(calls.slice(20)),
        new Promise<never>((_, r) => setTimeout(() => r(new Error('refusals did not come')), 10_000)),
      ]);
      for (const e of refused) {
        expect(e).toBeInstanceOf(ResourceExhaustedError);
        expect((e as Error).message).toBe(
          `work queue for ditpipe.v1.denoiser.${scope}.denoise is full (maximum messages exceeded); retry later`,
        );
      }
      // Raw messages straight onto the subject meet the same wall.
      const answers = await Promise.all(
        Array.from({ length: 10 }, (_, i) =>
          raw.request(`ditpipe.v1.denoiser.${scope}.denoise`, new Uint8Array([0x0a, 0x00]), { timeout: 5_000, headers: msgId(`raw-${i}`) }),
        ),
      );
      for (const a of answers) expect(new TextDecoder().decode(a.data)).toMatch(/"description":"maximum messages exceeded"/);
      open();
      const done = await Promise.all(calls.slice(0, 20));
      expect(done.filter((d) => d === 'ok').length).toBe(20);
      // The queue drained: new calls are served.
      expect((await client.denoise(step)).batchRows).toBe(1);
      expect(served).toBe(21);
    } finally {
      open();
      await raw.close();
      await Promise.all([replica.close({ graceMs: 500 }), scheduler.close({ graceMs: 500 })]);
    }
  }, 60_000);
});

// Every other field at its default, so a new DenoiseRequest field needs no edit here.
const step = DenoiseRequest.create({ model: 'm', t: [1n], y: [0] });

function msgId(id: string): MsgHdrs {
  const h = natsHeaders();
  h.set('Nats-Msg-Id', id);
  return h;
}
