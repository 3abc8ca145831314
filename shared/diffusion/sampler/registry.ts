// The samplers, one line each. Adding one: its SamplerKind value in proto/ditpipe/v1/sampler.proto
// (then `npm run gen`), its file in this folder, and its line here.
import { ddim } from './ddim.ts';
import { ddpm } from './ddpm.ts';
import { dpmpp } from './dpmpp.ts';
import { eulerAncestral } from './euler-ancestral.ts';
import type { SamplerDef } from './types.ts';

export const SAMPLERS = [ddpm, ddim, dpmpp, eulerAncestral] as const;

export type SamplerName = (typeof SAMPLERS)[number]['name'];

/** Sampler names in registry order, e.g. for CLI choices and schema enums. */
export const SAMPLER_NAMES = SAMPLERS.map((s) => s.name) as unknown as readonly [SamplerName, ...SamplerName[]];

/** The sampler a request gets when it names none. */
export const DEFAULT_SAMPLER: SamplerName = 'ddpm';

const byName = new Map<string, SamplerDef<SamplerName>>(SAMPLERS.map((s) => [s.name, s]));
const byProtoKind = new Map<string, SamplerDef<SamplerName>>(SAMPLERS.map((s) => [s.protoKind, s]));

export function samplerByName(name: string): SamplerDef<SamplerName> | undefined {
  return byName.get(name);
}

/** By the SamplerKind value's name (`SamplerKind[kind]`); the caller maps UNSPECIFIED to the default. */
export function samplerByProtoKind(kindName: string): SamplerDef<SamplerName> | undefined {
  return byProtoKind.get(kindName);
}

/** `'a', 'b' or 'c'`, for error messages. */
export function samplerList(quote = "'"): string {
  const q = SAMPLER_NAMES.map((n) => `${quote}${n}${quote}`);
  return q.length === 1 ? q[0] : `${q.slice(0, -1).join(', ')} or ${q[q.length - 1]}`;
}

/** Names of the samplers that accept an option. */
export function samplersWithOption(option: keyof SamplerDef['options']): SamplerDef<SamplerName>[] {
  const all: readonly SamplerDef<SamplerName>[] = SAMPLERS;
  return all.filter((s) => s.options[option] !== undefined);
}
