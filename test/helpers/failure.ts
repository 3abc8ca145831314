// The error a call failed with, for tests that check its code, field and message.
import type { DitpipeError } from '../../shared/errors.ts';

/** Awaits `p` and returns the error it rejected with; throws if it resolved. */
export async function failureOf(p: Promise<unknown>): Promise<DitpipeError> {
  try {
    await p;
  } catch (err) {
    return err as DitpipeError;
  }
  throw new Error('expected the call to fail');
}
