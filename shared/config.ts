// The one body of every compile*Config: parse with the service's zod schema (which holds the
// defaults), or fail naming the first wrong field.
import type { z } from 'zod';
import { InvalidArgumentError } from './errors.ts';

/** Validates `input` against `schema` and fills its defaults; errors read `<what> config: <field>: <problem>`. */
export function compileConfig<S extends z.ZodType>(what: string, schema: S, input: z.input<S>): z.output<S> {
  const r = schema.safeParse(input);
  if (!r.success) {
    const issue = r.error.issues[0];
    const field = issue.path.join('.');
    throw new InvalidArgumentError(`${what} config: ${field}: ${issue.message}`, { field });
  }
  return r.data;
}

/**
 * The default a schema declares for one field (its `.default()`), so a CLI can show it in --help
 * without a copy of its own. Throws for a field without a default.
 */
export function fieldDefault<S extends z.ZodObject, K extends keyof S['shape'] & string>(schema: S, key: K): z.output<S['shape'][K]> {
  const field = schema.shape[key] as z.ZodType;
  const r = field.safeParse(undefined);
  if (!r.success) throw new Error(`config field ${key} has no default`);
  return r.data as z.output<S['shape'][K]>;
}
