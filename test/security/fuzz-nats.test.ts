// A bounded, seeded fuzz test of the internal NATS subjects: whoever can publish there (a
// misconfigured or compromised client; the permissions allow only the scheduler) sends random
// bytes, malformed work envelopes and requests with random field values to the denoiser's and the
// decoder's work queues, their cancel subjects and their Info subjects, with random headers. The
// replicas keep serving the very same images in between, every answer they send back is a clear
// status (never UNKNOWN or INTERNAL, a message that says what is wrong), and memory stays bounded.
import type { NatsConnection } from '@nats-io/transport-node';
import { headers as natsHeaders } from '@nats-io/transport-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Code } from '../../shared/errors.ts';
import type { GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import { DecodeRequest, type ImageFormat } from '../../shared/gen/ditpipe/v1/decoder.ts';
import { DenoiseRequest } from '../../shared/gen/ditpipe/v1/denoiser.ts';
import { WorkBatch, WorkCancel, WorkResults } from '../../shared/gen/ditpipe/v1/work.ts';
import { f32Tensor } from '../../shared/tensor.ts';
import { connectNats } from '../../shared/transport/nats.ts';
import { DIT_NAME, VAE_NAME } from '../helpers/models.ts';
import { type NatsServerHandle, startNatsServer } from '../helpers/nats.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';
import { prng as rng } from '../../shared/prng.ts';

const SEED = 20_261_203;
const MESSAGES = 3_000;
const DENOISE = `ditpipe.v1.denoiser.${DIT_NAME}.denoise`;
const DECODE = `ditpipe.v1.decoder.${VAE_NAME}.decode`;
const REPLY = 'fuzz.replies';

let nats: NatsServerHandle;
let p: Pipeline;
let raw: NatsConnection;

beforeAll(async () => {
  nats = await startNatsServer();
  p = await startPipeline({ transport: { kind: 'nats', url: nats.url } });
  raw = await connectNats({ servers: nats.url, name: 'fuzzer' });
}, 60_000);

afterAll(async () => {
  await raw?.close();
  await p?.stop();
  await nats?.stop();
});

describe('fuzzing the internal NATS subjects', () => {
  it(`answers ${MESSAGES} random and malformed work messages with clear statuses and keeps serving the same images`, async () => {
    const rand = rng(SEED);
    const int = (n: number): number => Math.floor(rand() * n);
    const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
    const bytes = (n: number): Uint8Array => Uint8Array.from({ length: n }, () => int(256));
    const ref = { model: DIT_NAME, classLabels: [{ index: 3 }, { index: 7 }], numSteps: 3, cfgScale: 4, seed: 91n };
    const expected = (await p.api.generate(ref)).images.map((i) => Buffer.from(i.png));

    const floats = (n: number): Float32Array =>
      Float32Array.from({ length: n }, () => pick([0, 1, -1, rand() * 8 - 4, Number.NaN, Number.POSITIVE_INFINITY, 3e38]));
    /** A latent-like tensor: mostly the model's shape [N, 4, 8, 8], sometimes not, data sometimes short. */
    const tensor = (rows: number) => {
      const shape = pick([
        [rows, 4, 8, 8],
        [rows, 4, 8, 8],
        [rows, 4, 8],
        [rows, 3, 8, 8],
        [rows, 4, 16, 16],
        [0, 4, 8, 8],
        [rows, 4, 8, 8, 1],
        [],
      ]);
      const n = shape.reduce((a, b) => a * b, 1);
      const t = f32Tensor(shape, floats(pick([n, n, Math.max(0, n - 1), n + 3, 0])));
      return pick([t, t, t, { ...t, dtype: int(5) }, undefined]);
    };
    const denoiseRequest = (): Uint8Array => {
      const rows = pick([1, 1, 2, 3, 0, 70]);
      return DenoiseRequest.encode({
        model: pick([DIT_NAME, DIT_NAME, DIT_NAME, '', 'nope', 'm'.repeat(int(3_000))]),
        x: tensor(rows),
        t: Array.from({ length: pick([rows, rows, rows + 1, 0]) }, () => BigInt(pick([0, 500, 999, -1, 1000, 2 ** 40]))),
        y: Array.from({ length: pick([rows, rows, rows - 1]) }, () => pick([0, 3, 9, 10, -1, 2 ** 31 - 1])),
        cfgScale: pick([undefined, 1, 4, 0.5, -1, Number.NaN, Number.POSITIVE_INFINITY]),
        guidanceChannels: pick([0, 1, 2, 3, -7]) as GuidanceChannels,
        requestId: pick(['', 'r', '\u{1F600}'.repeat(int(200))]),
        stepIndex: pick([0, 1, 2 ** 32 - 1]),
        omitVariance: rand() < 0.5,
        cacheKey: '',
        numSteps: 0,
      }).finish();
    };
    const decodeRequest = (): Uint8Array =>
      DecodeRequest.encode({
        model: pick([VAE_NAME, VAE_NAME, VAE_NAME, '', 'nope']),
        latents: tensor(pick([1, 2, 0, 65])),
        format: pick([0, 1, 2, 9, -1]) as ImageFormat,
        requestId: pick(['', 'r']),
      }).finish();
    const mutate = (b: Uint8Array): Uint8Array => {
      const out = Uint8Array.from(b);
      for (let k = 1 + int(4); k > 0 && out.length > 0; k--) out[int(out.length)] = int(256);
      return out;
    };
    /** The work envelope (WorkBatch of WorkItems) around requests, or something that only looks like one. */
    const body = (request: () => Uint8Array): Uint8Array =>
      pick<() => Uint8Array>([
        () => bytes(int(300)),
        () =>
          WorkBatch.encode({
            items: [{ id: BigInt(int(1e6)), deadlineMs: BigInt(Date.now() + 10_000), request: bytes(int(200)) }],
          }).finish(),
        () =>
          WorkBatch.encode({
            items: Array.from({ length: pick([1, 1, 2, 5, 0]) }, () => ({
              id: BigInt(pick([0, 1, int(1e9)])),
              deadlineMs: BigInt(pick([0, Date.now() + 10_000, Date.now() - 10_000, 2 ** 53])),
              request: pick([request, request, () => mutate(request())])(),
            })),
          }).finish(),
        () => mutate(WorkBatch.encode({ items: [{ id: 5n, deadlineMs: 0n, request: request() }] }).finish()),
        () => Uint8Array.from([0x0a, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3]), // an item claiming 256 MiB
      ])();
    const headers = (n: number) => {
      const h = natsHeaders();
      const reply = pick([`${REPLY}.${n}`, `${REPLY}.${n}`, `${REPLY}.${n}`, '', 'has space', 'x'.repeat(300), undefined]);
      if (reply !== undefined) h.set('Ditpipe-Reply', reply);
      const timeout = pick(['5000', '5000', '0', '-1', 'abc', '1e308', undefined]);
      if (timeout !== undefined) h.set('Ditpipe-Timeout-Ms', timeout);
      h.set('Nats-Msg-Id', `fuzz-${SEED}-${n}`);
      return h;
    };

    const results: { code: number; message: string }[] = [];
    const undecodable: string[] = [];
    const sub = raw.subscribe(`${REPLY}.>`, {
      callback: (_err, m) => {
        try {
          for (const r of WorkResults.decode(m.data).results) results.push({ code: r.code, message: r.message });
        } catch (e) {
          undecodable.push((e as Error).message);
        }
      },
    });
    let infoAnswers = 0;
    // e.g. a TimeoutOverflowWarning: a deadline from the wire given to setTimeout unchecked.
    const warnings: string[] = [];
    const onWarning = (w: Error): void => void warnings.push(`${w.name}: ${w.message}`);
    process.on('warning', onWarning);
    const rss0 = process.memoryUsage().rss;
    let rssPeak = rss0;
    for (let sent = 0; sent < MESSAGES;) {
      for (let k = 0; k < 50; k++, sent++) {
        const what = int(10);
        if (what < 5) raw.publish(DENOISE, body(denoiseRequest), { headers: headers(sent) });
        else if (what < 8) raw.publish(DECODE, body(decodeRequest), { headers: headers(sent) });
        else if (what === 8) {
          const cancel =
            rand() < 0.5
              ? bytes(int(100))
              : WorkCancel.encode({ reply: pick([`${REPLY}.${sent}`, '', 'x']), ids: [BigInt(int(100))] }).finish();
          raw.publish(`${pick([DENOISE, DECODE])}.cancel`, cancel);
        } else {
          // Info is a plain request/reply every replica answers: garbage in, an answer (or an error reply) out.
          infoAnswers += await raw
            .request(`${pick([DENOISE, DECODE]).replace(/\.(denoise|decode)$/, '.info')}.all`, bytes(int(64)), { timeout: 5_000 })
            .then(
              () => 1,
              () => 0,
            );
        }
      }
      await raw.flush();
      rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
      if (sent % 1_000 === 0) {
        const res = await p.api.generate(ref, { timeoutMs: 60_000 });
        res.images.forEach((img, i) => expect(Buffer.from(img.png).equals(expected[i]), `image ${i} after ${sent} messages`).toBe(true));
      }
    }
    // Everything queued is taken and answered or dropped; then the pipeline still gives the same bytes.
    const pending = async (): Promise<number> => {
      let n = 0;
      for (const q of [`ditpipe_v1_denoiser_${DIT_NAME}.denoiser`, `ditpipe_v1_decoder_${VAE_NAME}.decoder`]) {
        const reply = await raw.request(`$JS.API.CONSUMER.INFO.${q}`, new Uint8Array(0), { timeout: 5_000 });
        const info = JSON.parse(new TextDecoder().decode(reply.data)) as { num_pending: number; num_ack_pending: number };
        n += info.num_pending + info.num_ack_pending;
      }
      return n;
    };
    await expect.poll(pending, { timeout: 60_000, interval: 250 }).toBe(0);
    const after = await p.api.generate(ref, { timeoutMs: 60_000 });
    after.images.forEach((img, i) => expect(Buffer.from(img.png).equals(expected[i]), `image ${i} at the end`).toBe(true));
    sub.unsubscribe();
    process.off('warning', onWarning);

    const codes = new Map<number, number>();
    for (const r of results) codes.set(r.code, (codes.get(r.code) ?? 0) + 1);
    const unclear = results.filter(
      (r) => r.code === Code.UNKNOWN || r.code === Code.INTERNAL || (r.code !== 0 && (r.message.length === 0 || r.message.length > 1100)),
    );
    console.log(
      `answers by code ${JSON.stringify([...codes].sort((a, b) => a[0] - b[0]))}; info answers ${infoAnswers}; rss +${Math.round((rssPeak - rss0) / 2 ** 20)} MiB`,
    );
    expect(undecodable).toEqual([]);
    expect(warnings.slice(0, 3)).toEqual([]);
    expect(unclear.slice(0, 5).map((r) => ({ code: r.code, length: r.message.length, message: r.message.slice(0, 160) }))).toEqual([]);
    // Invalid work gets told so: the fuzz made many answerable malformed requests.
    expect(codes.get(Code.INVALID_ARGUMENT) ?? 0).toBeGreaterThan(50);
    expect(infoAnswers).toBeGreaterThan(0);
    expect(rssPeak - rss0).toBeLessThan(768 * 2 ** 20);
  }, 300_000);
});
