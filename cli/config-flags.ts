// Service flags whose defaults live in the service's config schema: --help shows the schema's
// default (schedulerConfigDefault and friends), and the command passes a flag on only when the
// user set it (command line or environment), so compile*Config fills the rest from the schema.
import type { Command } from 'commander';

/** `o[key]` when the user set the flag, undefined when it holds the --help default. */
export function userSet<O extends object, K extends keyof O & string>(cmd: Command, o: O, key: K): O[K] | undefined {
  return cmd.getOptionValueSource(key) === 'default' ? undefined : o[key];
}
