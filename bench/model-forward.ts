// Forward passes of compiled DiT models in onnxruntime, by batch size: milliseconds per forward and
// rows per second. Several --model-dir flags compare model directories (say, the same weights built
// by two versions of the compiler) in one run: the models take turns forward by forward, so drift
// on a shared machine hits them alike, and the JSON gives each one's speed relative to the first.
//
//   node --import tsx bench/model-forward.ts [--model-dir DIR ...] [--batch 1,16,64,256]
//     [--threads 1] [--reps 7]
//
// Without --model-dir it runs the default Fashion-MNIST model (built into .cache/models as `npm
// start` does) and DiT-S/2 at latent 32 with random weights. Prints one JSON object on stdout.
import { parseArgs } from 'node:util';
import * as ort from 'onnxruntime-node';
import { ensureDefaultModels } from '../cli/default-model.ts';
import { graphRevisionOf, readDitModelDir } from '../shared/model/modeldir.ts';
import { benchModel, log, machine, round } from './pipeline/cluster.ts';

export interface ForwardOptions {
  modelDirs: string[];
  batches: number[];
  threads: number;
  reps: number;
}

export function forwardOptions(argv: string[]): ForwardOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      'model-dir': { type: 'string', multiple: true },
      batch: { type: 'string', default: '1,16,64,256' },
      threads: { type: 'string', default: '1' },
      reps: { type: 'string', default: '7' },
    },
  });
  const positive = (flag: string, v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${flag}: expected a positive integer, got "${v}"`);
    return n;
  };
  return {
    modelDirs: values['model-dir'] ?? [ensureDefaultModels({ log }).ditDir, benchModel('DiT-S/2', 32).dir],
    batches: values.batch.split(',').map((b) => positive('batch', b)),
    threads: positive('threads', values.threads),
    reps: positive('reps', values.reps),
  };
}

function feeds(meta: ReturnType<typeof readDitModelDir>['meta'], b: number): Record<string, ort.Tensor> {
  const { in_channels: c, input_size: s, num_classes: k } = meta.config;
  return {
    x: new ort.Tensor(
      'float32',
      Float32Array.from({ length: b * c * s * s }, (_, i) => Math.sin(i)),
      [b, c, s, s],
    ),
    t: new ort.Tensor(
      'int64',
      BigInt64Array.from({ length: b }, (_, i) => BigInt((i * 37) % 1000)),
      [b],
    ),
    y: new ort.Tensor(
      'int64',
      BigInt64Array.from({ length: b }, (_, i) => BigInt(i % (k + 1))),
      [b],
    ),
  };
}

export async function runForward(o: ForwardOptions): Promise<unknown> {
  const models = await Promise.all(
    o.modelDirs.map(async (dir) => {
      const m = readDitModelDir(dir);
      const session = await ort.InferenceSession.create(m.onnxPath, {
        graphOptimizationLevel: 'all',
        intraOpNumThreads: o.threads,
        interOpNumThreads: 1,
      });
      return { dir, m, session };
    }),
  );
  const results: Record<string, unknown>[] = [];
  for (const b of o.batches) {
    const inputs = models.map(({ m }) => feeds(m.meta, b));
    const times: number[][] = models.map(() => []);
    for (let r = -1; r < o.reps; r++) {
      for (let i = 0; i < models.length; i++) {
        const t0 = performance.now();
        await models[i].session.run(inputs[i]);
        if (r >= 0) times[i].push(performance.now() - t0); // r = -1 warms up
      }
    }
    const medians = times.map((ts) => [...ts].sort((p, q) => p - q)[Math.floor(ts.length / 2)]);
    models.forEach(({ m }, i) => {
      const row = {
        model: m.meta.name,
        dir: models[i].dir,
        graphRevision: graphRevisionOf(m.meta),
        gflops: round(m.meta.gflops, 4),
        batch: b,
        medianMs: round(medians[i], 2),
        minMs: round(Math.min(...times[i]), 2),
        rowsPerSec: round((b * 1000) / medians[i], 1),
        speedVsFirst: round(medians[0] / medians[i], 3),
      };
      results.push(row);
      log(
        `${row.model} (rev ${row.graphRevision}) batch ${b}: ${row.medianMs} ms, ${row.rowsPerSec} rows/s, ×${row.speedVsFirst} vs the first`,
      );
    });
  }
  await Promise.all(models.map(({ session }) => session.release()));
  return { threads: o.threads, reps: o.reps, results };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const out = await runForward(forwardOptions(process.argv.slice(2)));
  console.log(JSON.stringify({ machine: machine(), date: new Date().toISOString(), ...(out as object) }, null, 2));
}
