// The default model of `npm start` and `ditpipe up`: the Fashion-MNIST latent DiT and its VAE,
// trained by models/fashion-mnist/ and committed as safetensors. ditpipe's own compiler turns them
// into model directories under .cache/models, rebuilt when the weights, the settings their JSON
// records give (scaling factor, output crop, class names) or the compiler's graphs (GRAPH_REVISION)
// change, or when the DiT directory predates the step-cache graphs.
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { GRAPH_REVISION, graphRevisionOf, readModelDir, type ModelJson } from '../shared/model/modeldir.ts';
import { parseVaeConfigJson } from '../shared/model/vae.ts';
import { buildDitModel } from '../shared/model/dit.ts';
import { sha256File } from '../shared/weights/index.ts';
import { readDitConfigArg } from './model.ts';
import { buildVaeModel } from './model-vae.ts';

export const ROOT = resolve(import.meta.dirname, '..');
export const DEFAULT_WEIGHTS_DIR = join(ROOT, 'models/fashion-mnist');
export const DEFAULT_CACHE_DIR = join(ROOT, '.cache/models');
export const DEFAULT_DIT_NAME = 'fashion-mnist';
export const DEFAULT_VAE_NAME = 'fashion-mnist-vae';

export interface DefaultModels {
  ditDir: string;
  vaeDir: string;
  dit: string;
  vae: string;
}

/** Whether `dir` was built from these weights by this compiler, and says what `expect` checks (from the JSON record). */
function upToDate(dir: string, weights: string, expect: (meta: ModelJson) => boolean): boolean {
  try {
    const { meta } = readModelDir(dir);
    return meta.source.sha256 === sha256File(weights) && graphRevisionOf(meta) === GRAPH_REVISION && expect(meta);
  } catch {
    return false;
  }
}

/** Builds (or reuses) the default model directories; `log` receives one line per step. */
export function ensureDefaultModels(opts: { weightsDir?: string; cacheDir?: string; log?: (line: string) => void } = {}): DefaultModels {
  const src = opts.weightsDir ?? DEFAULT_WEIGHTS_DIR;
  const cache = opts.cacheDir ?? DEFAULT_CACHE_DIR;
  const log = opts.log ?? (() => undefined);
  const files = ['dit.safetensors', 'dit.json', 'vae.safetensors', 'vae.json'].map((f) => join(src, f));
  const missing = files.filter((f) => !existsSync(f));
  if (missing.length > 0) {
    throw new Error(
      `default model weights missing: ${missing.join(', ')} (train them with models/fashion-mnist/run.sh, or pass --model-dir/--vae-dir)`,
    );
  }
  const [ditWeights, ditJson, vaeWeights, vaeJson] = files;
  const ditDir = join(cache, DEFAULT_DIT_NAME);
  const vaeDir = join(cache, DEFAULT_VAE_NAME);
  // Built the way a user would by hand: the committed JSON records are the --config files.
  const vaeRecord = parseVaeConfigJson(JSON.parse(readFileSync(vaeJson, 'utf8')), vaeJson);
  const sameVae = (m: ModelJson): boolean =>
    m.kind === 'vae-decoder' &&
    m.scalingFactor === vaeRecord.scalingFactor &&
    JSON.stringify(m.outputCrop ?? null) === JSON.stringify(vaeRecord.outputCrop ?? null);
  if (!upToDate(vaeDir, vaeWeights, sameVae)) {
    log(`building the VAE decoder from ${vaeWeights} → ${vaeDir}`);
    buildVaeModel({ weights: vaeWeights, out: vaeDir, name: DEFAULT_VAE_NAME, config: vaeJson });
  }
  const given = readDitConfigArg(ditJson);
  const sameDit = (m: ModelJson): boolean =>
    m.kind === 'dit' && JSON.stringify(m.classNames ?? null) === JSON.stringify(given.classNames ?? null) && m.cacheGraphs !== undefined;
  if (!upToDate(ditDir, ditWeights, sameDit)) {
    log(`building the DiT from ${ditWeights} → ${ditDir}`);
    buildDitModel({
      weights: ditWeights,
      out: ditDir,
      name: DEFAULT_DIT_NAME,
      config: given.config,
      classNames: given.classNames,
      vae: DEFAULT_VAE_NAME,
    });
  }
  return { ditDir, vaeDir, dit: DEFAULT_DIT_NAME, vae: DEFAULT_VAE_NAME };
}
