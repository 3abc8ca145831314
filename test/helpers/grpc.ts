// Raw gRPC probes for tests: health (grpc.health.v1) and server reflection (v1 and v1alpha), as
// a Kubernetes probe or grpcurl would make them, without generated client code.
import * as grpc from '@grpc/grpc-js';
import { BinaryReader, BinaryWriter, WireType } from '@bufbuild/protobuf/wire';

const identity = (b: Buffer): Buffer => b;

/** grpc.health.v1.Health/Check of `service` ('' = the server): 1 SERVING, 2 NOT_SERVING. */
export async function healthStatus(
  address: string,
  service = '',
  creds: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
): Promise<number> {
  const client = new grpc.Client(address, creds);
  try {
    const reply = await new Promise<Buffer>((resolve, reject) => {
      const req = Buffer.from(
        new BinaryWriter()
          .uint32((1 << 3) | WireType.LengthDelimited)
          .string(service)
          .finish(),
      );
      client.makeUnaryRequest('/grpc.health.v1.Health/Check', identity, identity, req, { deadline: Date.now() + 10_000 }, (err, value) =>
        err || !value ? reject(err ?? new Error('no reply')) : resolve(value),
      );
    });
    const r = new BinaryReader(reply);
    while (r.pos < r.len) {
      const [field, wt] = r.tag();
      if (field === 1 && wt === WireType.Varint) return r.int32();
      r.skip(wt);
    }
    return 0; // UNKNOWN: the default value is not encoded
  } finally {
    client.close();
  }
}

/** Service names a server lists through reflection (`grpcurl list`), v1 or v1alpha. */
export async function reflectedServices(address: string, version: 'v1' | 'v1alpha' = 'v1'): Promise<string[]> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  try {
    const stream = client.makeBidiStreamRequest(`/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`, identity, identity);
    const reply = new Promise<Buffer>((resolve, reject) => {
      stream.once('data', (b: Buffer) => resolve(b));
      stream.once('error', reject);
    });
    // ServerReflectionRequest.list_services = 7
    stream.write(
      Buffer.from(
        new BinaryWriter()
          .uint32((7 << 3) | WireType.LengthDelimited)
          .string('*')
          .finish(),
      ),
    );
    stream.end();
    const names: string[] = [];
    const r = new BinaryReader(await reply);
    while (r.pos < r.len) {
      const [field, wt] = r.tag();
      if (field !== 6 || wt !== WireType.LengthDelimited) {
        r.skip(wt);
        continue;
      }
      // ListServiceResponse.service = 1 (ServiceResponse.name = 1)
      const list = new BinaryReader(r.bytes());
      while (list.pos < list.len) {
        const [f, w] = list.tag();
        if (f !== 1 || w !== WireType.LengthDelimited) {
          list.skip(w);
          continue;
        }
        const svc = new BinaryReader(list.bytes());
        while (svc.pos < svc.len) {
          const [g, x] = svc.tag();
          if (g === 1 && x === WireType.LengthDelimited) names.push(svc.string());
          else svc.skip(x);
        }
      }
    }
    return names.sort();
  } finally {
    client.close();
  }
}

/** Whether reflection can describe `symbol` (file_containing_symbol answers a file, not an error). */
export async function reflectionDescribes(address: string, symbol: string): Promise<boolean> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  try {
    const stream = client.makeBidiStreamRequest('/grpc.reflection.v1.ServerReflection/ServerReflectionInfo', identity, identity);
    const reply = new Promise<Buffer>((resolve, reject) => {
      stream.once('data', (b: Buffer) => resolve(b));
      stream.once('error', reject);
    });
    // ServerReflectionRequest.file_containing_symbol = 4
    stream.write(
      Buffer.from(
        new BinaryWriter()
          .uint32((4 << 3) | WireType.LengthDelimited)
          .string(symbol)
          .finish(),
      ),
    );
    stream.end();
    const r = new BinaryReader(await reply);
    let found = false;
    while (r.pos < r.len) {
      const [field, wt] = r.tag();
      if (field === 4 && wt === WireType.LengthDelimited) found = true; // file_descriptor_response
      r.skip(wt);
    }
    return found;
  } finally {
    client.close();
  }
}
