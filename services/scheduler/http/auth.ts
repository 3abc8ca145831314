// Bearer tokens for the HTTP API (Authorization: Bearer <token>): the same TokenSet, with the same
// constant-time check and scopes, as the gRPC server's (shared/server/auth.ts). The HTTP API is the
// Sampler API by another route, so a token scoped to ditpipe.v1.Sampler (or its Generate /
// ListModels methods) may use the matching HTTP routes.
import type { IncomingMessage } from 'node:http';
import { Metadata } from '@grpc/grpc-js';
import { Code, PermissionDeniedError, UnauthenticatedError } from '../../../shared/errors.ts';
import type { TokenSet } from '../../../shared/server/auth.ts';
import type { HttpAuthorize } from './config.ts';

/** The Sampler method an HTTP route stands for, for token scopes. */
function methodOf(req: IncomingMessage): string {
  const path = (req.url ?? '').split('?')[0];
  return path.startsWith('/v1/images') ? '/ditpipe.v1.Sampler/Generate' : '/ditpipe.v1.Sampler/ListModels';
}

export function bearerTokens(tokens: TokenSet): HttpAuthorize {
  return (req) => {
    const md = new Metadata();
    const header = req.headers.authorization;
    if (header !== undefined) md.set('authorization', header);
    const verdict = tokens.check(methodOf(req), md);
    if (verdict === null) return;
    const message = verdict.details
      .replace(/the metadata "authorization: Bearer <token>"/, 'the header "Authorization: Bearer <token>"')
      .replace('authorization metadata', 'Authorization header');
    throw verdict.code === Code.PERMISSION_DENIED ? new PermissionDeniedError(message) : new UnauthenticatedError(message);
  };
}
