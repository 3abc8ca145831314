/**
 * A sampling request or tensor that cannot be used; `field` names what was wrong. The diffusion
 * math knows nothing of gRPC: the scheduler turns it into an InvalidArgumentError for the field.
 */
export class DiffusionInputError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
    this.name = 'DiffusionInputError';
  }
}
