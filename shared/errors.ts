// Errors of ditpipe: one class per failure mode, each carrying a gRPC status code.
//
// Errors cross process boundaries as data: over gRPC as a status (code + details, plus the
// `ditpipe-error` metadata key naming the class and, for INVALID_ARGUMENT, `ditpipe-field` naming
// the request field), over NATS as headers (see shared/transport/rpc.ts). `errorFromStatus()`
// rebuilds the typed error on the other side, so `err instanceof UnavailableError` works wherever
// the error was raised.
//
//   throw new InvalidArgumentError('cfg_scale must be finite and >= 1, got NaN', { field: 'cfg_scale' });
//   callback(toServiceError(err));            // grpc-js unary handler
//   call.emit('error', toServiceError(err));  // grpc-js server-streaming handler (destroy() sends no status)
//   const e = fromServiceError(grpcErr);      // grpc-js client
import { Metadata, type ServiceError } from '@grpc/grpc-js';
import { decodeRpcStatus, encodeRpcStatus, retryDelayMs, retryInfo, STATUS_DETAILS_KEY } from './rpc-status.ts';

/** gRPC status codes (numeric values from the gRPC specification). */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;
export type Code = (typeof Code)[keyof typeof Code];

const codeNames = new Map<number, string>(Object.entries(Code).map(([k, v]) => [v, k]));

/** Name of a status code ("UNAVAILABLE"), or "CODE_<n>" for a number outside the table. */
export function codeName(code: number): string {
  return codeNames.get(code) ?? `CODE_${code}`;
}

/** Base class; `kind` is the class name that travels with the error. */
export abstract class DitpipeError extends Error {
  abstract readonly code: Code;
  /** Identifies the subclass on the wire (headers / metadata), e.g. "PayloadTooLarge". */
  abstract readonly kind: string;
  /** Whether a retry of an idempotent call may succeed (UNAVAILABLE, DEADLINE_EXCEEDED per attempt). */
  get retryable(): boolean {
    return false;
  }
}

/** A request field is malformed or out of range; `field` names it when known. */
export class InvalidArgumentError extends DitpipeError {
  readonly code = Code.INVALID_ARGUMENT;
  readonly kind: string = 'InvalidArgument';
  readonly field: string | undefined;
  constructor(message: string, opts: { field?: string; cause?: unknown } = {}) {
    super(message, { cause: opts.cause });
    this.name = 'InvalidArgumentError';
    this.field = opts.field;
  }
}

/** The named model, method or resource does not exist here. */
export class NotFoundError extends DitpipeError {
  readonly code = Code.NOT_FOUND;
  readonly kind: string = 'NotFound';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'NotFoundError';
  }
}

/**
 * Out of capacity (admission control, queue full) or over a size limit. `retryAfterMs`, when set,
 * travels to gRPC clients as a google.rpc.RetryInfo (see shared/rpc-status.ts): how long to wait.
 */
export class ResourceExhaustedError extends DitpipeError {
  readonly code = Code.RESOURCE_EXHAUSTED;
  readonly kind: string = 'ResourceExhausted';
  readonly retryAfterMs: number | undefined;
  constructor(message: string, opts: { cause?: unknown; retryAfterMs?: number } = {}) {
    super(message, { cause: opts.cause });
    this.name = 'ResourceExhaustedError';
    this.retryAfterMs = opts.retryAfterMs;
  }
}

/**
 * A message is larger than the payload limit (configured or the NATS server's max_payload).
 * Raised before sending, so nothing reached the wire.
 */
export class PayloadTooLargeError extends ResourceExhaustedError {
  override readonly kind: string = 'PayloadTooLarge';
  /** Bytes the message would take (body plus headers), when known. */
  readonly size: number | undefined;
  /** The limit it exceeded, when known. */
  readonly limit: number | undefined;
  constructor(message: string, opts: { size?: number; limit?: number; cause?: unknown } = {}) {
    super(message, { cause: opts.cause });
    this.name = 'PayloadTooLargeError';
    this.size = opts.size;
    this.limit = opts.limit;
  }
}

/** No server can take the call right now (no responders, connection lost, shutting down). */
export class UnavailableError extends DitpipeError {
  readonly code = Code.UNAVAILABLE;
  readonly kind: string = 'Unavailable';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'UnavailableError';
  }
  override get retryable(): boolean {
    return true;
  }
}

/**
 * The work queue a call is sent to does not exist on the NATS server (not created yet, or lost
 * with a restarted server's memory store). Callers create it and send again.
 */
export class NoQueueError extends UnavailableError {
  override readonly kind: string = 'NoQueue';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'NoQueueError';
  }
}

/** The call's deadline passed before an answer came. */
export class DeadlineExceededError extends DitpipeError {
  readonly code = Code.DEADLINE_EXCEEDED;
  readonly kind: string = 'DeadlineExceeded';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'DeadlineExceededError';
  }
  override get retryable(): boolean {
    return true;
  }
}

/** The caller cancelled (AbortSignal, gRPC cancellation). */
export class CancelledError extends DitpipeError {
  readonly code = Code.CANCELLED;
  readonly kind: string = 'Cancelled';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'CancelledError';
  }
}

/** The system is not in a state to run the call (e.g. model not loaded yet). */
export class FailedPreconditionError extends DitpipeError {
  readonly code = Code.FAILED_PRECONDITION;
  readonly kind: string = 'FailedPrecondition';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'FailedPreconditionError';
  }
}

/** The method is not implemented by this server. */
export class UnimplementedError extends DitpipeError {
  readonly code = Code.UNIMPLEMENTED;
  readonly kind: string = 'Unimplemented';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'UnimplementedError';
  }
}

/** Credentials missing or rejected (e.g. NATS authorization failed). */
export class UnauthenticatedError extends DitpipeError {
  readonly code = Code.UNAUTHENTICATED;
  readonly kind: string = 'Unauthenticated';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'UnauthenticatedError';
  }
}

/** Credentials valid but not allowed to do this. */
export class PermissionDeniedError extends DitpipeError {
  readonly code = Code.PERMISSION_DENIED;
  readonly kind: string = 'PermissionDenied';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'PermissionDeniedError';
  }
}

/** A bug or an unexpected failure (includes any non-ditpipe error thrown by a handler). */
export class InternalError extends DitpipeError {
  readonly code = Code.INTERNAL;
  readonly kind: string = 'Internal';
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'InternalError';
  }
}

/** A status without a dedicated class (e.g. ABORTED, DATA_LOSS from a foreign server). */
export class StatusError extends DitpipeError {
  readonly code: Code;
  readonly kind: string = 'Status';
  constructor(code: Code, message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'StatusError';
    this.code = code;
  }
}

/**
 * Rebuilds a typed error from a status code, message and (optional) kind and field from the wire.
 * The kind picks a subclass where one code has several (PayloadTooLarge vs ResourceExhausted).
 */
export function errorFromStatus(code: number, message: string, kind?: string, field?: string, retryAfterMs?: number): DitpipeError {
  switch (code) {
    case Code.INVALID_ARGUMENT:
      return new InvalidArgumentError(message, { field: field || undefined });
    case Code.NOT_FOUND:
      return new NotFoundError(message);
    case Code.RESOURCE_EXHAUSTED:
      return kind === 'PayloadTooLarge' ? new PayloadTooLargeError(message) : new ResourceExhaustedError(message, { retryAfterMs });
    case Code.UNAVAILABLE:
      return kind === 'NoQueue' ? new NoQueueError(message) : new UnavailableError(message);
    case Code.DEADLINE_EXCEEDED:
      return new DeadlineExceededError(message);
    case Code.CANCELLED:
      return new CancelledError(message);
    case Code.FAILED_PRECONDITION:
      return new FailedPreconditionError(message);
    case Code.UNIMPLEMENTED:
      return new UnimplementedError(message);
    case Code.UNAUTHENTICATED:
      return new UnauthenticatedError(message);
    case Code.PERMISSION_DENIED:
      return new PermissionDeniedError(message);
    case Code.INTERNAL:
      return new InternalError(message);
    default:
      if (Number.isInteger(code) && codeNames.has(code) && code !== Code.OK) return new StatusError(code as Code, message);
      return new InternalError(`invalid status code ${code} on the wire: ${message}`);
  }
}

/** Any thrown value as a DitpipeError; non-ditpipe errors become InternalError keeping the message. */
export function toDitpipeError(err: unknown): DitpipeError {
  if (err instanceof DitpipeError) return err;
  if (err instanceof Error) return new InternalError(err.message, { cause: err });
  return new InternalError(String(err));
}

/** Metadata key carrying DitpipeError.kind over gRPC. */
export const GRPC_KIND_KEY = 'ditpipe-error';
/** Metadata key carrying InvalidArgumentError.field over gRPC (absent when the field is unknown). */
export const GRPC_FIELD_KEY = 'ditpipe-field';

/** The request field an error is about, if it names one. */
export function errorField(err: DitpipeError): string | undefined {
  return err instanceof InvalidArgumentError ? err.field : undefined;
}

/**
 * Longest status message sent, over gRPC and between the services: grpc-message travels in a
 * header, and a client refuses headers past its metadata limit (8 KiB in grpc-js) with an error
 * that hides the real status.
 */
export const MAX_STATUS_MESSAGE = 1024;

/** `text` cut to `max` characters, saying how long it was. */
export function truncate(text: string, max: number): string {
  if (text.length <= max) return text;
  return `${text.slice(0, Math.max(0, max - 40))}… (${text.length} characters, truncated)`;
}

/**
 * A caller's input quoted for an error message, at most `max` characters of it: error messages
 * echo what was asked for, and a hostile request must not make the answer as large as itself.
 */
export function quoteInput(s: string, max = 64): string {
  if (s.length <= max) return JSON.stringify(s);
  return `${JSON.stringify(s.slice(0, max))}… (${s.length} characters)`;
}

/** Converts any error into a grpc-js ServiceError for a handler's callback or `call.destroy()`. */
export function toServiceError(err: unknown): ServiceError {
  const e = toDitpipeError(err);
  const message = truncate(e.message, MAX_STATUS_MESSAGE);
  const metadata = new Metadata();
  metadata.set(GRPC_KIND_KEY, e.kind);
  const field = errorField(e);
  if (field !== undefined) metadata.set(GRPC_FIELD_KEY, truncate(field, 128));
  if (e instanceof ResourceExhaustedError && e.retryAfterMs !== undefined) {
    metadata.set(STATUS_DETAILS_KEY, Buffer.from(encodeRpcStatus({ code: e.code, message, details: [retryInfo(e.retryAfterMs)] })));
  }
  const out = new Error(`${codeName(e.code)}: ${message}`) as ServiceError;
  out.code = e.code;
  out.details = message;
  out.metadata = metadata;
  return out;
}

/** Rebuilds the typed error from a grpc-js client error. */
export function fromServiceError(err: ServiceError): DitpipeError {
  const text = (key: string): string | undefined => {
    const value = err.metadata?.get(key)[0];
    return typeof value === 'string' ? value : undefined;
  };
  let retryAfterMs: number | undefined;
  const details = err.metadata?.get(STATUS_DETAILS_KEY)[0];
  if (details instanceof Buffer) {
    try {
      retryAfterMs = retryDelayMs(decodeRpcStatus(details));
    } catch {
      retryAfterMs = undefined; // a foreign server's malformed details do not hide its status
    }
  }
  return errorFromStatus(err.code, err.details, text(GRPC_KIND_KEY), text(GRPC_FIELD_KEY), retryAfterMs);
}
