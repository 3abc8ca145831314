// The output crop a VAE model directory may declare: pixels removed from each edge of every
// decoded image, for autoencoders trained on padded images (Fashion-MNIST's 28×28 padded by 2 px to
// 32×32). The decoder applies it to PNG and raw outputs alike, so served images are the dataset's.
import { z } from 'zod';

export interface ImageCrop {
  top: number;
  right: number;
  bottom: number;
  left: number;
}

const px = z.number().int('must be an integer').min(0, 'must be >= 0');

/** model.json's `outputCrop`. Square in, square out: ListModels reports one image_size. */
export const imageCropSchema = z
  .strictObject({ top: px, right: px, bottom: px, left: px })
  .refine(
    (c) => c.top + c.bottom === c.left + c.right,
    'must remove as many rows (top + bottom) as columns (left + right), so images stay square',
  );

/** "2" (every edge) or "top,right,bottom,left" (CSS order); null when unreadable. */
export function parseCrop(text: string): ImageCrop | null {
  const parts = text.split(',').map((s) => s.trim());
  if (!parts.every((p) => /^\d+$/.test(p)) || (parts.length !== 1 && parts.length !== 4)) return null;
  const [top, right = top, bottom = top, left = right] = parts.map(Number);
  return { top, right, bottom, left };
}

export const NO_CROP: ImageCrop = { top: 0, right: 0, bottom: 0, left: 0 };

export function isNoCrop(c: ImageCrop | undefined): boolean {
  return !c || (c.top === 0 && c.right === 0 && c.bottom === 0 && c.left === 0);
}

/** Size of a decoded image of `height`×`width` pixels after the crop. */
export function croppedSize(height: number, width: number, c: ImageCrop | undefined): { height: number; width: number } {
  const k = c ?? NO_CROP;
  return { height: height - k.top - k.bottom, width: width - k.left - k.right };
}

/** Size of the images a decoder serves for `latent`×`latent` latents: upsampled, then cropped. */
export function servedImageSize(latent: number, info: { upsample: number; outputCrop?: ImageCrop }): { height: number; width: number } {
  return croppedSize(latent * info.upsample, latent * info.upsample, info.outputCrop);
}

/** [N, C, H, W] float images with the crop applied (a copy; the input is left as it is). */
export function cropImages(t: { dims: number[]; data: Float32Array }, c: ImageCrop): { dims: number[]; data: Float32Array } {
  const [n, ch, h, w] = t.dims;
  const { height: oh, width: ow } = croppedSize(h, w, c);
  if (t.dims.length !== 4 || oh < 1 || ow < 1) throw new RangeError(`cannot crop ${JSON.stringify(c)} from images [${t.dims.join(', ')}]`);
  const out = new Float32Array(n * ch * oh * ow);
  for (let p = 0; p < n * ch; p++) {
    for (let y = 0; y < oh; y++) {
      const src = (p * h + y + c.top) * w + c.left;
      out.set(t.data.subarray(src, src + ow), (p * oh + y) * ow);
    }
  }
  return { dims: [n, ch, oh, ow], data: out };
}
