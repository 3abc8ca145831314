// Faults of a deployed cluster (real nats-server with JetStream, every service its own process):
// a frozen replica, a slow one, killed replicas under load, a NATS restart that loses the queues.
// Replicas pull their work, so none of these may fail a request or change its bytes.
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { Code, type DitpipeError } from '../../shared/errors.ts';
import { SamplerKind, type GenerateRequest, type GenerateResponse } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { type Cluster, startCluster } from '../helpers/cluster.ts';
import { assertNoNatsServersRunning } from '../helpers/nats.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { liveServiceProcesses } from '../helpers/processes.ts';

/** The queues' default ack wait: a dead or frozen replica's work is redelivered after this. */
const ACK_WAIT_MS = 2_000;

const req = (seed: number, over: Partial<GenerateRequest> = {}): Partial<GenerateRequest> => ({
  model: DIT_NAME,
  classLabels: [{ index: seed % 10 }],
  sampler: SamplerKind.SAMPLER_KIND_DDIM,
  numSteps: 30,
  cfgScale: 4,
  seed: BigInt(seed),
  ...over,
});

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a).equals(b);

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});
afterAll(() => {
  assertNoNatsServersRunning();
  expect(liveServiceProcesses()).toBe(0);
});

interface Done {
  client: number;
  at: number;
  res?: GenerateResponse;
  err?: DitpipeError;
}

/** `clients` closed loops of requests (client i always asks for seed 100 + i) until `until()` says stop. */
async function load(c: Cluster, clients: number, until: () => boolean, over: Partial<GenerateRequest> = {}): Promise<Done[]> {
  const done: Done[] = [];
  await Promise.all(
    Array.from({ length: clients }, async (_, i) => {
      while (!until()) {
        try {
          const res = await c.api.generate(req(100 + i, over), { timeoutMs: 30_000 });
          done.push({ client: i, at: Date.now(), res });
        } catch (err) {
          done.push({ client: i, at: Date.now(), err: err as DitpipeError });
        }
      }
    }),
  );
  return done;
}

/** Longest time without a completion in [from, to]. */
function longestGap(done: Done[], from: number, to: number): number {
  const times = [
    from,
    ...done
      .map((d) => d.at)
      .filter((t) => t > from && t < to)
      .sort((a, b) => a - b),
    to,
  ];
  let gap = 0;
  for (let i = 1; i < times.length; i++) gap = Math.max(gap, times[i] - times[i - 1]);
  return gap;
}

describe('faults in a cluster of processes', () => {
  it('a frozen (SIGSTOPped) denoiser costs a request at most about one ack wait, not one per step', async () => {
    const c = (cluster = await startCluster());
    const timed = async (seed: number): Promise<number> => {
      const started = Date.now();
      const res = await c.api.generate(req(seed, { numSteps: 50 }), { timeoutMs: 60_000 });
      expect(res.images).toHaveLength(1);
      return Date.now() - started;
    };
    const healthy = [await timed(1), await timed(2), await timed(3)];
    const base = Math.max(...healthy);
    c.denoisers[1].proc.kill('SIGSTOP');
    try {
      // Right after the freeze, one step may be in the frozen replica's hands: it comes back after the ack wait.
      const first = await timed(4);
      expect(first).toBeLessThan(base + ACK_WAIT_MS + 3_000);
      // Its last pull has lapsed: from now on it takes nothing, and requests run at the healthy speed.
      const redelivered = await c.scrape(c.denoisers[0], 'ditpipe_denoiser_redelivered_steps_total');
      // For 11 s: the scheduler refreshes its model description (Info) every 5 s, and that must
      // not wait for the frozen replica either.
      const later: number[] = [];
      const until = Date.now() + 11_000;
      while (Date.now() < until) later.push(await timed(5 + later.length));
      for (const ms of later) expect(ms).toBeLessThan(base + 1_500);
      expect(await c.scrape(c.denoisers[0], 'ditpipe_denoiser_redelivered_steps_total')).toBe(redelivered);
    } finally {
      c.denoisers[1].proc.kill('SIGCONT');
    }
  });

  it('a denoiser 4× slower than the other takes about a quarter of the steps', async () => {
    // One step per pass (row budget 2 at cfg 4) and more requests than replicas: both stay busy, so
    // each takes steps as fast as it finishes passes.
    const c = (cluster = await startCluster({
      denoisers: [
        ['--simulate', '5+0', '--max-batch-rows', '2'],
        ['--simulate', '20+0', '--max-batch-rows', '2'],
      ],
    }));
    let stop = false;
    const running = load(c, 8, () => stop, { outputFormat: 2 });
    await new Promise((r) => setTimeout(r, 6_000));
    stop = true;
    const done = await running;
    expect(done.filter((d) => d.err)).toEqual([]);
    const steps = await Promise.all(c.denoisers.map((d) => c.scrape(d, 'ditpipe_denoiser_steps_total', /outcome="ok"/)));
    const [fast, slow] = steps;
    expect(fast + slow).toBeGreaterThan(200);
    // Pulled when free: shares follow speed (a queue group would split them evenly).
    expect(slow / fast).toBeGreaterThan(0.1);
    console.log(`steps fast ${fast} slow ${slow} ratio ${(slow / fast).toFixed(3)}`);
    expect(slow / fast).toBeLessThan(0.45);
  });

  it('SIGKILL of a denoiser, then of a decoder, under load: no request fails, completions resume, bytes unchanged', async () => {
    const c = (cluster = await startCluster({ decoders: 2 }));
    // The bytes each client's seed must give, from the healthy cluster.
    const ref = await Promise.all(Array.from({ length: 8 }, (_, i) => c.api.generate(req(100 + i), { timeoutMs: 30_000 })));
    let stop = false;
    const t0 = Date.now();
    const running = load(c, 8, () => stop);
    await new Promise((r) => setTimeout(r, 3_000));
    const killedDenoiser = Date.now();
    c.denoisers[0].proc.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 4_000));
    const killedDecoder = Date.now();
    c.decoders[0].proc.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 5_000));
    stop = true;
    const done = await running;
    const end = Date.now();
    expect(done.filter((d) => d.err).map((d) => d.err?.message)).toEqual([]);
    for (const d of done) expect(same(d.res!.images[0].png, ref[d.client].images[0].png)).toBe(true);
    expect(done.filter((d) => d.at > t0 && d.at < killedDenoiser).length).toBeGreaterThan(0);
    expect(done.filter((d) => d.at > killedDenoiser && d.at < killedDecoder).length).toBeGreaterThan(0);
    expect(done.filter((d) => d.at > killedDecoder).length).toBeGreaterThan(0);
    // The lost work comes back after about one ack wait (slack for a loaded test machine).
    const gapDenoiser = longestGap(done, killedDenoiser, killedDecoder);
    const gapDecoder = longestGap(done, killedDecoder, end);
    const timeline = done
      .map((d) => `${d.at - t0}${d.at > killedDecoder ? '(after decoder kill)' : ''}: client ${d.client} ${JSON.stringify(d.res?.timings)}`)
      .join('\n');
    const why = `denoiser kill at ${killedDenoiser - t0} ms, decoder kill at ${killedDecoder - t0} ms; redelivered steps ${await c.scrape(c.denoisers[1], 'ditpipe_denoiser_redelivered_steps_total')}, decodes ${await c.scrape(c.decoders[1], 'ditpipe_decoder_redelivered_decodes_total')}\n${timeline}`;
    console.log(`longest gap without a completion: ${gapDenoiser} ms after the denoiser kill, ${gapDecoder} ms after the decoder kill`);
    expect(gapDenoiser, why).toBeLessThan(ACK_WAIT_MS + 4_000);
    expect(gapDecoder, why).toBeLessThan(ACK_WAIT_MS + 4_000);
  });

  it('a 5 s NATS restart losing every queue fails no request in flight; during the outage new requests get UNAVAILABLE at once', async () => {
    const c = (cluster = await startCluster());
    const ref = await c.api.generate(req(7, { numSteps: 200 }), { timeoutMs: 30_000 });
    // 8 requests in flight (long enough to straddle the outage), each with a 30 s deadline.
    const inFlight = Array.from({ length: 8 }, () => c.api.generate(req(7, { numSteps: 200 }), { timeoutMs: 30_000 }));
    await new Promise((r) => setTimeout(r, 300));
    const restarted = c.restartNats(5_000);
    await new Promise((r) => setTimeout(r, 2_000));
    // Mid-outage: refused at once, not after the whole deadline.
    const started = Date.now();
    const err = await c.api.generate(req(8), { timeoutMs: 30_000 }).catch((e: unknown) => e as DitpipeError);
    expect((err as DitpipeError).code).toBe(Code.UNAVAILABLE);
    expect(Date.now() - started).toBeLessThan(1_000);
    await restarted;
    const results = await Promise.all(inFlight);
    for (const r of results) expect(same(r.images[0].png, ref.images[0].png)).toBe(true);
    // New requests succeed within seconds of the restart, nothing restarted but NATS.
    const back = Date.now();
    let ok: GenerateResponse | undefined;
    while (!ok && Date.now() - back < 15_000) {
      ok = await c.api.generate(req(9), { timeoutMs: 10_000 }).catch(() => undefined);
      if (!ok) await new Promise((r) => setTimeout(r, 200));
    }
    expect(ok?.images).toHaveLength(1);
    expect(Date.now() - back).toBeLessThan(10_000);
    expect(await c.scrape(c.scheduler, 'ditpipe_work_resent_messages_total')).toBeGreaterThan(0);
  });
});
