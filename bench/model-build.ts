// Peak memory of compiling DiT-XL/2: init random weights into a temporary safetensors file (streamed),
// then build the model directory in a fresh process and compare its peak RSS with the weight bytes.
//
//   npx tsx bench/model-build.ts [--preset DiT-XL/2] [--dtype f32|f16] [--dir /tmp] [--keep]
//
// Prints one JSON object. The target: build peak RSS ≤ 1.5 × weight bytes.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildDitModel } from '../shared/model/dit.ts';
import { initDitWeights } from '../shared/model/dit-init.ts';
import { ditPreset } from '../shared/model/presets.ts';

const { values } = parseArgs({
  options: {
    preset: { type: 'string', default: 'DiT-XL/2' },
    dtype: { type: 'string', default: 'f32' },
    dir: { type: 'string' },
    keep: { type: 'boolean', default: false },
    phase: { type: 'string' },
    weights: { type: 'string' },
    out: { type: 'string' },
  },
});

const maxRssBytes = (): number => process.resourceUsage().maxRSS * 1024; // maxRSS is in KiB

function phase(): void {
  const t0 = performance.now();
  if (values.phase === 'init') {
    const r = initDitWeights(ditPreset(values.preset), values.weights!, { init: 'random', seed: 0 });
    console.log(
      JSON.stringify({ seconds: (performance.now() - t0) / 1000, maxRssBytes: maxRssBytes(), weightBytes: r.bytes, params: r.params }),
    );
  } else {
    const m = buildDitModel({ weights: values.weights!, out: values.out!, preset: values.preset, dtype: values.dtype as 'f32' | 'f16' });
    console.log(
      JSON.stringify({
        seconds: (performance.now() - t0) / 1000,
        maxRssBytes: maxRssBytes(),
        gflops: m.meta.gflops,
        params: m.meta.params,
      }),
    );
  }
}

function runPhase(name: 'init' | 'build', args: string[]): Record<string, number> {
  const r = spawnSync(process.execPath, ['--import', 'tsx', import.meta.filename, '--phase', name, ...args], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  if (r.status !== 0) throw new Error(`${name} phase failed (exit ${r.status})`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as Record<string, number>;
}

if (values.phase) {
  phase();
} else {
  const dir = mkdtempSync(join(values.dir ?? tmpdir(), 'ditpipe-bench-build-'));
  const weights = join(dir, 'weights.safetensors');
  const out = join(dir, 'model');
  try {
    const common = ['--preset', values.preset, '--weights', weights];
    const init = runPhase('init', common);
    const build = runPhase('build', [...common, '--out', out, '--dtype', values.dtype]);
    const dataFile = join(out, 'model.onnx.data');
    const onnxBytes = statSync(join(out, 'model.onnx')).size + (existsSync(dataFile) ? statSync(dataFile).size : 0);
    console.log(
      JSON.stringify(
        {
          preset: values.preset,
          dtype: values.dtype,
          params: build.params,
          gflops: build.gflops,
          weightBytes: init.weightBytes,
          onnxBytes,
          init: { seconds: init.seconds, maxRssBytes: init.maxRssBytes },
          build: { seconds: build.seconds, maxRssBytes: build.maxRssBytes, ratioToWeightBytes: build.maxRssBytes / init.weightBytes },
          target: 'build maxRSS <= 1.5 x weight bytes',
          node: process.version,
        },
        null,
        2,
      ),
    );
  } finally {
    if (!values.keep) rmSync(dir, { recursive: true, force: true });
  }
}
