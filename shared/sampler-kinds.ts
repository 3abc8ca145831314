// The sampler registry (shared/diffusion/sampler/) meets the wire: each sampler names its
// SamplerKind value, and this module maps between the two. It checks at load that the registry and
// the proto enum agree, so a sampler without its enum value, or an enum value without its sampler,
// fails every test instead of answering INVALID_ARGUMENT in production.
import { DEFAULT_SAMPLER, SAMPLERS, samplerByName, samplerByProtoKind, type SamplerName } from './diffusion/sampler/registry.ts';
import type { SamplerDef } from './diffusion/sampler/types.ts';
import { SamplerKind } from './gen/ditpipe/v1/sampler.ts';

const kindValue = (name: string): number | undefined => {
  const v = (SamplerKind as unknown as Record<string, number | string>)[name];
  return typeof v === 'number' ? v : undefined;
};

for (const s of SAMPLERS) {
  if (kindValue(s.protoKind) === undefined)
    throw new Error(`sampler '${s.name}' names ${s.protoKind}, which proto/ditpipe/v1/sampler.proto's SamplerKind lacks`);
}
for (const [name, v] of Object.entries(SamplerKind as unknown as Record<string, number | string>)) {
  if (typeof v !== 'number' || v <= 0) continue; // UNSPECIFIED (0), UNRECOGNIZED (-1), reverse entries
  if (!samplerByProtoKind(name)) throw new Error(`SamplerKind ${name} has no sampler in shared/diffusion/sampler/registry.ts`);
}

/** The sampler a request's SamplerKind asks for (UNSPECIFIED: the default); undefined for an unknown value. */
export function samplerOfKind(kind: SamplerKind): SamplerDef<SamplerName> | undefined {
  if (kind === SamplerKind.SAMPLER_KIND_UNSPECIFIED) return samplerByName(DEFAULT_SAMPLER);
  const name = SamplerKind[kind] as string | undefined;
  return name === undefined ? undefined : samplerByProtoKind(name);
}

/** The SamplerKind value of a sampler name. */
export function kindOfSampler(name: SamplerName): SamplerKind {
  const def = samplerByName(name);
  if (!def) throw new RangeError(`unknown sampler '${name}'`);
  return kindValue(def.protoKind) as SamplerKind;
}

/** Sampler name → SamplerKind, for the CLIs and the load-test worker. */
export const SAMPLER_KINDS: Readonly<Record<SamplerName, SamplerKind>> = Object.fromEntries(
  SAMPLERS.map((s) => [s.name, kindOfSampler(s.name)]),
) as Record<SamplerName, SamplerKind>;
