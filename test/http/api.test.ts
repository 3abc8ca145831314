// The scheduler's HTTP API against the real pipeline (denoiser and decoder on onnxruntime, the
// tiny golden models): the official `openai` npm client generates images and lists models, the
// error table matches the gRPC API's field by field, server-sent events come in order with
// previews, and a client that disconnects stops step dispatch (seen in the scheduler's metrics).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import type { ImageGenerateParamsNonStreaming, ImageGenerateParamsStreaming } from 'openai/resources/images';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bearerTokens } from '../../services/scheduler/http/auth.ts';
import { TokenSet } from '../../shared/server/auth.ts';
import { httpParam } from '../../services/scheduler/http/errors.ts';
import { Code, type InvalidArgumentError } from '../../shared/errors.ts';
import { decodePng } from '../../shared/image/png.ts';
import { GuidanceChannels } from '../../shared/gen/ditpipe/v1/common.ts';
import { PreviewMethod, SamplerKind, type GenerateEvent, type GenerateRequest } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { CLASS_NAMES, DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';
import { failureOf } from '../helpers/failure.ts';

interface Answer {
  status: number;
  headers: IncomingMessage['headers'];
  text: string;
  json: () => any; // eslint-disable-line @typescript-eslint/no-explicit-any
}

/** One HTTP(S) request with node's own client (fetch cannot take a private CA). */
function call(url: string, opts: { method?: string; body?: string; headers?: Record<string, string>; ca?: Buffer } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const send = url.startsWith('https:') ? httpsRequest : httpRequest;
    const req = send(
      url,
      { method: opts.method ?? 'GET', headers: { 'content-type': 'application/json', ...opts.headers }, ca: opts.ca },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json: () => JSON.parse(text) });
        });
      },
    );
    req.on('error', reject);
    req.end(opts.body);
  });
}

const post = (base: string, body: unknown): Promise<Answer> =>
  call(`${base}/v1/images/generations`, { method: 'POST', body: JSON.stringify(body) });

/** Sum of a scheduler metric's series (of `series`, e.g. "ditpipe_request_seconds_count", for histograms) matching the labels. */
async function metric(
  p: Pipeline,
  name: string,
  match: Record<string, string> = {},
  series = name,
  registry = p.schedulerMetrics.registry,
): Promise<number> {
  const text = await registry.getSingleMetricAsString(name);
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const [key, value] = [line.slice(0, line.lastIndexOf(' ')), line.slice(line.lastIndexOf(' ') + 1)];
    if (key.split('{')[0] !== series) continue;
    if (Object.entries(match).every(([k, v]) => key.includes(`${k}="${v}"`))) sum += Number(value);
  }
  return sum;
}

/**
 * The events of a server-sent-events body. `data` is whatever JSON the server sent, typed `any` on
 * purpose: the tests read it field by field and their assertions are what check its shape.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
function sse(text: string): Array<{ event: string; data: any }> {
  return text
    .split('\n\n')
    .filter((b) => b.includes('data:'))
    .map((b) => {
      const event = /^event: (.*)$/m.exec(b)?.[1] ?? 'message';
      const data = JSON.parse(/^data: (.*)$/m.exec(b)![1]) as unknown;
      return { event, data };
    });
}

let p: Pipeline;
let base: string;
let openai: OpenAI;
/**
 * For the tests that need previews to arrive: sampling never waits for one (a round still decoding
 * when the next is due is skipped, a late one dropped), so on the real tiny model a run can finish
 * before the first preview is back. A simulated denoiser (40 ms passes, zeros) gives the real
 * decoder the time to answer, on a busy machine too.
 */
let slow: Pipeline;

beforeAll(async () => {
  // A second configured model that no denoiser serves, for UNAVAILABLE.
  p = await startPipeline({ transport: { kind: 'inproc' }, scheduler: { maxSamplesInFlight: 24, models: [DIT_NAME, 'ghost'] }, http: {} });
  base = p.http!.url;
  slow = await startPipeline({ transport: { kind: 'inproc' }, denoiser: { simulate: { baseMs: 40, perRowMs: 0 } }, http: {} });
  openai = new OpenAI({ apiKey: 'not-checked', baseURL: `${base}/v1`, maxRetries: 0 });
});
afterAll(async () => {
  await slow?.stop();
  await p?.stop();
});

describe('OpenAI images API with the official client', () => {
  it('generates PNGs of the model size, the same bytes as gRPC for the same seed', async () => {
    const body = {
      model: DIT_NAME,
      prompt: 'three',
      n: 2,
      size: '32x32',
      response_format: 'b64_json',
      ditpipe: { steps: 6, sampler: 'ddim', cfg_scale: 4, seed: 1234 },
    };
    const res = await openai.images.generate(body as ImageGenerateParamsNonStreaming);
    expect(res.data).toHaveLength(2);
    expect(res.size).toBe('32x32');
    const pngs = res.data!.map((d) => Buffer.from(d.b64_json!, 'base64'));
    for (const png of pngs) {
      const px = decodePng(png);
      expect([px.width, px.height, px.channels]).toEqual([32, 32, 3]);
      expect(new Set(px.data).size).toBeGreaterThan(10);
    }
    expect(res.data!.map((d) => d.revised_prompt)).toEqual(['three', 'three']);
    const grpc = await p.api.generate({
      model: DIT_NAME,
      classLabels: [{ name: 'three' }, { index: 3 }],
      numSteps: 6,
      sampler: SamplerKind.SAMPLER_KIND_DDIM,
      cfgScale: 4,
      seed: 1234n,
    });
    grpc.images.forEach((img, i) => expect(Buffer.from(img.png).equals(pngs[i]), `image ${i}`).toBe(true));
    expect(pngs[0].equals(pngs[1])).toBe(false); // different sample indices, different noise
    const x = (res as unknown as { ditpipe: { seed: string; num_steps: number; images: Array<{ class_label: number }> } }).ditpipe;
    expect(x.seed).toBe('1234');
    expect(x.num_steps).toBe(6);
    expect(x.images.map((i) => i.class_label)).toEqual([3, 3]);
  });

  it('lists and retrieves models with their class names', async () => {
    const list = await openai.models.list();
    expect(list.data.map((m) => m.id)).toEqual([DIT_NAME]); // "ghost" has no denoiser and is left out
    const m = list.data[0] as unknown as {
      object: string;
      owned_by: string;
      ditpipe: { class_names: string[]; image_size: number; replicas: number };
    };
    expect(m.object).toBe('model');
    expect(m.ditpipe.class_names).toEqual(CLASS_NAMES);
    expect(m.ditpipe.image_size).toBe(32);
    expect(m.ditpipe.replicas).toBe(1);
    expect((await openai.models.retrieve(DIT_NAME)).id).toBe(DIT_NAME);
    const nf = await failureOf(openai.models.retrieve('nope'));
    expect(nf).toBeInstanceOf(OpenAI.NotFoundError);
  });

  it('streams with the client: OpenAI partial and completed image events among ditpipe progress events', async () => {
    const body = { model: DIT_NAME, prompt: '7', n: 1, stream: true, partial_images: 2, ditpipe: { steps: 9, sampler: 'ddim', seed: 5 } };
    const stream = await openai.images.generate(body as ImageGenerateParamsStreaming);
    const types: string[] = [];
    let final = '';
    for await (const ev of stream) {
      types.push(ev.type);
      if (ev.type === 'image_generation.completed') final = ev.b64_json;
    }
    expect(types[0]).toBe('ditpipe.accepted');
    expect(types.filter((t) => t === 'ditpipe.progress')).toHaveLength(9);
    // partial_images 2 over 9 steps: a preview every 3 steps (after steps 3 and 6) unless the decoder was still busy.
    expect(types.filter((t) => t === 'image_generation.partial_image').length).toBeLessThanOrEqual(2);
    expect(types.slice(-2)).toEqual(['image_generation.completed', 'ditpipe.completed']);
    const grpc = await p.api.generate({
      model: DIT_NAME,
      classLabels: [{ index: 7 }],
      numSteps: 9,
      sampler: SamplerKind.SAMPLER_KIND_DDIM,
      seed: 5n,
    });
    expect(Buffer.from(final, 'base64').equals(Buffer.from(grpc.images[0].png))).toBe(true);
  });

  it("turns errors into the client's typed errors with status, param and code", async () => {
    const bad = await failureOf(
      openai.images.generate({ model: DIT_NAME, prompt: 'three', ditpipe: { steps: 0 } } as ImageGenerateParamsNonStreaming),
    );
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
    const e = bad as unknown as InstanceType<typeof OpenAI.BadRequestError>;
    expect(e.status).toBe(400);
    expect(e.param).toBe('ditpipe.steps');
    expect(e.code).toBe('invalid_argument');
    expect(e.message).toContain('ditpipe.steps must be within 1..1000');
    expect(await failureOf(openai.images.generate({ model: 'nope', prompt: 'three' }))).toBeInstanceOf(OpenAI.NotFoundError);
  });
});

describe('one validation, two front ends', () => {
  // [case, HTTP body, the same request over gRPC, the field gRPC names, the param HTTP names]
  const d = (x: Record<string, unknown>): Record<string, unknown> => ({ model: DIT_NAME, prompt: 'three', ditpipe: { steps: 4, ...x } });
  const g = (x: Partial<GenerateRequest>): Partial<GenerateRequest> => ({
    model: DIT_NAME,
    classLabels: [{ name: 'three' }],
    numSteps: 4,
    ...x,
  });
  const cases: Array<[string, Record<string, unknown>, Partial<GenerateRequest>, string, string]> = [
    ['unknown class name', { ...d({}), prompt: 'Unicorn' }, g({ classLabels: [{ name: 'Unicorn' }] }), 'class_labels[0]', 'prompt'],
    ['class index out of range', { ...d({}), prompt: '10' }, g({ classLabels: [{ index: 10 }] }), 'class_labels[0]', 'prompt'],
    ['no images', { ...d({}), n: 0 }, g({ classLabels: [] }), 'class_labels', 'n'],
    ['too many images', { ...d({}), n: 65 }, g({ classLabels: Array.from({ length: 65 }, () => ({ index: 1 })) }), 'class_labels', 'n'],
    ['zero steps', d({ steps: 0 }), g({ numSteps: 0 }), 'num_steps', 'ditpipe.steps'],
    ['too many steps', d({ steps: 1001 }), g({ numSteps: 1001 }), 'num_steps', 'ditpipe.steps'],
    ['cfg below 1', d({ cfg_scale: 0.5 }), g({ cfgScale: 0.5 }), 'cfg_scale', 'ditpipe.cfg_scale'],
    ['eta out of range', d({ sampler: 'ddim', eta: 2 }), g({ sampler: SamplerKind.SAMPLER_KIND_DDIM, eta: 2 }), 'eta', 'ditpipe.eta'],
    ['eta for DDPM', d({ eta: 0.5 }), g({ eta: 0.5 }), 'eta', 'ditpipe.eta'],
    [
      'preview without a stream',
      d({ preview: { every_steps: 2 } }),
      g({ preview: { everySteps: 2, method: PreviewMethod.PREVIEW_METHOD_DECODER } }),
      'preview',
      'ditpipe.preview',
    ],
  ];
  it.each(cases)('%s: 400 naming the HTTP field, INVALID_ARGUMENT naming the gRPC field', async (_name, body, grpcReq, field, param) => {
    const res = await post(base, body);
    expect(res.status, res.text).toBe(400);
    const err = res.json().error;
    expect(err).toMatchObject({ type: 'invalid_request_error', param, code: 'invalid_argument' });
    expect(err.message.startsWith(param)).toBe(true);
    const ge = await failureOf(p.api.generate(grpcReq));
    expect(ge.code).toBe(Code.INVALID_ARGUMENT);
    expect((ge as InvalidArgumentError).field).toBe(field);
    expect(httpParam(field)).toBe(param);
    // The HTTP message is the scheduler's, with the field spelled as the HTTP request spells it.
    expect(err.message.replace(param, '')).toContain(ge.message.replace(field, '').replace(/^: /, ''));
  });

  const shape: Array<[string, Record<string, unknown>, string | null, number]> = [
    ['unknown sampler name', d({ sampler: 'euler' }), 'ditpipe.sampler', 400],
    ['unknown guidance channels', d({ guidance_channels: 'two' }), 'ditpipe.guidance_channels', 400],
    ['negative seed', d({ seed: -1 }), 'ditpipe.seed', 400],
    ['seed past 2^64', d({ seed: '18446744073709551616' }), 'ditpipe.seed', 400],
    ['seed not a number', d({ seed: 'abc' }), 'ditpipe.seed', 400],
    ['misspelt extension field', d({ stepz: 3 }), 'ditpipe.stepz', 400],
    ['steps as a string', d({ steps: '4' }), 'ditpipe.steps', 400],
    // The scheduler's check (gRPC's int32 cannot carry a fraction, JSON can).
    ['fractional steps', d({ steps: 2.5 }), 'ditpipe.steps', 400],
    ['n absurd', { ...d({}), n: 1_000_000 }, 'n', 400],
    ['no prompt', { model: DIT_NAME }, 'prompt', 400],
    ['wrong size', { ...d({}), size: '64x64' }, 'size', 400],
    ['url response format', { ...d({}), response_format: 'url' }, 'response_format', 400],
    ['jpeg output', { ...d({}), output_format: 'jpeg' }, 'output_format', 400],
  ];
  it.each(shape)('%s: 400 naming %s', async (_name, body, param, status) => {
    const res = await post(base, body);
    expect(res.status, res.text).toBe(status);
    expect(res.json().error).toMatchObject({ type: 'invalid_request_error', param, code: 'invalid_argument' });
  });

  it('maps the other status codes: 404, 429 with Retry-After, 503 with Retry-After, 504, 413, 405, bad JSON', async () => {
    const nf = await post(base, { model: 'nope', prompt: 'three' });
    expect(nf.status).toBe(404);
    expect(nf.json().error).toMatchObject({ code: 'not_found', param: null });
    expect(nf.json().error.message).toContain('nope');

    const ghost = await post(base, { model: 'ghost', prompt: 'three' });
    expect(ghost.status, ghost.text).toBe(503);
    expect(ghost.headers['retry-after']).toBe('1');
    expect(ghost.json().error).toMatchObject({ code: 'unavailable', type: 'server_error' });

    // Fill the admission budget (24) with a slow gRPC request, then overflow it over HTTP.
    const filler = p.api.generate({
      model: DIT_NAME,
      classLabels: Array.from({ length: 20 }, () => ({ index: 2 })),
      numSteps: 300,
      cfgScale: 1,
    });
    await expect.poll(() => metric(p, 'ditpipe_samples_in_flight'), { timeout: 10_000 }).toBe(20);
    const full = await post(base, { ...d({}), n: 5 });
    expect(full.status, full.text).toBe(429);
    expect(full.headers['retry-after']).toBe('1');
    expect(full.json().error).toMatchObject({ code: 'resource_exhausted', type: 'rate_limit_error' });
    expect(full.json().error.message).toMatch(/capacity/);
    await filler;

    const late = await post(base, { ...d({ steps: 1000, cfg_scale: 1, timeout_ms: 300 }) });
    expect(late.status, late.text).toBe(504);
    expect(late.json().error.code).toBe('deadline_exceeded');
    expect(await p.schedulerMetrics.registry.getSingleMetricAsString('ditpipe_request_seconds')).toMatch(/outcome="DEADLINE_EXCEEDED"/);

    const big = await call(`${base}/v1/images/generations`, {
      method: 'POST',
      body: JSON.stringify({ prompt: 'x'.repeat(2 * 1024 * 1024) }),
    });
    expect(big.status).toBe(413);
    const get = await call(`${base}/v1/images/generations`);
    expect(get.status).toBe(405);
    expect(get.headers.allow).toBe('POST');
    const junk = await call(`${base}/v1/images/generations`, { method: 'POST', body: '{"prompt": ' });
    expect(junk.status).toBe(400);
    expect(junk.json().error.message).toMatch(/not valid JSON/);
    expect((await call(`${base}/v2/nothing`)).status).toBe(404);
  });
});

describe('server-sent events', () => {
  it('come in order: accepted, progress per step with previews after their steps, each final image, completed; previews are counted by purpose', async () => {
    const before = {
      decodes: await metric(slow, 'ditpipe_scheduler_decodes_total', { purpose: 'preview' }),
      sent: await metric(slow, 'ditpipe_previews_total', { outcome: 'sent' }),
    };
    const res = await post(slow.http!.url, {
      model: DIT_NAME,
      prompt: 'five',
      n: 2,
      stream: true,
      ditpipe: { steps: 12, sampler: 'ddpm', seed: 3, preview: { every_steps: 2 } },
    });
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/event-stream/);
    const events = sse(res.text);
    for (const e of events) expect(e.data.type).toBe(e.event);
    const kinds = events.map((e) => e.event);
    expect(kinds[0]).toBe('ditpipe.accepted');
    expect(events[0].data).toMatchObject({ model: DIT_NAME, seed: '3', n: 2, num_steps: 12 });
    expect(kinds.slice(-3)).toEqual(['image_generation.completed', 'image_generation.completed', 'ditpipe.completed']);
    const progress = events.filter((e) => e.event === 'ditpipe.progress').map((e) => e.data.step as number);
    expect(progress).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    // Each preview follows the progress event of its step, at a multiple of 2, never after the last step.
    let step = 0;
    const previews = [];
    for (const e of events) {
      if (e.event === 'ditpipe.progress') step = e.data.step;
      if (e.event === 'image_generation.partial_image') {
        previews.push(e);
        expect(e.data.ditpipe.step % 2).toBe(0);
        expect(e.data.ditpipe.step).toBeLessThan(12);
        expect(e.data.ditpipe.step).toBeLessThanOrEqual(step);
        const px = decodePng(Buffer.from(e.data.b64_json, 'base64'));
        expect([px.width, px.height]).toEqual([32, 32]);
      }
    }
    expect(previews.length).toBeGreaterThan(0);
    for (const i of [0, 1]) {
      const mine = previews.filter((e) => e.data.ditpipe.image_index === i).map((e) => e.data.partial_image_index);
      expect(mine).toEqual(mine.map((_, k) => k));
    }
    const finals = events.filter((e) => e.event === 'image_generation.completed');
    expect(finals.map((e) => e.data.ditpipe.image_index).sort()).toEqual([0, 1]);
    // The last preview is the model's guess at step ≤ 10; the final image differs from it.
    expect(previews.every((pv) => pv.data.b64_json !== finals[0].data.b64_json)).toBe(true);
    const decodes = (await metric(slow, 'ditpipe_scheduler_decodes_total', { purpose: 'preview' })) - before.decodes;
    const sent = (await metric(slow, 'ditpipe_previews_total', { outcome: 'sent' })) - before.sent;
    expect(sent).toBe(previews.length);
    expect(decodes).toBeGreaterThanOrEqual(previews.length);
    expect(await metric(slow, 'ditpipe_scheduler_decodes_total', { purpose: 'final' })).toBeGreaterThanOrEqual(2);
    // The same request without previews gives the same final images: previews do not touch the sampling.
    const plain = await post(slow.http!.url, { model: DIT_NAME, prompt: 'five', n: 2, ditpipe: { steps: 12, sampler: 'ddpm', seed: 3 } });
    const byIndex = new Map(finals.map((e) => [e.data.ditpipe.image_index as number, e.data.b64_json as string]));
    expect(plain.json().data.map((x: { b64_json: string }) => x.b64_json)).toEqual([byIndex.get(0), byIndex.get(1)]);
  });

  it('projection previews: made by the scheduler at latent resolution, after one calibration of 8 decodes per VAE', async () => {
    const calibrations = (): Promise<number> => metric(p, 'ditpipe_scheduler_decodes_total', { purpose: 'calibration' });
    const previewDecodes = (): Promise<number> => metric(p, 'ditpipe_scheduler_decodes_total', { purpose: 'preview' });
    const before = {
      cal: await calibrations(),
      pre: await previewDecodes(),
      sent: await metric(p, 'ditpipe_previews_total', { method: 'projection', outcome: 'sent' }),
    };
    const body = {
      model: DIT_NAME,
      prompt: 'five',
      n: 2,
      stream: true,
      ditpipe: { steps: 10, sampler: 'ddim', seed: 3, preview: { every_steps: 1, method: 'projection' } },
    };
    const events = sse((await post(base, body)).text);
    const previews = events.filter((e) => e.event === 'image_generation.partial_image');
    // Nothing to wait for but the scheduler itself: every step but the last gets its previews.
    expect(previews.map((e) => e.data.ditpipe.step)).toEqual([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]);
    for (const e of previews) {
      expect(e.data.ditpipe.method).toBe('projection');
      expect(e.data.size).toBe('8x8');
      const px = decodePng(Buffer.from(e.data.b64_json, 'base64'));
      expect([px.width, px.height, px.channels]).toEqual([8, 8, 3]);
    }
    expect((await calibrations()) - before.cal).toBe(8);
    expect(await previewDecodes()).toBe(before.pre); // no decoder call per preview
    expect((await metric(p, 'ditpipe_previews_total', { method: 'projection', outcome: 'sent' })) - before.sent).toBe(18);
    await post(base, body);
    expect((await calibrations()) - before.cal).toBe(8); // fitted once
  });

  it('a refused streaming request gets a plain HTTP error before any event', async () => {
    const res = await post(base, { model: DIT_NAME, prompt: 'Unicorn', stream: true });
    expect(res.status).toBe(400);
    expect(res.headers['content-type']).toBe('application/json');
    expect(res.json().error.param).toBe('prompt');
  });

  it('a client that disconnects mid-stream stops step dispatch and frees its samples', async () => {
    const dispatched = (): Promise<number> => metric(p, 'ditpipe_steps_dispatched_total');
    const before = await dispatched();
    const cancelledBefore = await metric(p, 'ditpipe_request_seconds', { outcome: 'CANCELLED' }, 'ditpipe_request_seconds_count');
    let progress = 0;
    await new Promise<void>((resolve, reject) => {
      const req = httpRequest(
        `${base}/v1/images/generations`,
        { method: 'POST', headers: { 'content-type': 'application/json' } },
        (res) => {
          res.on('data', (c: Buffer) => {
            progress += (c.toString().match(/event: ditpipe\.progress/g) ?? []).length;
            if (progress >= 3) {
              req.destroy(); // the client goes away: no more reading, the socket closes
              resolve();
            }
          });
          res.on('error', () => undefined);
        },
      );
      req.on('error', (err) => (progress >= 3 ? undefined : reject(err)));
      req.end(JSON.stringify({ model: DIT_NAME, prompt: 'one', n: 2, stream: true, ditpipe: { steps: 500, cfg_scale: 1 } }));
    });
    await expect.poll(() => metric(p, 'ditpipe_samples_in_flight'), { timeout: 10_000 }).toBe(0);
    const after = await dispatched();
    await new Promise((r) => setTimeout(r, 300));
    expect(await dispatched()).toBe(after); // nothing more is sent
    expect(after - before).toBeLessThan(100); // far from the 500 steps asked for
    expect(await metric(p, 'ditpipe_request_seconds', { outcome: 'CANCELLED' }, 'ditpipe_request_seconds_count')).toBe(cancelledBefore + 1);
  });
});

describe('cluster view', () => {
  it('reports what the scheduler knows: replicas, batch rows reported by the denoisers, its queue and sampling compute', async () => {
    const denoiserGflops = (): Promise<number> =>
      metric(p, 'ditpipe_sampling_gflops_total', {}, 'ditpipe_sampling_gflops_total', p.denoiserMetrics[0].registry);
    const spentBefore = await denoiserGflops();
    const a = (await call(`${base}/ditpipe/cluster`)).json();
    await post(base, { model: DIT_NAME, prompt: 'two', n: 3, ditpipe: { steps: 5, cfg_scale: 4 } });
    const b = (await call(`${base}/ditpipe/cluster`)).json();
    expect(b.source).toMatch(/own metrics registry/);
    expect(b.scheduler.max_samples_in_flight).toBe(24);
    expect(b.scheduler.grpc_address).toBe(p.address);
    const m = b.models.find((x: { name: string }) => x.name === DIT_NAME);
    const ma = a.models.find((x: { name: string }) => x.name === DIT_NAME);
    expect(m.replicas).toBe(1);
    expect(m.decoder_replicas).toBe(1);
    // 5 steps × 3 samples × 2 guidance rows × Gflops per row, as the denoiser counts it too.
    expect(m.sampling_gflops_total - ma.sampling_gflops_total).toBeCloseTo(5 * 3 * 2 * m.gflops_per_forward, 9);
    expect(m.step_batch_rows.count - ma.step_batch_rows.count).toBe(5);
    expect((m.step_batch_rows.sum - ma.step_batch_rows.sum) / 5).toBeGreaterThanOrEqual(6);
    expect(m.decodes_total.final - ma.decodes_total.final).toBe(3);
    expect((await denoiserGflops()) - spentBefore).toBeCloseTo(m.sampling_gflops_total - ma.sampling_gflops_total, 9);
  });
});

describe('TLS and bearer tokens', () => {
  it('serves HTTPS with the given certificate and refuses API calls without a valid token (the page stays public)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ditpipe-tls-'));
    const tls = await (async () => {
      execFileSync(
        'openssl',
        [
          'req',
          '-x509',
          '-newkey',
          'ec',
          '-pkeyopt',
          'ec_paramgen_curve:prime256v1',
          '-nodes',
          '-days',
          '1',
          '-subj',
          '/CN=127.0.0.1',
          '-addext',
          'subjectAltName=IP:127.0.0.1',
          '-keyout',
          join(dir, 'key.pem'),
          '-out',
          join(dir, 'cert.pem'),
        ],
        { stdio: 'ignore' },
      );
      return { key: readFileSync(join(dir, 'key.pem')), cert: readFileSync(join(dir, 'cert.pem')) };
    })();
    const q = await startPipeline({
      transport: { kind: 'inproc' },
      http: {
        tls,
        authorize: bearerTokens(
          TokenSet.parse('s3cret-token-for-http\nlisting-only-token-xyz ditpipe.v1.Sampler/ListModels', 'test tokens'),
        ),
      },
    });
    try {
      const url = q.http!.url;
      expect(url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
      const ca = tls.cert;
      const none = await call(`${url}/v1/models`, { ca });
      expect(none.status).toBe(401);
      expect(none.headers['www-authenticate']).toBe('Bearer');
      expect(none.json().error).toMatchObject({ type: 'authentication_error', code: 'unauthenticated' });
      expect((await call(`${url}/v1/models`, { ca, headers: { authorization: 'Bearer wrong' } })).status).toBe(401);
      expect((await call(`${url}/ditpipe/cluster`, { ca })).status).toBe(401);
      const ok = await call(`${url}/v1/models`, { ca, headers: { authorization: 'Bearer s3cret-token-for-http' } });
      expect(ok.status, ok.text).toBe(200);
      expect(ok.json().data[0].id).toBe(DIT_NAME);
      // Scopes are the gRPC token file's: a token for ListModels only may list, not generate.
      const lister = { authorization: 'Bearer listing-only-token-xyz' };
      expect((await call(`${url}/v1/models`, { ca, headers: lister })).status).toBe(200);
      const denied = await call(`${url}/v1/images/generations`, {
        ca,
        headers: { ...lister, 'content-type': 'application/json' },
        method: 'POST',
        body: JSON.stringify({ prompt: 'three' }),
      });
      expect(denied.status).toBe(403);
      const page = await call(`${url}/`, { ca });
      expect(page.status).toBe(200);
      expect(page.text).toContain('ditpipe playground');
      await expect(call(`${url}/v1/models`)).rejects.toThrow(/self[- ]signed|certificate/i); // not trusted without the CA
    } finally {
      await q.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('previews over gRPC', () => {
  it('GenerateStream sends preview events between progress events when asked', async () => {
    const events: GenerateEvent[] = [];
    for await (const ev of slow.api.generateStream({
      model: DIT_NAME,
      classLabels: [{ index: 4 }],
      numSteps: 8,
      sampler: SamplerKind.SAMPLER_KIND_DPM_SOLVER_PP,
      guidanceChannels: GuidanceChannels.GUIDANCE_CHANNELS_ALL,
      seed: 9n,
      preview: { everySteps: 1, method: PreviewMethod.PREVIEW_METHOD_UNSPECIFIED },
    }))
      events.push(ev);
    const previews = events.filter((e) => e.preview).map((e) => e.preview!);
    expect(previews.length).toBeGreaterThan(0);
    expect(
      previews.every((pv) => pv.step >= 1 && pv.step < 8 && pv.method === PreviewMethod.PREVIEW_METHOD_DECODER && pv.png.length > 0),
    ).toBe(true);
    const firstImage = events.findIndex((e) => e.image);
    expect(events.slice(firstImage).some((e) => e.preview)).toBe(false);
    const bad = await failureOf(
      (async () => {
        for await (const _ of p.api.generateStream({
          model: DIT_NAME,
          classLabels: [{ index: 4 }],
          numSteps: 8,
          preview: { everySteps: 2, method: 7 as PreviewMethod },
        }))
          void _;
      })(),
    );
    expect((bad as InvalidArgumentError).field).toBe('preview.method');
  });
});
