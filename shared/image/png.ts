// Decoded images → PNG files. Pixels follow the DiT sampling script: clamp(127.5·x + 128, 0, 255)
// truncated (toUint8Nhwc); 3 channels become RGB, 1 channel grayscale.
import { decode, encode } from 'fast-png';
import type { WireTensor } from '../runtime/protocol.ts';
import { toUint8Nhwc } from './pixels.ts';

export interface Pixels {
  width: number;
  height: number;
  /** 1 (grayscale) or 3 (RGB). */
  channels: number;
  /** Row-major HWC uint8. */
  data: Uint8Array;
}

/** One PNG per image of a float [N, C, H, W] tensor (C = 1 or 3). */
export function encodePngs(images: WireTensor): Uint8Array[] {
  const [n, c, h, w] = images.dims;
  if (images.dims.length !== 4 || (c !== 1 && c !== 3)) {
    throw new RangeError(`PNG encoding needs [N, 1 or 3, H, W] images, got [${images.dims.join(', ')}]`);
  }
  const pixels = toUint8Nhwc(images.data as Float32Array, images.dims);
  const size = h * w * c;
  return Array.from({ length: n }, (_, i) =>
    encodePixels({ width: w, height: h, channels: c, data: pixels.subarray(i * size, (i + 1) * size) }),
  );
}

export function encodePixels(p: Pixels): Uint8Array {
  return encode({ width: p.width, height: p.height, data: p.data, channels: p.channels, depth: 8 });
}

export function decodePng(png: Uint8Array): Pixels {
  const d = decode(png);
  return { width: d.width, height: d.height, channels: d.channels, data: Uint8Array.from(d.data as ArrayLike<number>) };
}
