// Entry point of the weight readers: format detection, hashing, and re-exports.
import { closeSync, readSync } from 'node:fs';
import { openForRead } from './decode.ts';
import { createHash } from 'node:crypto';
import { openSafetensors } from './safetensors.ts';
import { openTorchCheckpoint } from './torch.ts';
import { WeightsError, type WeightFile } from './types.ts';
import type { TorchOpenOptions } from './torch.ts';

export * from './types.ts';
export { openSafetensors, writeSafetensors, SafetensorsFile } from './safetensors.ts';
export type { TensorToWrite, TensorData, WritableDType } from './safetensors.ts';
export { openTorchCheckpoint, TorchCheckpoint } from './torch.ts';
export type { TorchOpenOptions } from './torch.ts';

/** Opens safetensors or a torch.save zip checkpoint, chosen by the file's first bytes. */
export function openWeights(path: string, opts?: TorchOpenOptions): WeightFile {
  const fd = openForRead(path);
  const head = new Uint8Array(9);
  let n: number;
  try {
    n = readSync(fd, head, 0, head.length, 0);
  } finally {
    closeSync(fd);
  }
  if (n >= 2 && head[0] === 0x50 && head[1] === 0x4b) return openTorchCheckpoint(path, opts);
  // A safetensors file may start with 0x80 too (a header length of 128 mod 256), so its '{' at
  // byte 8 is checked first. Pre-1.6 torch.save wrote a bare pickle stream (0x80, protocol).
  const jsonHeader = n === 9 && head[8] === 0x7b;
  if (!jsonHeader && n >= 2 && head[0] === 0x80 && head[1] <= 5)
    throw new WeightsError(
      `${path}: legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with torch >= 1.6 or convert to safetensors`,
    );
  if (n < 8) throw new WeightsError(`${path}: file too short (${n} bytes) to be safetensors or a torch checkpoint`);
  // A safetensors header is a JSON object, so byte 8 is '{'.
  if (n === 9 && head[8] !== 0x7b)
    throw new WeightsError(`${path}: neither safetensors (no JSON header after the 8-byte length) nor a torch.save zip checkpoint`);
  return openSafetensors(path);
}

/** sha256 hex of a file, read in chunks so multi-GB weights never sit in memory. */
export function sha256File(path: string): string {
  const h = createHash('sha256');
  const fd = openForRead(path);
  try {
    const buf = new Uint8Array(1 << 22);
    let pos = 0;
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}
