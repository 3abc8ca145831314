// A bounded, seeded fuzz test. Thousands of random and malformed request frames and field values
// go to the public gRPC API (Sampler), and hundreds of truncated, corrupted and oversized weight
// and model files to the loaders. In between, the service keeps returning the very same images;
// every answer is a clear status (never UNKNOWN or INTERNAL) and every bad file a typed error
// naming what is wrong; memory stays bounded. The internal NATS subjects: fuzz-nats.test.ts.
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Code } from '../../shared/errors.ts';
import type { GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import {
  GenerateRequest,
  type CachePolicy,
  type ClassLabel,
  type OutputFormat,
  type SamplerKind,
} from '../../shared/gen/ditpipe/v1/sampler.ts';
import { ModelDirError, readModelDir } from '../../shared/model/modeldir.ts';
import { openWeights, WeightsError } from '../../shared/weights/index.ts';
import { DIT_NAME, GOLDEN, testModels } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';
import { prng as rng } from '../../shared/prng.ts';

const SEED = 20_261_202;
const FRAMES = 2_400;
const FILES_PER_KIND = 150;

const dir = mkdtempSync(join(tmpdir(), 'ditpipe-fuzz-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('fuzzing the Sampler API', () => {
  let p: Pipeline;
  let client: grpc.Client;
  beforeAll(async () => {
    p = await startPipeline({
      transport: { kind: 'inproc' },
      scheduler: { maxImagesPerRequest: 4, maxSamplesInFlight: 64, defaultSteps: { ddpm: 2, ddim: 2, dpmpp: 2 } },
    });
    client = new grpc.Client(p.address, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': -1 });
  });
  afterAll(async () => {
    client?.close();
    await p?.stop();
  });

  const identity = (b: Buffer): Buffer => b;
  const METHODS = ['/ditpipe.v1.Sampler/Generate', '/ditpipe.v1.Sampler/GenerateStream', '/ditpipe.v1.Sampler/ListModels'];

  /** One raw call; resolves with the status code and details (0 for OK). */
  function call(method: string, body: Buffer): Promise<{ code: number; details: string }> {
    return new Promise((resolve) => {
      const deadline = new Date(Date.now() + 30_000);
      if (method.endsWith('GenerateStream')) {
        const s = client.makeServerStreamRequest(method, identity, identity, body, new grpc.Metadata(), { deadline });
        s.on('data', () => undefined);
        s.on('error', (e: grpc.ServiceError) => resolve({ code: e.code, details: e.details }));
        s.on('status', (st: grpc.StatusObject) => {
          if (st.code === grpc.status.OK) resolve({ code: 0, details: '' });
        });
      } else {
        client.makeUnaryRequest(method, identity, identity, body, new grpc.Metadata(), { deadline }, (err) =>
          resolve(err ? { code: err.code, details: err.details } : { code: 0, details: '' }),
        );
      }
    });
  }

  it(`answers ${FRAMES} random and malformed frames with clear statuses and keeps serving the same images`, async () => {
    const rand = rng(SEED);
    const int = (n: number): number => Math.floor(rand() * n);
    const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
    const ref = { model: DIT_NAME, classLabels: [{ index: 3 }, { name: 'seven' }], numSteps: 3, cfgScale: 4, seed: 77n };
    const expected = (await p.api.generate(ref)).images.map((i) => Buffer.from(i.png));
    const valid = Buffer.from(GenerateRequest.encode(GenerateRequest.fromPartial(ref)).finish());

    const label = (): ClassLabel =>
      pick<() => ClassLabel>([
        () => ({ index: int(12) - 1 }),
        () => ({ index: pick([-(2 ** 31), 2 ** 31 - 1, 10, 9]) }),
        () => ({ name: pick(['seven', 'SEVEN', 'nope', '', 'x'.repeat(int(400)), '\u{1F600}', 'three\0']) }),
        () => ({}),
      ])();
    /** A request with random field values (some valid, most not), encoded by the generated code. */
    const fieldValues = (): Buffer =>
      Buffer.from(
        GenerateRequest.encode({
          model: pick([DIT_NAME, DIT_NAME, '', 'nope', 'd'.repeat(int(5_000)), 'dit-tiny\n']),
          classLabels: Array.from({ length: pick([0, 1, 2, 4, 5, 64, 65, int(200)]) }, label),
          numSteps: pick([undefined, 0, -1, 1, 2, 3, 1001, 2 ** 31 - 1]),
          sampler: pick([0, 1, 2, 3, 4, -1, 999]) as SamplerKind,
          cfgScale: pick([undefined, 1, 4, 0.5, -1, Number.NaN, Number.POSITIVE_INFINITY, 1e308]),
          guidanceChannels: pick([0, 1, 2, 3, -7]) as GuidanceChannels,
          eta: pick([undefined, 0, 0.5, 1, 2, -0.1, Number.NaN]),
          seed: pick([undefined, 0n, 1n, 2n ** 64n - 1n]),
          outputFormat: pick([0, 1, 2, 3, -1]) as OutputFormat,
          cachePolicy: pick([0, 1, 2, 3, -1]) as CachePolicy,
        }).finish(),
      );
    const mutate = (b: Buffer): Buffer => {
      const out = Buffer.from(b);
      for (let k = 1 + int(4); k > 0; k--) out[int(out.length)] = int(256);
      return out;
    };
    const frame = (): Buffer =>
      pick<() => Buffer>([
        () => Buffer.from(Array.from({ length: int(300) }, () => int(256))),
        () => mutate(valid),
        () => valid.subarray(0, int(valid.length)),
        () => Buffer.concat([valid, Buffer.from(Array.from({ length: 1 + int(40) }, () => int(256)))]),
        () => Buffer.concat([Buffer.from([0x12, 0xff, 0xff, 0xff, 0x7f]), valid]), // a label claiming 256 MiB
        fieldValues,
        fieldValues,
        () => mutate(fieldValues()),
      ])();

    const codes = new Map<number, number>();
    const unclear: string[] = [];
    const rss0 = process.memoryUsage().rss;
    let rssPeak = rss0;
    for (let sent = 0; sent < FRAMES;) {
      const batch = Array.from({ length: 40 }, () => ({ method: int(10) === 0 ? METHODS[2] : pick(METHODS.slice(0, 2)), body: frame() }));
      sent += batch.length;
      const answers = await Promise.all(batch.map((b) => call(b.method, b.body)));
      answers.forEach((a, i) => {
        codes.set(a.code, (codes.get(a.code) ?? 0) + 1);
        const clear =
          a.code === 0 || (a.code !== Code.UNKNOWN && a.code !== Code.INTERNAL && a.details.length > 0 && a.details.length <= 1100);
        if (!clear && unclear.length < 5)
          unclear.push(`${batch[i].method} ${batch[i].body.toString('hex').slice(0, 80)} → ${a.code} ${a.details.slice(0, 200)}`);
      });
      rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
      if (sent % 400 === 0) {
        const res = await p.api.generate(ref);
        res.images.forEach((img, k) => expect(Buffer.from(img.png).equals(expected[k]), `image ${k} after ${sent} frames`).toBe(true));
      }
    }
    expect(unclear).toEqual([]);
    // Mostly refusals, but some random requests are valid and were served.
    expect(codes.get(Code.INVALID_ARGUMENT) ?? 0).toBeGreaterThan(FRAMES / 4);
    expect(codes.get(0) ?? 0).toBeGreaterThan(0);
    expect(
      [...codes.keys()].every((c) => [0, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED].includes(c as never)),
      JSON.stringify([...codes]),
    ).toBe(true);
    // Bounded: nothing a frame asks for is allocated before it is checked.
    expect(rssPeak - rss0).toBeLessThan(512 * 1024 * 1024);
    const final = await p.api.generate(ref);
    final.images.forEach((img, k) => expect(Buffer.from(img.png).equals(expected[k])).toBe(true));
  });
});

describe('fuzzing the model loaders', () => {
  const rand = rng(SEED + 1);
  const int = (n: number): number => Math.floor(rand() * n);
  const corrupt = (src: Buffer): Buffer => {
    const kind = int(5);
    if (kind === 0) return src.subarray(0, int(src.length)); // truncated
    if (kind === 1) return Buffer.concat([src, Buffer.alloc(1 + int(64), int(256))]); // trailing bytes
    const out = Buffer.from(src);
    if (kind === 2) {
      // a length field claims far more than there is
      const at = int(Math.min(64, out.length - 8));
      out.writeUInt32LE(0xffffff00 + int(255), at);
      return out;
    }
    for (let k = 1 + int(kind === 3 ? 3 : 40); k > 0; k--) out[int(out.length)] = int(256);
    return out;
  };

  /** Opens the file and reads every tensor; returns the error, or null when it all read fine. */
  function load(path: string): unknown {
    try {
      const f = openWeights(path);
      try {
        for (const n of f.names()) {
          if (/^[FB]/.test(f.info(n).dtype)) f.readF32(n);
          else f.readI64(n);
        }
      } finally {
        f.close();
      }
      return null;
    } catch (err) {
      return err;
    }
  }

  const sources: Array<[string, string]> = [
    ['safetensors', join(GOLDEN, 'dit/dit-tiny-p2/weights.safetensors')],
    ['torch zip (stored)', join(process.cwd(), 'test/fixtures/weights/train-layout.pt')],
    ['torch zip (deflated)', join(process.cwd(), 'test/fixtures/weights/deflated.pt')],
  ];

  it.each(sources)(`refuses ${FILES_PER_KIND} corrupted %s files with a WeightsError naming the file`, (_kind, src) => {
    const bytes = readFileSync(src);
    expect(load(src)).toBeNull();
    const odd: string[] = [];
    let refused = 0;
    for (let i = 0; i < FILES_PER_KIND; i++) {
      const path = join(dir, `w-${i}-${src.split('/').pop()}`);
      writeFileSync(path, corrupt(bytes));
      const err = load(path);
      if (err === null) continue; // a flip inside tensor data is still a valid file
      refused++;
      if (!(err instanceof WeightsError) || !err.message.includes(path))
        odd.push(`${path}: ${err instanceof Error ? String(err) : JSON.stringify(err)}`.slice(0, 300));
      rmSync(path);
    }
    expect(odd).toEqual([]);
    expect(refused).toBeGreaterThan(FILES_PER_KIND / 3);
  });

  it(`refuses ${FILES_PER_KIND} corrupted model directories (model.onnx, model.json) with a ModelDirError`, () => {
    const { ditDir } = testModels();
    const onnx = readFileSync(join(ditDir, 'model.onnx'));
    const json = readFileSync(join(ditDir, 'model.json'));
    const odd: string[] = [];
    let refused = 0;
    for (let i = 0; i < FILES_PER_KIND; i++) {
      const d = join(dir, `m-${i}`);
      cpSync(ditDir, d, { recursive: true });
      if (i % 3 === 2) writeFileSync(join(d, 'model.json'), corrupt(json));
      else writeFileSync(join(d, 'model.onnx'), corrupt(onnx));
      try {
        readModelDir(d);
      } catch (err) {
        refused++;
        if (!(err instanceof ModelDirError)) odd.push(`${d}: ${String(err)}`.slice(0, 300));
      }
      rmSync(d, { recursive: true, force: true });
    }
    expect(odd).toEqual([]);
    expect(refused).toBeGreaterThan(FILES_PER_KIND / 3);
  });
});
