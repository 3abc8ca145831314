import { describe, expect, it } from 'vitest';
import { labelledGrid } from '../../shared/image/grid.ts';
import { decodePng, encodePixels } from '../../shared/image/png.ts';

const solid = (v: number, channels = 1): Uint8Array =>
  encodePixels({ width: 4, height: 4, channels, data: new Uint8Array(16 * channels).fill(v) });

describe('labelled grid', () => {
  it('places each image, upscaled, on its label row and writes the labels', async () => {
    const png = await labelledGrid(
      [
        { label: 'Sandal', pngs: [solid(0), solid(200)] },
        { label: 'Bag', pngs: [solid(100)] },
      ],
      { scale: 3 },
    );
    const g = decodePng(png);
    // label column 130 px, then 2 columns of 12 px with 4 px gaps; 2 rows of 12 px.
    expect(g.width).toBe(130 + 2 * 16 + 4);
    expect(g.height).toBe(2 * 16 + 4);
    const at = (x: number, y: number): number => g.data[(y * g.width + x) * g.channels];
    expect(at(130 + 5, 4 + 5)).toBe(0);
    expect(at(130 + 16 + 5, 4 + 5)).toBe(200);
    expect(at(130 + 5, 20 + 5)).toBe(100);
    expect(at(130 + 16 + 5, 20 + 5)).toBe(255); // empty cell stays background
    let ink = 0;
    for (let y = 0; y < g.height; y++) for (let x = 0; x < 120; x++) if (at(x, y) < 128) ink++;
    expect(ink).toBeGreaterThan(20); // the labels are drawn
  });

  it('is wide enough for the whole title, however few the images', async () => {
    const title = 'fashion-mnist · ddpm · 250 steps · cfg 4 · seed 18446744073709551615';
    const g = decodePng(await labelledGrid([{ label: 'Bag', pngs: [solid(0)] }], { title }));
    expect(g.width).toBeGreaterThan(400); // 130 + 4 + 4 + 4 without the title
    // Ink in the last quarter of the title row: the seed is drawn, not cut off.
    let ink = 0;
    for (let y = 0; y < 28; y++)
      for (let x = Math.floor(g.width * 0.75); x < g.width; x++) if (g.data[(y * g.width + x) * g.channels] < 128) ink++;
    expect(ink).toBeGreaterThan(10);
  });

  it('refuses an empty grid', async () => {
    await expect(labelledGrid([{ label: 'x', pngs: [] }])).rejects.toThrow(/at least one image/);
  });
});
