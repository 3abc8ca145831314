// The gRPC "richer error model": a google.rpc.Status in the `grpc-status-details-bin` trailer, with
// typed details packed in google.protobuf.Any (https://google.aip.dev/193). ditpipe sends one
// detail, google.rpc.RetryInfo, with RESOURCE_EXHAUSTED, as Google APIs do, so clients in any
// language back off for the time the server suggests instead of spinning.
//
// The three messages are small and fixed, so they are encoded here with @bufbuild/protobuf's wire
// primitives rather than generated:
//   google.rpc.Status    { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
//   google.protobuf.Any  { string type_url = 1; bytes value = 2; }
//   google.rpc.RetryInfo { google.protobuf.Duration retry_delay = 1; }
//   google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2; }
import { BinaryReader, BinaryWriter, WireType } from '@bufbuild/protobuf/wire';

/** Trailer key of the serialized google.rpc.Status. */
export const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
export const RETRY_INFO_TYPE = 'type.googleapis.com/google.rpc.RetryInfo';

export interface AnyMessage {
  typeUrl: string;
  value: Uint8Array;
}

export interface RpcStatus {
  code: number;
  message: string;
  details: AnyMessage[];
}

export function encodeRpcStatus(s: RpcStatus): Uint8Array {
  const w = new BinaryWriter();
  if (s.code !== 0) w.uint32((1 << 3) | WireType.Varint).int32(s.code);
  if (s.message) w.uint32((2 << 3) | WireType.LengthDelimited).string(s.message);
  for (const d of s.details) {
    const any = new BinaryWriter()
      .uint32((1 << 3) | WireType.LengthDelimited)
      .string(d.typeUrl)
      .uint32((2 << 3) | WireType.LengthDelimited)
      .bytes(d.value)
      .finish();
    w.uint32((3 << 3) | WireType.LengthDelimited).bytes(any);
  }
  return w.finish();
}

/** Parses a google.rpc.Status; throws on malformed bytes (the caller decides what that means). */
export function decodeRpcStatus(bytes: Uint8Array): RpcStatus {
  const r = new BinaryReader(bytes);
  const out: RpcStatus = { code: 0, message: '', details: [] };
  while (r.pos < r.len) {
    const [field, wt] = r.tag();
    if (field === 1 && wt === WireType.Varint) out.code = r.int32();
    else if (field === 2 && wt === WireType.LengthDelimited) out.message = r.string();
    else if (field === 3 && wt === WireType.LengthDelimited) {
      const a = new BinaryReader(r.bytes());
      const any: AnyMessage = { typeUrl: '', value: new Uint8Array(0) };
      while (a.pos < a.len) {
        const [f, t] = a.tag();
        if (f === 1 && t === WireType.LengthDelimited) any.typeUrl = a.string();
        else if (f === 2 && t === WireType.LengthDelimited) any.value = a.bytes();
        else a.skip(t);
      }
      out.details.push(any);
    } else r.skip(wt);
  }
  return out;
}

/** A google.rpc.RetryInfo detail asking the client to wait `ms` milliseconds. */
export function retryInfo(ms: number): AnyMessage {
  const total = Math.max(0, Math.round(ms));
  const seconds = Math.floor(total / 1000);
  const nanos = (total % 1000) * 1_000_000;
  const d = new BinaryWriter();
  if (seconds) d.uint32((1 << 3) | WireType.Varint).int64(seconds);
  if (nanos) d.uint32((2 << 3) | WireType.Varint).int32(nanos);
  const value = new BinaryWriter()
    .uint32((1 << 3) | WireType.LengthDelimited)
    .bytes(d.finish())
    .finish();
  return { typeUrl: RETRY_INFO_TYPE, value };
}

/** The retry delay of a RetryInfo detail in milliseconds, or undefined when the status has none. */
export function retryDelayMs(status: RpcStatus): number | undefined {
  const d = status.details.find((x) => x.typeUrl === RETRY_INFO_TYPE);
  if (!d) return undefined;
  const r = new BinaryReader(d.value);
  let ms = 0;
  while (r.pos < r.len) {
    const [f, t] = r.tag();
    if (f === 1 && t === WireType.LengthDelimited) {
      const dur = new BinaryReader(r.bytes());
      while (dur.pos < dur.len) {
        const [g, u] = dur.tag();
        if (g === 1 && u === WireType.Varint) ms += Number(dur.int64()) * 1000;
        else if (g === 2 && u === WireType.Varint) ms += dur.int32() / 1_000_000;
        else dur.skip(u);
      }
    } else r.skip(t);
  }
  return ms;
}
