// Hostile input stays cheap: one regression test per case found when the project was tried as an
// attacker would — pickle memo bombs and cycles, zip entries that inflate past what they declare,
// oversized and undecodable gRPC requests, echoed input, model.json paths and configs that lie,
// ONNX files that do not parse, and a metrics URL that redirects where the load tester may not go.
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compileDenoiserConfig } from '../../services/denoiser/config.ts';
import { Denoiser } from '../../services/denoiser/denoiser.ts';
import { Code, InvalidArgumentError } from '../../shared/errors.ts';
import { readModelDir } from '../../shared/model/modeldir.ts';
import { openTorchCheckpoint } from '../../shared/weights/torch.ts';
import { WeightsError } from '../../shared/weights/types.ts';
import { ZipReader } from '../../shared/weights/zip.ts';
import { scrape } from '../../loadtest/prom.ts';
import { DIT_NAME, testModels } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';
import { writeZip } from '../helpers/zip.ts';
import { failureOf } from '../helpers/failure.ts';

const BIN = resolve(import.meta.dirname, '../../bin/ditpipe.js');
const dir = mkdtempSync(join(tmpdir(), 'ditpipe-hostile-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// --- pickle assembly -------------------------------------------------------------------------
const u32 = (n: number): number[] => [n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >>> 24) & 0xff];
const uni = (s: string): number[] => [0x58, ...u32(Buffer.byteLength(s)), ...Buffer.from(s)];
const PROTO2 = [0x80, 2];
const EMPTY_DICT = 0x7d;
const MARK = 0x28;
const SETITEM = 0x73;
const SETITEMS = 0x75;
const POP = 0x30;
const STOP = 0x2e;
const longPut = (i: number): number[] => [0x72, ...u32(i)];
const longGet = (i: number): number[] => [0x6a, ...u32(i)];

/** A torch.save-style zip holding only this data.pkl. */
function checkpoint(name: string, pkl: number[], deflate = false, declaredSize?: number): string {
  const path = join(dir, name);
  writeZip(path, [{ name: 'archive/data.pkl', data: Uint8Array.from(pkl), deflate, declaredSize }]);
  return path;
}

describe('weights', () => {
  it('walks a pickle whose memo reuses one nested dict at every level once, and refuses it by name', () => {
    // d0 = {}; d_i = {"a": d_{i-1}, "b": d_{i-1}}; root = {"model": d_40}: 2^40 paths, 1 KB of pickle.
    const depth = 40;
    const pkl = [...PROTO2, EMPTY_DICT, ...longPut(0), POP];
    for (let i = 1; i <= depth; i++)
      pkl.push(EMPTY_DICT, MARK, ...uni('a'), ...longGet(i - 1), ...uni('b'), ...longGet(i - 1), SETITEMS, ...longPut(i), POP);
    pkl.push(EMPTY_DICT, ...uni('model'), ...longGet(depth), SETITEM, STOP);
    const path = checkpoint('memo-bomb.pt', pkl);
    expect(readFileSync(path).length).toBeLessThan(2_000);
    const err = (() => {
      try {
        openTorchCheckpoint(path);
      } catch (e) {
        return e as Error;
      }
      return null;
    })();
    expect(err).toBeInstanceOf(WeightsError);
    expect(err!.message).toContain(path);
    expect(err!.message).toMatch(/one dict appears both at 'model(\.a)+' and at 'model(\.a)*\.b'/);
  });

  it('names the file when a dict contains itself, instead of overflowing the stack', () => {
    const path = checkpoint('cycle.pt', [...PROTO2, EMPTY_DICT, ...longPut(0), ...uni('self'), ...longGet(0), SETITEM, STOP]);
    expect(() => openTorchCheckpoint(path)).toThrow(
      new RegExp(`${path}: the dict at '\\(top level\\)' contains itself \\(through 'self'\\)`),
    );
    const deep = [...PROTO2, EMPTY_DICT];
    for (let i = 0; i < 5_000; i++) deep.push(...uni('k'), EMPTY_DICT);
    for (let i = 0; i < 5_000; i++) deep.push(SETITEM);
    deep.push(STOP);
    expect(() => openTorchCheckpoint(checkpoint('deep.pt', deep))).toThrow(/dicts nested more than 64 deep/);
  });

  it('inflates a zip entry against its declared size, never past it, with a hard cap', () => {
    const zeros = new Uint8Array(50 * 1024 * 1024); // deflates to ~50 KB
    const liar = checkpoint('inflates-past.pt', Array.from(zeros.subarray(0, 0)), false);
    writeZip(liar, [{ name: 'archive/data.pkl', data: zeros, deflate: true, declaredSize: 100 }]);
    const before = process.memoryUsage().rss;
    expect(() => openTorchCheckpoint(liar)).toThrow(/zip entry 'archive\/data\.pkl' inflates past its declared 100 bytes/);
    expect(process.memoryUsage().rss - before).toBeLessThan(40 * 1024 * 1024);
    const huge = join(dir, 'declares-huge.pt');
    writeZip(huge, [{ name: 'archive/data.pkl', data: zeros.subarray(0, 1024), deflate: true, declaredSize: 2 ** 31 }]);
    expect(() => openTorchCheckpoint(huge)).toThrow(/declares 2147483648 bytes, more than the 67108864-byte limit/);
    const ratio = join(dir, 'ratio.zip');
    writeZip(ratio, [{ name: 'x', data: zeros.subarray(0, 1024), deflate: true, declaredSize: 500 * 1024 * 1024 }]);
    const z = new ZipReader(ratio);
    try {
      expect(() => z.readEntry('x')).toThrow(/more than deflate can expand: corrupt/);
    } finally {
      z.close();
    }
  });
});

// --- gRPC --------------------------------------------------------------------------------------
const identity = (b: Buffer): Buffer => b;

function rawCall(address: string, path: string, body: Buffer): Promise<grpc.ServiceError | null> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': -1 });
  return new Promise((resolve) => {
    client.makeUnaryRequest(path, identity, identity, body, (err) => {
      client.close();
      resolve(err);
    });
  });
}

describe('the Sampler API', () => {
  let p: Pipeline;
  beforeAll(async () => {
    p = await startPipeline({ transport: { kind: 'inproc' } });
  });
  afterAll(async () => {
    await p?.stop();
  });

  it('refuses a request larger than the largest valid one before decoding it', async () => {
    expect(p.grpc.maxReceiveBytes).toBeLessThan(1024 * 1024);
    const e = await failureOf(p.api.generate({ model: 'm'.repeat(2 * 1024 * 1024), classLabels: [{ index: 1 }] }));
    expect(e.code).toBe(Code.RESOURCE_EXHAUSTED);
    expect(e.message).toMatch(/larger than max/);
    expect((await p.api.generate({ model: DIT_NAME, classLabels: [{ index: 1 }], numSteps: 2 })).images).toHaveLength(1);
  });

  it('counts class labels before decoding them', async () => {
    // 65 labels, the last one undecodable: the count is what is wrong, and it is found first.
    const w = new BinaryWriter().uint32(10).string(DIT_NAME);
    for (let i = 0; i < 64; i++) w.uint32(18).bytes(new Uint8Array([0x08, 0x01]));
    w.uint32(18).bytes(new Uint8Array([0x0f, 0xff]));
    const err = await rawCall(p.address, '/ditpipe.v1.Sampler/Generate', Buffer.from(w.finish()));
    expect(err?.code).toBe(Code.INVALID_ARGUMENT);
    expect(err?.details).toBe('class_labels asks for 65 images; at most 64 per request');
    expect(err?.metadata.get('ditpipe-field')).toEqual(['class_labels']);
  });

  it('answers undecodable bytes with INVALID_ARGUMENT, not INTERNAL', async () => {
    for (const bytes of [
      [0xff, 0xff, 0xff],
      [0x0a, 0x7f],
      [0x12, 0x05, 0x08],
    ]) {
      const err = await rawCall(p.address, '/ditpipe.v1.Sampler/Generate', Buffer.from(bytes));
      expect(err?.code).toBe(Code.INVALID_ARGUMENT);
      expect(err?.details).toMatch(/^request is not a valid ditpipe\.v1\.Sampler\/Generate request: /);
    }
  });

  it('truncates echoed input, so the status still reaches the client', async () => {
    const nf = await failureOf(p.api.generate({ model: 'x'.repeat(30_000), classLabels: [{ index: 1 }] }));
    expect(nf.code).toBe(Code.NOT_FOUND);
    expect(nf.message.length).toBeLessThan(300);
    expect(nf.message).toContain('… (30000 characters)');
    const bad = await failureOf(p.api.generate({ model: DIT_NAME, classLabels: [{ name: 'y'.repeat(200) }] }));
    expect(bad).toBeInstanceOf(InvalidArgumentError);
    expect(bad.message).toContain('… (200 characters)');
  });
});

// --- model directories -------------------------------------------------------------------------
function copyModel(name: string, edit: (meta: Record<string, unknown>, dir: string) => void): string {
  const { ditDir } = testModels();
  const d = join(dir, name);
  cpSync(ditDir, d, { recursive: true });
  const meta = JSON.parse(readFileSync(join(d, 'model.json'), 'utf8')) as Record<string, unknown>;
  edit(meta, d);
  writeFileSync(join(d, 'model.json'), JSON.stringify(meta));
  return d;
}

function modelInfo(d: string): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [BIN, 'model', 'info', d], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

describe('model directories', () => {
  it('confine model.json paths to the model directory', () => {
    const escape = copyModel('escape', (m) => {
      m.onnx = '../../../../etc/hostname';
    });
    expect(() => readModelDir(escape)).toThrow(
      /field "onnx": "\.\.\/\.\.\/\.\.\/\.\.\/etc\/hostname" is not a file inside the model directory/,
    );
    const abs = copyModel('absolute', (m) => {
      m.onnx = '/etc/hostname';
    });
    expect(() => readModelDir(abs)).toThrow(/is not a file inside the model directory/);
    const link = copyModel('symlink', (m, d) => {
      m.onnx = 'link.onnx';
      symlinkSync('/etc/hostname', join(d, 'link.onnx'));
    });
    expect(() => readModelDir(link)).toThrow(/field "onnx": "link\.onnx" leads outside the model directory/);
  });

  it('check the config against the graph at load, so a replica never starts to answer INTERNAL', async () => {
    const lie = copyModel('lying-config', (m) => {
      (m.config as Record<string, unknown>).in_channels = 3;
      (m.inputs as Array<{ shape: unknown[] }>)[0].shape = ['B', 3, 8, 8];
    });
    expect(() => readModelDir(lie)).toThrow(
      /field "inputs\.0": x is float32 \[B, 3, 8, 8\] here but float32 \[B, 4, 8, 8\] in model\.onnx/,
    );
    const lie2 = copyModel('lying-config-2', (m) => {
      (m.config as Record<string, unknown>).input_size = 16;
    });
    await expect(Denoiser.create(compileDenoiserConfig({ modelDir: lie2 }))).rejects.toThrow(
      /field "config\.input_size" is 16 but the graph's x is \[B, 4, 8, 8\]/,
    );
  });

  it('model info fails on a random, truncated or empty ONNX file, and passes a good one', () => {
    const good = modelInfo(testModels().ditDir);
    expect(good.status, good.out).toBe(0);
    expect(good.out).toMatch(/model\.onnx parses: ONNX IR \d+, opset ai\.onnx \d+, \d+ nodes/);
    const onnx = readFileSync(join(testModels().ditDir, 'model.onnx'));
    let seed = 7;
    const random = Buffer.from(Array.from({ length: 4096 }, () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 24) & 0xff));
    for (const [name, bytes] of [
      ['random', random],
      ['truncated', onnx.subarray(0, Math.floor(onnx.length / 2))],
      ['empty', Buffer.alloc(0)],
    ] as const) {
      const d = copyModel(`onnx-${name}`, (_m, dd) => writeFileSync(join(dd, 'model.onnx'), bytes));
      const r = modelInfo(d);
      expect(r.status, `${name}: ${r.out}`).not.toBe(0);
      expect(r.out, name).toMatch(/model\.onnx: not a valid ONNX model: /);
    }
  });
});

// --- load tester -----------------------------------------------------------------------------
describe('the load tester', () => {
  it('does not follow a redirect to a host its guard would refuse', async () => {
    const servers: Server[] = [];
    const listen = (handler: Parameters<typeof createServer>[1]): Promise<number> =>
      new Promise((res) => {
        const s = createServer(handler);
        servers.push(s);
        s.listen(0, '0.0.0.0', () => res((s.address() as AddressInfo).port));
      });
    let reached = 0;
    const target = await listen((_req, res) => {
      reached++;
      res.end('ditpipe_images_total 1\n');
    });
    // 0.0.0.0 is not loopback to the guard (it is refused when given directly), though it lands here.
    const redirector = await listen((_req, res) => res.writeHead(302, { location: `http://0.0.0.0:${target}/metrics` }).end());
    try {
      const isLoop = (h: string): boolean => h === '127.0.0.1' || h === 'localhost';
      const refused = await scrape('m', `http://127.0.0.1:${redirector}/metrics`, { allowHost: isLoop });
      expect(refused.error).toBe(`redirect to http://0.0.0.0:${target} refused: not loopback and not in target.allowHosts`);
      expect(reached).toBe(0);
      const followed = await scrape('m', `http://127.0.0.1:${redirector}/metrics`, { allowHost: () => true });
      expect(followed.error).toBeUndefined();
      expect(followed.samples[0]).toMatchObject({ name: 'ditpipe_images_total', value: 1 });
    } finally {
      for (const s of servers) s.close();
    }
  });
});
