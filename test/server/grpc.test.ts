// The gRPC server module against a real grpc-js server on port 0: health checking, server
// reflection from the generated descriptor set, typed errors through a gRPC status; and the
// generated code is up to date with proto/ (what CI's `npm run gen -- --check` enforces).
import { spawnSync } from 'node:child_process';

import * as grpc from '@grpc/grpc-js';
import { BinaryReader, BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  Code,
  fromServiceError,
  InvalidArgumentError,
  ResourceExhaustedError,
  PayloadTooLargeError,
  toServiceError,
} from '../../shared/errors.ts';
import { ListModelsResponse, ModelInfo, SamplerClient, SamplerService, type SamplerServer } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { GrpcServer, SERVICE_NAMES } from '../../shared/server/grpc.ts';

let server: GrpcServer;
let address: string;
let health: GrpcServer['health'];
let modelsCall = 0;

const sampler: SamplerServer = {
  generate: (_call, callback) =>
    callback(
      toServiceError(new InvalidArgumentError('class_labels[0]: 12 is not a class of model m (10 classes)', { field: 'class_labels[0]' })),
    ),
  generateStream: (call) => {
    call.emit('error', toServiceError(new PayloadTooLargeError('too big')));
  },
  listModels: (_call, callback) => {
    modelsCall++;
    if (modelsCall === 1) callback(toServiceError(new ResourceExhaustedError('busy')));
    else callback(null, ListModelsResponse.create({ models: [ModelInfo.create({ name: 'm', params: 42n, gflops: 0.36 })] }));
  },
};

beforeAll(async () => {
  server = new GrpcServer({ host: '127.0.0.1', port: 0 });
  server.addService({ fullName: SERVICE_NAMES.sampler, definition: SamplerService, impl: sampler, maxRequestBytes: 1024 });
  health = server.health;
  await server.listen();
  address = server.address;
});

afterAll(async () => {
  await server.stop(1_000);
});

const rawClient = (): grpc.Client => new grpc.Client(address, grpc.credentials.createInsecure());
const identity = (b: Buffer): Buffer => b;

function stringField(field: number, value: string): Buffer {
  return Buffer.from(
    new BinaryWriter()
      .uint32((field << 3) | WireType.LengthDelimited)
      .string(value)
      .finish(),
  );
}

/** Top-level length-delimited fields of a message, by field number. */
function fields(bytes: Uint8Array): Map<number, Uint8Array[]> {
  const out = new Map<number, Uint8Array[]>();
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [f, wt] = r.tag();
    if (wt === WireType.LengthDelimited) {
      const list = out.get(f) ?? [];
      list.push(r.bytes());
      out.set(f, list);
    } else if (wt === WireType.Varint) {
      const list = out.get(f) ?? [];
      list.push(new Uint8Array([r.uint32()]));
      out.set(f, list);
    } else r.skip(wt);
  }
  return out;
}

async function reflect(request: Buffer): Promise<Map<number, Uint8Array[]>> {
  const client = rawClient();
  try {
    const stream = client.makeBidiStreamRequest('/grpc.reflection.v1.ServerReflection/ServerReflectionInfo', identity, identity);
    const reply = new Promise<Buffer>((resolve, reject) => {
      stream.once('data', (b: Buffer) => resolve(b));
      stream.once('error', reject);
    });
    stream.write(request);
    stream.end();
    return fields(await reply);
  } finally {
    client.close();
  }
}

async function healthCheck(service: string): Promise<number> {
  const client = rawClient();
  try {
    const reply = await new Promise<Buffer>((resolve, reject) => {
      client.makeUnaryRequest('/grpc.health.v1.Health/Check', identity, identity, stringField(1, service), (err, value) =>
        err || !value ? reject(err ?? new Error('no reply')) : resolve(value),
      );
    });
    const status = fields(reply).get(1)?.[0]?.[0];
    return status ?? 0;
  } finally {
    client.close();
  }
}

describe('grpc health and reflection', () => {
  it('reports SERVING, then NOT_SERVING once set, and NOT_FOUND for unknown services', async () => {
    expect(await healthCheck('')).toBe(1);
    expect(await healthCheck('ditpipe.v1.Sampler')).toBe(1);
    health.setStatus('ditpipe.v1.Sampler', 'NOT_SERVING');
    expect(await healthCheck('ditpipe.v1.Sampler')).toBe(2);
    health.setStatus('ditpipe.v1.Sampler', 'SERVING');
    await expect(healthCheck('ditpipe.v1.Nope')).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
  });

  it('lists the served services and returns their descriptors with comments', async () => {
    const listed = await reflect(stringField(7, '*'));
    const names = (listed.get(6) ?? [])
      .flatMap((svc) => fields(svc).get(1) ?? [])
      .map((n) => {
        const inner = fields(n).get(1)?.[0];
        return new TextDecoder().decode(inner);
      });
    expect(names.sort()).toEqual([
      'ditpipe.v1.Sampler',
      'grpc.health.v1.Health',
      'grpc.reflection.v1.ServerReflection',
      'grpc.reflection.v1alpha.ServerReflection',
    ]);

    const files = await reflect(stringField(4, 'ditpipe.v1.GenerateRequest'));
    const protos = fields(files.get(4)?.[0] ?? new Uint8Array()).get(1) ?? [];
    const fileNames = protos.map((p) => new TextDecoder().decode(fields(p).get(1)?.[0]));
    expect(fileNames).toContain('ditpipe/v1/sampler.proto');
    const sampler = protos[fileNames.indexOf('ditpipe/v1/sampler.proto')];
    // Source info travels too, so `grpcurl describe` shows the field documentation.
    expect(new TextDecoder().decode(sampler)).toContain('Classifier-free guidance scale');
  });
});

describe('typed errors over gRPC', () => {
  it('carries code, message and kind through a gRPC status', async () => {
    const client = new SamplerClient(address, grpc.credentials.createInsecure());
    try {
      const err = await new Promise<grpc.ServiceError>((resolve) => {
        client.generate(
          { model: 'm', classLabels: [{ index: 12 }], sampler: 0, guidanceChannels: 0, outputFormat: 0, cachePolicy: 0 },
          (e) => resolve(e as grpc.ServiceError),
        );
      });
      expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
      const typed = fromServiceError(err);
      expect(typed).toBeInstanceOf(InvalidArgumentError);
      expect(typed.message).toBe('class_labels[0]: 12 is not a class of model m (10 classes)');
      // Clients in any language read the field from the `ditpipe-field` trailer.
      expect(err.metadata.get('ditpipe-field')).toEqual(['class_labels[0]']);
      expect((typed as InvalidArgumentError).field).toBe('class_labels[0]');

      const streamErr = await new Promise<grpc.ServiceError>((resolve) => {
        const s = client.generateStream({ model: 'm', classLabels: [], sampler: 0, guidanceChannels: 0, outputFormat: 0, cachePolicy: 0 });
        s.on('data', () => undefined);
        s.on('error', (e) => resolve(e as grpc.ServiceError));
      });
      expect(streamErr.code).toBe(Code.RESOURCE_EXHAUSTED);
      expect(fromServiceError(streamErr)).toBeInstanceOf(PayloadTooLargeError);

      const busy = await new Promise<grpc.ServiceError>((resolve) => {
        client.listModels({}, (e) => resolve(e as grpc.ServiceError));
      });
      const typedBusy = fromServiceError(busy);
      expect(typedBusy).toBeInstanceOf(ResourceExhaustedError);
      expect(typedBusy).not.toBeInstanceOf(PayloadTooLargeError);
      const ok = await new Promise<ListModelsResponse>((resolve, reject) => {
        client.listModels({}, (e, r) => (e ? reject(e) : resolve(r)));
      });
      expect(ok.models[0].params).toBe(42n);
    } finally {
      client.close();
    }
  });
});

describe('generated code', () => {
  it('is up to date with proto/ (npm run gen -- --check)', () => {
    const r = spawnSync(process.execPath, ['scripts/gen-proto.mjs', '--check'], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/shared\/gen is up to date \(8 files\)/);
  });
});
