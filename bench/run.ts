// `npm run bench` runs every benchmark; `npm run bench -- <name> [flags]` runs one, passing the flags
// on (see the header of each benchmark file). Prints one JSON object on stdout; progress goes to
// stderr. Results and the machine they ran on are written up in BENCHMARKS.md.
//
//   overhead  bench/pipeline/overhead.ts  pipeline vs a direct onnxruntime loop (DiT-S/2, 50 steps)
//   batching  bench/pipeline/batching.ts  images/s and rows per forward at 1, 4, 16 concurrent requests
//   capacity  bench/pipeline/capacity.ts  scheduler steps/s and CPU per step against 16 simulated denoisers
//   dispatch  bench/pipeline/dispatch.ts  push vs pull: a frozen replica, a 4× slower one, a lone request's overhead
//   scale     bench/pipeline/scale.ts     steps/s and latency as simulated denoisers go 1 → 64 (about 12 min)
//   step-cache bench/pipeline/step-cache.ts step-cache presets: images/s, Gflops/image, vs fewer steps, mixed passes
//   diffusion bench/diffusion.ts          sampling-core cost per step (own process)
//   model-build bench/model-build.ts      peak RSS of compiling DiT-XL/2 (own process)
//   forward   bench/model-forward.ts      DiT forward ms and rows/s by batch; compares model dirs
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { batchingOptions, runBatching } from './pipeline/batching.ts';
import { capacityOptions, runCapacity } from './pipeline/capacity.ts';
import { dispatchOptions, runDispatch } from './pipeline/dispatch.ts';
import { forwardOptions, runForward } from './model-forward.ts';
import { log, machine, ROOT } from './pipeline/cluster.ts';
import { overheadOptions, runOverhead } from './pipeline/overhead.ts';
import { runScale, scaleOptions } from './pipeline/scale.ts';
import { runStepCacheBench, stepCacheBenchOptions } from './pipeline/step-cache.ts';

type Bench = (argv: string[]) => Promise<unknown>;

/** A benchmark script that prints its JSON as the last thing on stdout, run in its own process. */
function script(file: string): Bench {
  return async (argv) => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, file), ...argv], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      maxBuffer: 64 * 1024 * 1024,
    });
    if (r.status !== 0) throw new Error(`${file} failed (exit ${r.status})`);
    const out = r.stdout.trim();
    return JSON.parse(out.slice(out.indexOf('{'))) as unknown;
  };
}

const benches: Record<string, Bench> = {
  overhead: (argv) => runOverhead(overheadOptions(argv)),
  batching: (argv) => runBatching(batchingOptions(argv)),
  capacity: (argv) => runCapacity(capacityOptions(argv)),
  dispatch: (argv) => runDispatch(dispatchOptions(argv)),
  scale: (argv) => runScale(scaleOptions(argv)),
  'step-cache': (argv) => runStepCacheBench(stepCacheBenchOptions(argv)),
  diffusion: script('bench/diffusion.ts'),
  'model-build': script('bench/model-build.ts'),
  forward: (argv) => runForward(forwardOptions(argv)),
};

const [name, ...rest] = process.argv.slice(2);
if (name !== undefined && !(name in benches)) {
  process.stderr.write(`unknown benchmark "${name}"; one of: ${Object.keys(benches).join(', ')}\n`);
  process.exit(2);
}
const selected = name === undefined ? Object.keys(benches) : [name];
const results: Record<string, unknown> = {};
let failed = false;
for (const b of selected) {
  log(`=== ${b}`);
  const t0 = performance.now();
  try {
    results[b] = await benches[b](b === name ? rest : []);
  } catch (err) {
    failed = true;
    results[b] = { error: err instanceof Error ? err.message : String(err) };
    log(`${b} failed: ${err instanceof Error ? err.message : String(err)}`);
  }
  log(`=== ${b} done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
console.log(JSON.stringify({ machine: machine(), date: new Date().toISOString(), results }, null, 2));
process.exitCode = failed ? 1 : 0;
