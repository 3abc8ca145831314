// A ready-made HttpAuthorize: bearer tokens (Authorization: Bearer <token>), compared in constant
// time over their SHA-256 digests so neither content nor length leaks through timing.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { UnauthenticatedError } from '../../../shared/errors.ts';
import type { HttpAuthorize } from './config.ts';

const digest = (s: string): Buffer => createHash('sha256').update(s, 'utf8').digest();

export function bearerTokens(tokens: readonly string[]): HttpAuthorize {
  if (tokens.length === 0 || tokens.some((t) => t.length === 0)) throw new Error('bearerTokens: give at least one non-empty token');
  const known = tokens.map(digest);
  return (req: IncomingMessage) => {
    const header = req.headers.authorization;
    if (!header) throw new UnauthenticatedError('missing "Authorization: Bearer <token>" header');
    const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (!m) throw new UnauthenticatedError('the Authorization header must be "Bearer <token>"');
    const d = digest(m[1]);
    let ok = false;
    for (const k of known) ok = timingSafeEqual(k, d) || ok;
    if (!ok) throw new UnauthenticatedError('the bearer token is not valid');
  };
}
