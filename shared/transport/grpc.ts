// gRPC server plumbing shared by every ditpipe gRPC server: standard health checking
// (grpc.health.v1, via grpc-health-check) and server reflection (v1 and v1alpha, via
// @grpc/reflection) from the descriptor set that `npm run gen` writes to shared/gen/descriptor.binpb.
//
//   const server = new grpc.Server();
//   server.addService(SamplerService, impl);
//   const health = addHealthAndReflection(server, ['ditpipe.v1.Sampler']);
//   ...on SIGTERM: health.setStatus('', 'NOT_SERVING'); ...
import { readFileSync } from 'node:fs';

import type { Server } from '@grpc/grpc-js';
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

/**
 * Adds grpc.health.v1.Health and server reflection to a grpc-js server. Every name in
 * serviceNames, and the overall server (""), starts SERVING; set them NOT_SERVING on shutdown
 * through the returned HealthImplementation. Reflection lists exactly serviceNames.
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
  const pkg = { ditpipe: { fileDescriptorProtos: files } } as unknown as PackageDefinition;
  new ReflectionService(pkg, { services: [...serviceNames] }).addToServer(server);
  return health;
}
