// Decoded images → PNG files. Pixels follow the DiT sampling script: clamp(127.5·x + 128, 0, 255)
// truncated (toUint8Nhwc); 3 channels become RGB, 1 channel grayscale.
import { decode, encode } from 'fast-png';
import { toUint8Nhwc } from '../model/vae.ts';
import type { WireTensor } from '../runtime/protocol.ts';

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
  return Array.from({ length: n }, (_, i) => encodePixels({ width: w, height: h, channels: c, data: pixels.subarray(i * size, (i + 1) * size) }));
}

export function encodePixels(p: Pixels): Uint8Array {
  return encode({ width: p.width, height: p.height, data: p.data, channels: p.channels, depth: 8 });
}

export function decodePng(png: Uint8Array): Pixels {
  const d = decode(png);
  return { width: d.width, height: d.height, channels: d.channels, data: Uint8Array.from(d.data as ArrayLike<number>) };
}

/**
 * Tiles equally sized images into one (row-major, `cols` per row) with a `gap`-pixel border of
 * `background`; images with fewer channels than the grid are expanded to gray RGB.
 */
export function gridPixels(images: Pixels[], cols: number, gap = 2, background = 255): Pixels {
  if (images.length === 0) throw new RangeError('a grid needs at least one image');
  const { width: w, height: h } = images[0];
  const channels = Math.max(...images.map((i) => i.channels));
  const rows = Math.ceil(images.length / cols);
  const width = cols * w + (cols + 1) * gap;
  const height = rows * h + (rows + 1) * gap;
  const data = new Uint8Array(width * height * channels).fill(background);
  images.forEach((img, k) => {
    if (img.width !== w || img.height !== h) throw new RangeError('grid images must all have the same size');
    const ox = gap + (k % cols) * (w + gap);
    const oy = gap + Math.floor(k / cols) * (h + gap);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const dst = ((oy + y) * width + ox + x) * channels;
        const src = (y * w + x) * img.channels;
        for (let ch = 0; ch < channels; ch++) data[dst + ch] = img.data[src + (img.channels === 1 ? 0 : ch)];
      }
    }
  });
  return { width, height, channels, data };
}
