/** gRPC status code INVALID_ARGUMENT, so services can map the error without a lookup table. */
const INVALID_ARGUMENT = 3;

/** A sampling request or tensor that cannot be used; `field` names what was wrong. */
export class DiffusionInputError extends Error {
  readonly grpcCode = INVALID_ARGUMENT;
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
    this.name = 'DiffusionInputError';
  }
}
