// Why a NATS connection could not be made, in words a person can act on. nats.js reports a TLS
// mismatch as a bare certificate error, or not at all (a server that wants a client certificate
// just stops talking, and the attempt times out); retrying those never helps, so connectNats()
// asks here whether a failure is a configuration problem (fail at once) or the server not being
// there yet (retry until the deadline).
import { connect as tcpConnect } from 'node:net';
import { AuthorizationError } from '@nats-io/transport-node';
import { type DitpipeError, FailedPreconditionError, UnauthenticatedError } from '../errors.ts';

/** The fields of a nats-server INFO line that matter here. */
export interface NatsServerInfo {
  tls_required?: boolean;
  tls_verify?: boolean;
  auth_required?: boolean;
}

/**
 * Reads the INFO line a nats-server sends in plain text to every new client, before any TLS
 * handshake: it says whether the server requires TLS and client certificates. Null when nothing
 * answered like a nats-server within timeoutMs.
 */
export function probeNatsInfo(url: string, timeoutMs = 2_000): Promise<NatsServerInfo | null> {
  let host: string;
  let port: number;
  try {
    const u = new URL(/^[a-z]+:\/\//i.test(url) ? url : `nats://${url}`);
    host = u.hostname.replace(/^\[|\]$/g, '');
    port = Number(u.port || 4222);
  } catch {
    return Promise.resolve(null);
  }
  return new Promise((resolve) => {
    let buf = '';
    const socket = tcpConnect({ host, port });
    const done = (v: NatsServerInfo | null): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(v);
    };
    const timer = setTimeout(() => done(null), timeoutMs);
    socket.on('error', () => done(null));
    socket.on('data', (chunk) => {
      buf += chunk.toString('latin1');
      const nl = buf.indexOf('\n');
      if (nl < 0 && buf.length < 64 * 1024) return;
      const m = /^INFO\s+(\{.*\})\s*$/.exec(buf.slice(0, nl < 0 ? undefined : nl).trim());
      try {
        done(m ? (JSON.parse(m[1]) as NatsServerInfo) : null);
      } catch {
        done(null);
      }
    });
  });
}

export interface ConnectContext {
  /** The server URL(s), for messages. */
  where: string;
  /** The first URL, to probe. */
  first: string;
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
}

const TLS_ERROR = /certificate|\bTLS\b|\bSSL\b|self[- ]signed|altname|handshake/i;

/**
 * A DitpipeError when the failure is a configuration problem that waiting will not fix (wrong
 * credentials, TLS mismatch); null when it may be a server not up yet (refused, timed out).
 */
export async function diagnoseConnectError(err: unknown, ctx: ConnectContext): Promise<DitpipeError | null> {
  const e = err as Error & { code?: string };
  const msg = e?.message ?? String(err);
  const code = typeof e?.code === 'string' ? e.code : '';
  if (err instanceof AuthorizationError || /authoriz|authentic/i.test(msg)) {
    return new UnauthenticatedError(`NATS at ${ctx.where} refused the credentials: ${msg}`, { cause: err });
  }
  if (/does not support 'tls'/.test(msg)) {
    return new FailedPreconditionError(
      `NATS at ${ctx.where} does not use TLS, but TLS is configured (--nats-tls-ca/--nats-tls-cert/--nats-tls-key): drop them or enable TLS on the server`,
      { cause: err },
    );
  }
  if (/CERTIFICATE_REQUIRED/i.test(code) || /certificate required/i.test(msg)) {
    return new FailedPreconditionError(
      `NATS at ${ctx.where} requires a client certificate (mutual TLS): give --nats-tls-cert and --nats-tls-key (NATS_TLS_CERT, NATS_TLS_KEY)`,
      { cause: err },
    );
  }
  if (TLS_ERROR.test(msg) || /^ERR_TLS|^ERR_SSL|CERT|_SIGNATURE$|ISSUER/.test(code)) {
    if (/altname|hostname|Host: /i.test(msg) || code === 'ERR_TLS_CERT_ALTNAME_INVALID') {
      return new FailedPreconditionError(
        `TLS to NATS at ${ctx.where} failed: the server's certificate does not name the host in the URL (${msg})`,
        { cause: err },
      );
    }
    if (!ctx.tls?.caFile) {
      return new FailedPreconditionError(
        `NATS at ${ctx.where} uses TLS with a certificate this process does not trust (${msg}): give the CA that signed it with --nats-tls-ca (NATS_TLS_CA)`,
        { cause: err },
      );
    }
    return new FailedPreconditionError(
      `TLS to NATS at ${ctx.where} failed: ${msg} (is the server's certificate signed by the CA in ${ctx.tls.caFile}?)`,
      { cause: err },
    );
  }
  // A server that wants a client certificate it did not get (or did not accept) drops the
  // handshake without a word; its INFO line tells.
  if (ctx.tls && /timeout|timed out/i.test(`${e?.name} ${msg}`)) {
    const info = await probeNatsInfo(ctx.first);
    if (info?.tls_verify && !ctx.tls.certFile) {
      return new FailedPreconditionError(
        `NATS at ${ctx.where} requires a client certificate (mutual TLS): give --nats-tls-cert and --nats-tls-key (NATS_TLS_CERT, NATS_TLS_KEY)`,
        { cause: err },
      );
    }
    if (info?.tls_verify) {
      return new FailedPreconditionError(
        `NATS at ${ctx.where} did not complete the TLS handshake with the client certificate ${ctx.tls.certFile}: is it signed by a CA the server trusts?`,
        { cause: err },
      );
    }
  }
  return null;
}
