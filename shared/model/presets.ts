// The DiT model family of the paper (Table 1): S/B/L/XL widths × patch sizes 2/4/8.
import type { DitConfig } from './modeldir.ts';

interface Size {
  hidden_size: number;
  depth: number;
  num_heads: number;
}

const SIZES: Record<'S' | 'B' | 'L' | 'XL', Size> = {
  S: { hidden_size: 384, depth: 12, num_heads: 6 },
  B: { hidden_size: 768, depth: 12, num_heads: 12 },
  L: { hidden_size: 1024, depth: 24, num_heads: 16 },
  XL: { hidden_size: 1152, depth: 28, num_heads: 16 },
};

/** Preset names as the original `DiT_models` dict spells them: `DiT-XL/2`, …, `DiT-S/8`. */
export const DIT_PRESETS: Readonly<Record<string, DitConfig>> = Object.fromEntries(
  (Object.keys(SIZES) as (keyof typeof SIZES)[]).flatMap((s) =>
    [2, 4, 8].map((p) => [
      `DiT-${s}/${p}`,
      // Defaults of the original constructor: 256×256 images → 32×32 latents with 4 channels, ImageNet classes.
      { input_size: 32, patch_size: p, in_channels: 4, ...SIZES[s], num_classes: 1000, learn_sigma: true },
    ]),
  ),
);

export class UnknownPresetError extends Error {
  constructor(readonly preset: string) {
    super(`unknown preset '${preset}'; known presets: ${Object.keys(DIT_PRESETS).join(', ')}`);
    this.name = 'UnknownPresetError';
  }
}

/** Accepts `DiT-XL/2` and the file-name-friendly `DiT-XL-2` (case-insensitive). */
export function ditPreset(name: string): DitConfig {
  const norm = name
    .trim()
    .toUpperCase()
    .replace(/^DIT-(S|B|L|XL)-(\d+)$/, 'DIT-$1/$2');
  for (const [k, v] of Object.entries(DIT_PRESETS)) if (k.toUpperCase() === norm) return { ...v };
  throw new UnknownPresetError(name);
}

/**
 * Attention heads cannot be read off weight shapes (qkv is [3D, D] for any head count). For a width
 * the presets use, take the presets' head count (64-dim heads for S/B/L, 72 for XL); otherwise null.
 */
export function defaultHeadsForWidth(hidden: number): number | null {
  for (const s of Object.values(SIZES)) if (s.hidden_size === hidden) return s.num_heads;
  return null;
}
