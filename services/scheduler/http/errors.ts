// ditpipe's typed errors as HTTP answers in OpenAI's error shape:
//   { "error": { "message": "...", "type": "invalid_request_error", "param": "ditpipe.steps", "code": "invalid_argument" } }
// One table maps gRPC status codes to HTTP statuses (Google's mapping, google/rpc/code.proto), so
// the HTTP API fails exactly where and how the gRPC API does.
import {
  Code,
  type DitpipeError,
  InvalidArgumentError,
  PayloadTooLargeError,
  codeName,
  errorField,
  toDitpipeError,
} from '../../../shared/errors.ts';

interface Row {
  status: number;
  /** OpenAI's error `type`. */
  type: string;
}

const TABLE: Record<number, Row> = {
  [Code.INVALID_ARGUMENT]: { status: 400, type: 'invalid_request_error' },
  [Code.FAILED_PRECONDITION]: { status: 400, type: 'invalid_request_error' },
  [Code.OUT_OF_RANGE]: { status: 400, type: 'invalid_request_error' },
  [Code.UNAUTHENTICATED]: { status: 401, type: 'authentication_error' },
  [Code.PERMISSION_DENIED]: { status: 403, type: 'permission_error' },
  [Code.NOT_FOUND]: { status: 404, type: 'invalid_request_error' },
  [Code.ALREADY_EXISTS]: { status: 409, type: 'invalid_request_error' },
  [Code.ABORTED]: { status: 409, type: 'server_error' },
  [Code.RESOURCE_EXHAUSTED]: { status: 429, type: 'rate_limit_error' },
  // nginx's "client closed request": the client is usually gone, but a status must be chosen.
  [Code.CANCELLED]: { status: 499, type: 'request_cancelled' },
  [Code.UNKNOWN]: { status: 500, type: 'server_error' },
  [Code.INTERNAL]: { status: 500, type: 'server_error' },
  [Code.DATA_LOSS]: { status: 500, type: 'server_error' },
  [Code.UNIMPLEMENTED]: { status: 501, type: 'server_error' },
  [Code.UNAVAILABLE]: { status: 503, type: 'server_error' },
  [Code.DEADLINE_EXCEEDED]: { status: 504, type: 'server_error' },
};

/** The gRPC request field names the scheduler reports, as the HTTP request spells them. */
const PARAMS: Array<[RegExp, string]> = [
  [/^class_labels\[\d+\]$/, 'prompt'],
  [/^class_labels$/, 'n'],
  [/^num_steps$/, 'ditpipe.steps'],
  [/^sampler$/, 'ditpipe.sampler'],
  [/^cfg_scale$/, 'ditpipe.cfg_scale'],
  [/^guidance_channels$/, 'ditpipe.guidance_channels'],
  [/^eta$/, 'ditpipe.eta'],
  [/^seed$/, 'ditpipe.seed'],
  [/^preview(\.method)?$/, 'ditpipe.preview'],
];

export function httpParam(field: string): string {
  // step_cache.<field> is spelled the same inside the ditpipe object.
  if (/^step_cache(\.|$)/.test(field)) return `ditpipe.${field}`;
  for (const [re, param] of PARAMS) if (re.test(field)) return param;
  return field;
}

export interface HttpError {
  status: number;
  headers: Record<string, string>;
  body: { error: { message: string; type: string; param: string | null; code: string } };
}

/**
 * The HTTP answer for any thrown value. INVALID_ARGUMENT names the request field in `param`, and the
 * scheduler's message names it as the HTTP request spells it;
 * RESOURCE_EXHAUSTED (429) and UNAVAILABLE (503) say when to retry.
 */
export function httpError(err: unknown, opts: { retryAfterS: number }): HttpError {
  const e: DitpipeError = toDitpipeError(err);
  const row = TABLE[e.code] ?? { status: 500, type: 'server_error' };
  let status = row.status;
  const headers: Record<string, string> = {};
  if (e instanceof PayloadTooLargeError) status = 413;
  else if (e.code === Code.RESOURCE_EXHAUSTED || e.code === Code.UNAVAILABLE) headers['retry-after'] = String(opts.retryAfterS);
  if (e.code === Code.UNAUTHENTICATED) headers['www-authenticate'] = 'Bearer';
  const field = errorField(e);
  const param = field === undefined ? null : httpParam(field);
  let message = e.message;
  if (param !== null && field !== undefined && param !== field) {
    // "num_steps must be …" → "ditpipe.steps must be …"; messages that do not start with the field get it in front.
    message = message.startsWith(field) ? `${param}${message.slice(field.length)}` : `${param}: ${message}`;
  }
  return { status, headers, body: { error: { message, type: row.type, param, code: codeName(e.code).toLowerCase() } } };
}

/** A malformed HTTP request (body shape, not a value the scheduler judges). */
export function badRequest(message: string, param: string | null): InvalidArgumentError {
  return new InvalidArgumentError(message, { field: param ?? undefined });
}
