// Server errors in the words of the command line. The scheduler names GenerateRequest fields
// (`class_labels`, `cfg_scale`) and proto enum values (`SAMPLER_KIND_DDIM`); a user of
// `ditpipe generate` typed flags (`--class`, `--num`, `--cfg`) and CLI values (`ddim`). This table
// is the one place that maps the one onto the other.
import { InvalidArgumentError, type DitpipeError } from '../shared/errors.ts';
import { GuidanceChannels } from '../shared/gen/ditpipe/v1/common.ts';
import { SamplerKind } from '../shared/gen/ditpipe/v1/sampler.ts';
import { SAMPLER_KINDS } from '../shared/sampler-kinds.ts';

/** GenerateRequest field (as `ditpipe-field` names it, indices dropped) → the generate flag(s) that set it. */
export const GENERATE_FLAGS: Readonly<Record<string, string>> = {
  model: '--model',
  class_labels: '--class × --num',
  'class_labels[]': '--class',
  num_steps: '--steps',
  sampler: '--sampler',
  cfg_scale: '--cfg',
  guidance_channels: '--guidance-channels',
  eta: '--eta',
  seed: '--seed',
  cache_policy: '--no-cache',
};

/** CLI values of the enums generate sets (the flag's choices). */
export const SAMPLER_FLAGS: Readonly<Record<string, SamplerKind>> = SAMPLER_KINDS;
export const GUIDANCE_FLAGS: Readonly<Record<string, GuidanceChannels>> = {
  '3': GuidanceChannels.GUIDANCE_CHANNELS_THREE,
  all: GuidanceChannels.GUIDANCE_CHANNELS_ALL,
};

const ENUM_WORDS = new Map<string, string>([
  ...Object.entries(SAMPLER_FLAGS).map(([v, k]): [string, string] => [SamplerKind[k], `--sampler ${v}`]),
  ...Object.entries(GUIDANCE_FLAGS).map(([v, k]): [string, string] => [GuidanceChannels[k], `--guidance-channels ${v}`]),
]);

/** A command-line argument the user must change; the message names the flag. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/**
 * The flag-worded form of a server error about a request field; other errors unchanged. Field
 * names in the message become the flags (`class_labels asks for 100 images` → `--class × --num
 * asks for 100 images`), enum names become CLI values (`SAMPLER_KIND_DDIM` → `--sampler ddim`).
 */
export function inCliTerms(err: DitpipeError): Error {
  if (!(err instanceof InvalidArgumentError)) return err;
  const flagOf = (field: string): string | undefined => GENERATE_FLAGS[field.replace(/\[\d+\]$/, '[]')];
  let named = false;
  let message = err.message;
  for (const [name, words] of ENUM_WORDS) message = message.replaceAll(name, words);
  // Snake-case words are request fields; so is a plain field name that starts the message.
  message = message.replace(/^(?:model|sampler|seed|eta)\b|\b[a-z]+(?:_[a-z]+)+(?:\[\d+\])?/g, (m) => {
    const flag = flagOf(m);
    if (flag) named = true;
    return flag ?? m;
  });
  const flag = err.field === undefined ? undefined : flagOf(err.field);
  return new UsageError(named || !flag ? message : `${flag}: ${message}`);
}
