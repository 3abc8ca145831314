// Small real models for pipeline tests: the golden DiT (dit-tiny-p2: 4×8×8 latents, 10 classes,
// learned sigma) and VAE (vae-tiny: 4×8×8 → 3×32×32), compiled by ditpipe's own compiler into a
// cache folder shared by the test files (built once, atomically renamed into place).
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { buildVaeModel } from '../../cli/model-vae.ts';
import { buildDitModel } from '../../shared/model/dit.ts';
import { GRAPH_REVISION } from '../../shared/model/modeldir.ts';

export const GOLDEN = resolve(import.meta.dirname, '../../../shared/golden');
export const DIT_NAME = 'dit-tiny';
export const VAE_NAME = 'vae-tiny';
export const CLASS_NAMES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'];

// Keyed by the compiler's graph revision, so a machine never tests graphs an older compiler wrote.
const CACHE = join(tmpdir(), `ditpipe-test-models-${process.getuid?.() ?? 0}-rev${GRAPH_REVISION}`);

function cached(name: string, build: (dir: string) => void): string {
  const dir = join(CACHE, name);
  if (existsSync(join(dir, 'model.json'))) return dir;
  mkdirSync(CACHE, { recursive: true });
  const tmp = mkdtempSync(join(CACHE, `.${name}-`));
  build(tmp);
  try {
    renameSync(tmp, dir);
  } catch {
    rmSync(tmp, { recursive: true, force: true }); // another worker won the race
  }
  return dir;
}

export function testModels(): { ditDir: string; vaeDir: string } {
  const ditDir = cached(DIT_NAME, (out) =>
    buildDitModel({
      weights: join(GOLDEN, 'dit/dit-tiny-p2/weights.safetensors'),
      out,
      name: DIT_NAME,
      classNames: CLASS_NAMES,
      config: { num_heads: 4 },
    }),
  );
  const vaeDir = cached(VAE_NAME, (out) =>
    buildVaeModel({
      weights: join(GOLDEN, 'vae/vae-tiny/weights.safetensors'),
      out,
      name: VAE_NAME,
      config: JSON.stringify({ norm_num_groups: 32, latent_size: 8, scaling_factor: 0.18215 }),
    }),
  );
  return { ditDir, vaeDir };
}

/**
 * Variants for the CLI and crop tests: the test DiT with class names that are not file-safe (the
 * Fashion-MNIST ones), and the test VAE with a 2-px output crop (32×32 decoded, 28×28 served).
 */
export const FASHION_CLASS_NAMES = [
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
];

export function variantModels(): { namedDitDir: string; croppedVaeDir: string } {
  const namedDitDir = cached('dit-tiny-named', (out) =>
    buildDitModel({
      weights: join(GOLDEN, 'dit/dit-tiny-p2/weights.safetensors'),
      out,
      name: 'dit-tiny-named',
      classNames: FASHION_CLASS_NAMES,
      config: { num_heads: 4 },
    }),
  );
  const croppedVaeDir = cached('vae-tiny-crop2', (out) =>
    buildVaeModel({
      weights: join(GOLDEN, 'vae/vae-tiny/weights.safetensors'),
      out,
      name: 'vae-tiny-crop2',
      config: JSON.stringify({ norm_num_groups: 32, latent_size: 8, scaling_factor: 0.18215 }),
      outputCrop: { top: 2, right: 2, bottom: 2, left: 2 },
    }),
  );
  return { namedDitDir, croppedVaeDir };
}
