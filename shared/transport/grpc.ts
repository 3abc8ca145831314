// gRPC server plumbing shared by every ditpipe gRPC server: standard health checking
// (grpc.health.v1, via grpc-health-check) and server reflection (v1 and v1alpha, via
// @grpc/reflection) from the descriptor set that `npm run gen` writes to shared/gen/descriptor.binpb,
// plus the health and reflection protos themselves, so reflection lists all the server serves.
//
//   const server = new grpc.Server();
//   server.addService(SamplerService, impl);
//   const health = addHealthAndReflection(server, ['ditpipe.v1.Sampler']);
//   ...on SIGTERM: health.setStatus('', 'NOT_SERVING'); ...
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

import type { Server } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import { HealthImplementation } from 'grpc-health-check';

import { InvalidArgumentError } from '../errors.ts';

const DESCRIPTOR_URL = new URL('../gen/descriptor.binpb', import.meta.url);

type PackageDefinition = ConstructorParameters<typeof ReflectionService>[0];

let descriptorFiles: Uint8Array[] | undefined;

/** The encoded FileDescriptorProtos of shared/gen/descriptor.binpb (field 1 of a FileDescriptorSet). */
export function descriptorFileProtos(): Uint8Array[] {
  if (descriptorFiles) return descriptorFiles;
  const reader = new BinaryReader(readFileSync(DESCRIPTOR_URL));
  const files: Uint8Array[] = [];
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) files.push(reader.bytes());
    else reader.skip(wireType);
  }
  descriptorFiles = files;
  return files;
}

/** Fully-qualified names of the services in ditpipe's protos (e.g. "ditpipe.v1.Sampler"). */
export const SERVICE_NAMES = {
  sampler: 'ditpipe.v1.Sampler',
  denoiser: 'ditpipe.v1.Denoiser',
  decoder: 'ditpipe.v1.Decoder',
} as const;

/** The standard services every ditpipe gRPC server serves beside its own, as reflection lists them. */
export const STANDARD_SERVICES = ['grpc.health.v1.Health', 'grpc.reflection.v1.ServerReflection', 'grpc.reflection.v1alpha.ServerReflection'] as const;

let standardFiles: Uint8Array[] | undefined;

/**
 * FileDescriptorProtos of the health and reflection protos, from the .proto files the packages
 * implementing them ship (so reflection can describe them, as `grpcurl describe` expects).
 */
function standardFileProtos(): Uint8Array[] {
  if (standardFiles) return standardFiles;
  const require = createRequire(import.meta.url);
  const health = join(dirname(require.resolve('grpc-health-check/package.json')), 'proto');
  const reflection = join(dirname(require.resolve('@grpc/reflection/package.json')), 'build/proto');
  const pkg = loadSync(['health/v1/health.proto', 'grpc/reflection/v1/reflection.proto', 'grpc/reflection/v1alpha/reflection.proto'], { includeDirs: [health, reflection] });
  const seen = new Set<string>();
  standardFiles = [];
  for (const def of Object.values(pkg)) {
    for (const f of (def as { fileDescriptorProtos?: Uint8Array[] }).fileDescriptorProtos ?? []) {
      const key = Buffer.from(f).toString('base64');
      if (!seen.has(key)) standardFiles.push(f);
      seen.add(key);
    }
  }
  return standardFiles;
}

/**
 * Adds grpc.health.v1.Health and server reflection (v1 and v1alpha) to a grpc-js server. Every
 * name in serviceNames, and the overall server (""), starts SERVING; set them NOT_SERVING on
 * shutdown through the returned HealthImplementation. Reflection lists every service the server
 * serves: serviceNames plus STANDARD_SERVICES, each with its descriptors.
 */
export function addHealthAndReflection(server: Server, serviceNames: readonly string[]): HealthImplementation {
  const files = descriptorFileProtos();
  const status: Record<string, 'SERVING'> = { '': 'SERVING' };
  for (const name of serviceNames) {
    if (!/^[A-Za-z_][\w.]*$/.test(name)) {
      throw new InvalidArgumentError(`service name must be fully qualified like ditpipe.v1.Sampler, got ${JSON.stringify(name)}`, {
        field: 'serviceNames',
      });
    }
    status[name] = 'SERVING';
  }
  const health = new HealthImplementation(status);
  health.addToServer(server);
  // @grpc/reflection only reads `fileDescriptorProtos` from the package definition's entries.
  const pkg = { ditpipe: { fileDescriptorProtos: files }, standard: { fileDescriptorProtos: standardFileProtos() } } as unknown as PackageDefinition;
  new ReflectionService(pkg, { services: [...serviceNames, ...STANDARD_SERVICES] }).addToServer(server);
  return health;
}
