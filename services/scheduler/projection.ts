// The cheap preview: a linear map from a latent pixel to an image pixel (per output channel,
// Σ_c w_c·z_c + b), at the latent's resolution, computed in the scheduler with no decoder call.
// A VAE decoder is close to linear at low spatial frequencies, so this shows the layout and tone
// of the image forming (the SD community's "latent2rgb" previews). The map is fitted by least
// squares against the VAE itself: once per VAE and scheduler process, a few seeded standard-normal
// latents (the scale sampling works at) are decoded by the decoder pool and their images averaged
// over each latent pixel's footprint. The fit's R² per channel is kept so it can be judged.
import { fillNormal, seedKey, STREAM_INITIAL } from '../../shared/diffusion/philox.ts';
import { decodePng, encodePixels } from '../../shared/image/png.ts';

export interface Projection {
  latentChannels: number;
  outChannels: number;
  /** [outChannels][latentChannels + 1]: weights, then the bias, in 8-bit pixel units. */
  coef: number[][];
  /** Coefficient of determination of the fit per output channel (1 = exact). */
  r2: number[];
  /** Latent pixels the fit saw. */
  samples: number;
}

/** Calibration latents [count, C, h, w], standard normal from a fixed key (the same fit every time). */
export function calibrationLatents(count: number, channels: number, side: number): Float32Array {
  const per = channels * side * side;
  const out = new Float32Array(count * per);
  const key = seedKey(0x7072657669657773n); // "previews"
  for (let s = 0; s < count; s++) fillNormal(out, s * per, per, key, s, 0, STREAM_INITIAL);
  return out;
}

/** Solves the (d×d) system A·x = b in place by Gaussian elimination with partial pivoting. */
function solve(a: number[][], b: number[]): number[] {
  const d = b.length;
  for (let i = 0; i < d; i++) {
    let p = i;
    for (let r = i + 1; r < d; r++) if (Math.abs(a[r][i]) > Math.abs(a[p][i])) p = r;
    [a[i], a[p]] = [a[p], a[i]];
    [b[i], b[p]] = [b[p], b[i]];
    for (let r = i + 1; r < d; r++) {
      const f = a[r][i] / a[i][i];
      for (let c = i; c < d; c++) a[r][c] -= f * a[i][c];
      b[r] -= f * b[i];
    }
  }
  const x = new Array<number>(d).fill(0);
  for (let i = d - 1; i >= 0; i--) {
    let s = b[i];
    for (let c = i + 1; c < d; c++) s -= a[i][c] * x[c];
    x[i] = s / a[i][i];
  }
  return x;
}

/** How decoded images relate to latents: `upsample` pixels per latent pixel, then the VAE's output crop. */
export interface Geometry {
  upsample: number;
  crop?: { top: number; right: number; bottom: number; left: number } | undefined;
}

/**
 * Least-squares fit of pooled image pixels against latent pixels. `latents` [n, C, h, w] as sampled;
 * `pngs` their decoded images (n PNGs of h·u × w·u less the crop, 1 or 3 channels). A latent pixel
 * is fitted to the mean of its footprint's pixels that survived the crop.
 */
export function fitProjection(latents: Float32Array, channels: number, side: number, pngs: Uint8Array[], geometry: Geometry): Projection {
  const n = pngs.length;
  const plane = side * side;
  const first = decodePng(pngs[0]);
  const out = first.channels;
  const u = geometry.upsample;
  const crop = geometry.crop ?? { top: 0, right: 0, bottom: 0, left: 0 };
  if (
    !Number.isInteger(u) ||
    u < 1 ||
    first.width !== side * u - crop.left - crop.right ||
    first.height !== side * u - crop.top - crop.bottom
  ) {
    throw new RangeError(
      `decoded images of ${first.width}×${first.height} do not match latents of ${side}×${side} upsampled ${u}× and cropped`,
    );
  }
  const d = channels + 1;
  const ata = Array.from({ length: d }, () => new Array<number>(d).fill(0));
  const aty = Array.from({ length: out }, () => new Array<number>(d).fill(0));
  const rows: Array<{ f: number[]; y: number[] }> = [];
  for (let s = 0; s < n; s++) {
    const img = s === 0 ? first : decodePng(pngs[s]);
    for (let py = 0; py < side; py++) {
      for (let px = 0; px < side; px++) {
        const f = new Array<number>(d);
        for (let c = 0; c < channels; c++) f[c] = latents[(s * channels + c) * plane + py * side + px];
        f[channels] = 1;
        const y = new Array<number>(out).fill(0);
        let seen = 0;
        for (let dy = 0; dy < u; dy++) {
          const iy = py * u + dy - crop.top;
          if (iy < 0 || iy >= img.height) continue;
          for (let dx = 0; dx < u; dx++) {
            const ix = px * u + dx - crop.left;
            if (ix < 0 || ix >= img.width) continue;
            const o = (iy * img.width + ix) * out;
            for (let k = 0; k < out; k++) y[k] += img.data[o + k];
            seen++;
          }
        }
        if (seen === 0) continue; // a latent pixel wholly cropped away
        for (let k = 0; k < out; k++) y[k] /= seen;
        for (let i = 0; i < d; i++) {
          for (let j = 0; j < d; j++) ata[i][j] += f[i] * f[j];
          for (let k = 0; k < out; k++) aty[k][i] += f[i] * y[k];
        }
        rows.push({ f, y });
      }
    }
  }
  const coef = aty.map((b) =>
    solve(
      ata.map((r) => [...r]),
      [...b],
    ),
  );
  const r2 = coef.map((w, k) => {
    const mean = rows.reduce((a, r) => a + r.y[k], 0) / rows.length;
    let res = 0;
    let tot = 0;
    for (const r of rows) {
      const pred = r.f.reduce((a, v, i) => a + v * w[i], 0);
      res += (r.y[k] - pred) ** 2;
      tot += (r.y[k] - mean) ** 2;
    }
    return tot === 0 ? 0 : 1 - res / tot;
  });
  return { latentChannels: channels, outChannels: out, coef, r2, samples: rows.length };
}

/** One sample's latent [C, side, side] as a PNG of side×side pixels. */
export function projectToPng(p: Projection, latent: Float32Array, side: number): Uint8Array {
  const plane = side * side;
  const data = new Uint8Array(plane * p.outChannels);
  for (let i = 0; i < plane; i++) {
    for (let k = 0; k < p.outChannels; k++) {
      const w = p.coef[k];
      let v = w[p.latentChannels];
      for (let c = 0; c < p.latentChannels; c++) v += w[c] * latent[c * plane + i];
      data[i * p.outChannels + k] = v <= 0 ? 0 : v >= 255 ? 255 : Math.trunc(v);
    }
  }
  return encodePixels({ width: side, height: side, channels: p.outChannels, data });
}
