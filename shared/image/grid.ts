// A labelled sample grid (one row per label, images side by side), as PNG bytes. jimp does the
// compositing, nearest-neighbour upscaling of small images and the text (its bundled bitmap font).
import { Jimp, ResizeStrategy, loadFont, measureText } from 'jimp';
import { SANS_16_BLACK } from 'jimp/fonts';

export interface GridRow {
  label: string;
  pngs: Uint8Array[];
}

export async function labelledGrid(rows: GridRow[], opts: { scale?: number; title?: string } = {}): Promise<Uint8Array> {
  if (rows.length === 0 || rows.every((r) => r.pngs.length === 0)) throw new RangeError('a grid needs at least one image');
  const scale = opts.scale ?? 1;
  const images = await Promise.all(rows.map((r) => Promise.all(r.pngs.map((p) => Jimp.read(Buffer.from(p))))));
  const first = images.find((r) => r.length > 0)![0];
  const w = first.width * scale;
  const h = first.height * scale;
  const gap = 4;
  const labelWidth = 130;
  const titleHeight = opts.title ? 28 : 0;
  const cols = Math.max(...rows.map((r) => r.pngs.length));
  const font = await loadFont(SANS_16_BLACK);
  // Wide enough for the whole title (steps, cfg and seed must not be cut off on a small grid).
  const width = Math.max(labelWidth + cols * (w + gap) + gap, opts.title ? measureText(font, opts.title) + 2 * gap : 0);
  const canvas = new Jimp({ width, height: titleHeight + rows.length * (h + gap) + gap, color: 0xffffffff });
  if (opts.title) canvas.print({ font, x: gap, y: 6, text: opts.title });
  images.forEach((row, r) => {
    const y = titleHeight + gap + r * (h + gap);
    canvas.print({ font, x: gap, y: y + Math.max(0, (h - 16) / 2), text: rows[r].label });
    row.forEach((img, c) => {
      if (scale !== 1) img.resize({ w, h, mode: ResizeStrategy.NEAREST_NEIGHBOR });
      canvas.composite(img, labelWidth + c * (w + gap), y);
    });
  });
  return new Uint8Array(await canvas.getBuffer('image/png'));
}
