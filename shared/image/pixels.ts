// Float images → 8-bit pixels, shared by the PNG encoder and the VAE tests; no model code here.

/**
 * Decoder output [B, C, H, W] → uint8 pixels [B, H, W, C], as the DiT sampling script saves them:
 * clamp(127.5·x + 128, 0, 255) truncated, each step rounded to float32 like torch does.
 */
export function toUint8Nhwc(image: Float32Array, shape: readonly number[]): Uint8Array {
  if (shape.length !== 4) throw new RangeError(`toUint8Nhwc: expected a [B, C, H, W] shape, got [${shape.join(', ')}]`);
  const [bn, c, h, w] = shape;
  const plane = h * w;
  if (image.length !== bn * c * plane) {
    throw new RangeError(`toUint8Nhwc: ${image.length} values do not fill shape [${shape.join(', ')}]`);
  }
  const out = new Uint8Array(image.length);
  const f = Math.fround;
  for (let b = 0; b < bn; b++) {
    for (let ch = 0; ch < c; ch++) {
      const src = (b * c + ch) * plane;
      for (let i = 0; i < plane; i++) {
        const v = f(f(127.5 * image[src + i]) + 128);
        // NaN (a broken model) becomes 0 rather than whatever a cast would give.
        out[(b * plane + i) * c + ch] = v > 0 ? (v < 255 ? Math.trunc(v) : 255) : 0;
      }
    }
  }
  return out;
}
