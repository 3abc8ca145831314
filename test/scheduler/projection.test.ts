// The latent-to-pixel projection of cheap previews: the least-squares fit recovers a linear map
// exactly, and applying it clamps like the decoder's PNGs.
import { describe, expect, it } from 'vitest';
import { calibrationLatents, fitProjection, projectToPng } from '../../services/scheduler/projection.ts';
import { decodePng, encodePixels } from '../../shared/image/png.ts';

describe('preview projection', () => {
  it('recovers a linear latent-to-RGB map from images upsampled ×4, and applies it', () => {
    const channels = 4;
    const side = 6;
    const u = 4;
    const truth = [
      [10, -5, 3, 0, 120],
      [-4, 8, 0, 2, 130],
      [1, 1, -9, 6, 125],
    ];
    const n = 5;
    const latents = calibrationLatents(n, channels, side);
    const plane = side * side;
    // Images whose every u×u block is the map of its latent pixel (kept inside 0..255, exact in 8 bits after rounding).
    const pngs = Array.from({ length: n }, (_, s) => {
      const w = side * u;
      const data = new Uint8Array(w * w * 3);
      for (let y = 0; y < w; y++) {
        for (let x = 0; x < w; x++) {
          const i = Math.floor(y / u) * side + Math.floor(x / u);
          for (let k = 0; k < 3; k++) {
            let v = truth[k][4];
            for (let c = 0; c < channels; c++) v += truth[k][c] * latents[(s * channels + c) * plane + i];
            data[(y * w + x) * 3 + k] = Math.round(v);
          }
        }
      }
      return encodePixels({ width: w, height: w, channels: 3, data });
    });
    const p = fitProjection(latents, channels, side, pngs, { upsample: u });
    expect(p.outChannels).toBe(3);
    expect(p.samples).toBe(n * plane);
    for (let k = 0; k < 3; k++) {
      p.coef[k].forEach((v, c) => expect(Math.abs(v - truth[k][c]), `channel ${k} coefficient ${c}`).toBeLessThan(0.3));
      expect(p.r2[k]).toBeGreaterThan(0.99);
    }
    const img = decodePng(projectToPng(p, latents.subarray(0, channels * plane), side));
    expect([img.width, img.height, img.channels]).toEqual([side, side, 3]);
    const ref = decodePng(pngs[0]);
    for (let i = 0; i < plane; i++) {
      const y = Math.floor(i / side) * u;
      const x = (i % side) * u;
      for (let k = 0; k < 3; k++) expect(Math.abs(img.data[i * 3 + k] - ref.data[(y * side * u + x) * 3 + k])).toBeLessThanOrEqual(1);
    }
  });

  it('fits through a VAE output crop (Fashion-MNIST: 32×32 decoded, 2 px cut from each edge)', () => {
    const channels = 1;
    const side = 4;
    const u = 8;
    const crop = { top: 2, right: 2, bottom: 2, left: 2 };
    const latents = calibrationLatents(6, channels, side);
    const pngs = Array.from({ length: 6 }, (_, s) => {
      const w = side * u - 4;
      const data = new Uint8Array(w * w);
      for (let y = 0; y < w; y++) {
        for (let x = 0; x < w; x++) {
          const i = Math.floor((y + crop.top) / u) * side + Math.floor((x + crop.left) / u);
          data[y * w + x] = Math.round(100 + 20 * latents[s * side * side + i]);
        }
      }
      return encodePixels({ width: w, height: w, channels: 1, data });
    });
    expect(() => fitProjection(latents, channels, side, pngs, { upsample: u })).toThrow(RangeError);
    const p = fitProjection(latents, channels, side, pngs, { upsample: u, crop });
    expect(Math.abs(p.coef[0][0] - 20)).toBeLessThan(0.3);
    expect(Math.abs(p.coef[0][1] - 100)).toBeLessThan(0.5);
  });

  it('clamps to 0..255 and draws the same calibration latents every time', () => {
    const p = { latentChannels: 1, outChannels: 1, coef: [[1000, 0]], r2: [1], samples: 1 };
    const img = decodePng(projectToPng(p, Float32Array.from([-1, 0.5, 0.0001, 2]), 2));
    expect(Array.from(img.data)).toEqual([0, 255, 0, 255]);
    expect(Array.from(calibrationLatents(2, 3, 4))).toEqual(Array.from(calibrationLatents(2, 3, 4)));
  });
});
