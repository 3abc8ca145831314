// Bearer-token authentication of gRPC calls (`authorization: Bearer <token>` metadata).
//
// Tokens come from a file (one per line, optionally followed by the services or methods it may
// call) or a comma-separated environment variable; they are kept only as SHA-256 digests and
// compared in constant time against every configured token, so neither timing nor logs reveal
// one. A call without a valid token gets UNAUTHENTICATED; a valid token used for a method outside
// its scope gets PERMISSION_DENIED.
//
//   # tokens file: <token> [scope ...]   scope = package.Service or package.Service/Method
//   3b1f...e9   ditpipe.v1.Sampler
//   77aa...04   ditpipe.v1.Sampler/ListModels
//   c0de...42                        (no scope: every method)
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Metadata } from '@grpc/grpc-js';
import { Code, InvalidArgumentError } from '../errors.ts';

/** Shortest token accepted: shorter ones are guessable. */
export const MIN_TOKEN_LENGTH = 16;

interface Entry {
  digest: Buffer;
  /** Full service names ("ditpipe.v1.Sampler") or method paths ("ditpipe.v1.Sampler/ListModels"); empty = all. */
  scopes: string[];
}

export interface AuthVerdict {
  code: typeof Code.UNAUTHENTICATED | typeof Code.PERMISSION_DENIED;
  details: string;
}

const digest = (token: string): Buffer => createHash('sha256').update(token, 'utf8').digest();

export class TokenSet {
  private constructor(private readonly entries: Entry[]) {}

  /** Parses the tokens file format (see the header); errors name the source and line, never the token. */
  static parse(text: string, source: string): TokenSet {
    const entries: Entry[] = [];
    text.split(/\r?\n/).forEach((raw, i) => {
      const line = raw.replace(/(^|\s)#.*$/, '').trim();
      if (!line) return;
      const [token, ...scopes] = line.split(/\s+/);
      if (token.length < MIN_TOKEN_LENGTH) {
        throw new InvalidArgumentError(`${source} line ${i + 1}: a token must have at least ${MIN_TOKEN_LENGTH} characters`, {
          field: 'tokens',
        });
      }
      for (const s of scopes) {
        if (!/^[A-Za-z_][\w.]*(\/[A-Za-z_]\w*)?$/.test(s)) {
          throw new InvalidArgumentError(
            `${source} line ${i + 1}: scope ${JSON.stringify(s)} is not package.Service or package.Service/Method`,
            { field: 'tokens' },
          );
        }
      }
      entries.push({ digest: digest(token), scopes });
    });
    if (entries.length === 0) throw new InvalidArgumentError(`${source}: no tokens (one per line)`, { field: 'tokens' });
    return new TokenSet(entries);
  }

  static fromFile(path: string): TokenSet {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (err) {
      throw new InvalidArgumentError(
        `tokens file ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`,
        { field: 'tokens' },
      );
    }
    return TokenSet.parse(text, `tokens file ${path}`);
  }

  /** Comma-separated tokens with access to every method (the environment-variable form). */
  static fromList(list: string, source: string): TokenSet {
    return TokenSet.parse(list.split(',').join('\n'), source);
  }

  /** Both sets' tokens. */
  static union(a: TokenSet, b: TokenSet): TokenSet {
    return new TokenSet([...a.entries, ...b.entries]);
  }

  get size(): number {
    return this.entries.length;
  }

  /** null when the call may proceed; otherwise the status to answer it with. `path` is "/pkg.Service/Method". */
  check(path: string, metadata: Metadata): AuthVerdict | null {
    const values = metadata.get('authorization');
    if (values.length === 0) {
      return { code: Code.UNAUTHENTICATED, details: `${path} needs a bearer token: send the metadata "authorization: Bearer <token>"` };
    }
    const header = values.length === 1 && typeof values[0] === 'string' ? values[0] : '';
    const m = /^Bearer[ \t]+(\S+)\s*$/i.exec(header);
    if (!m) return { code: Code.UNAUTHENTICATED, details: 'the authorization metadata must be "Bearer <token>"' };
    const presented = digest(m[1]);
    // Every entry is compared, whichever matches, so the time taken says nothing about the tokens.
    let match: Entry | undefined;
    for (const e of this.entries) {
      if (timingSafeEqual(presented, e.digest) && !match) match = e;
    }
    if (!match) return { code: Code.UNAUTHENTICATED, details: 'the bearer token is not valid' };
    const method = path.replace(/^\//, '');
    const service = method.split('/')[0];
    if (match.scopes.length > 0 && !match.scopes.includes(service) && !match.scopes.includes(method)) {
      return { code: Code.PERMISSION_DENIED, details: `this token may not call ${path} (its scope: ${match.scopes.join(', ')})` };
    }
    return null;
  }
}
