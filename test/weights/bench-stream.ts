// Benchmark (prints numbers, asserts nothing): peak RSS while streaming a large safetensors file
// through writeSafetensors with lazy tensor data, then reading it back tensor by tensor and hashing it.
// Usage: npx tsx test/weights/bench-stream.ts [totalMiB=512] [tensorMiB=32]
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSafetensors, sha256File, writeSafetensors } from '../../shared/weights/index.ts';

const totalMiB = Number(process.argv[2] ?? 512);
const tensorMiB = Number(process.argv[3] ?? 32);
const perTensor = (tensorMiB * 1024 * 1024) / 4;
const count = Math.ceil(totalMiB / tensorMiB);
const dir = mkdtempSync(join(tmpdir(), 'ditpipe-bench-'));
const file = join(dir, 'big.safetensors');
const mib = (b: number) => +(b / 2 ** 20).toFixed(1);
const baseRss = process.memoryUsage().rss;

try {
  let t0 = performance.now();
  writeSafetensors(
    file,
    Array.from({ length: count }, (_, i) => ({
      name: `blocks.${i}.weight`,
      dtype: 'F32' as const,
      shape: [perTensor / 1024, 1024],
      data: () => new Float32Array(perTensor).fill(i),
    })),
  );
  const writeS = (performance.now() - t0) / 1000;
  const weightBytes = statSync(file).size;
  const rssAfterWrite = process.resourceUsage().maxRSS * 1024;

  t0 = performance.now();
  const f = openSafetensors(file);
  let checksum = 0;
  for (const n of f.names()) checksum += f.readF32(n)[0];
  f.close();
  const readS = (performance.now() - t0) / 1000;

  t0 = performance.now();
  const hash = sha256File(file);
  const hashS = (performance.now() - t0) / 1000;
  const peak = process.resourceUsage().maxRSS * 1024;

  console.log(
    JSON.stringify(
      {
        tensors: count,
        weightMiB: mib(weightBytes),
        baseRssMiB: mib(baseRss),
        peakRssAfterWriteMiB: mib(rssAfterWrite),
        peakRssMiB: mib(peak),
        peakOverWeights: +(peak / weightBytes).toFixed(3),
        writeMiBps: +(mib(weightBytes) / writeS).toFixed(0),
        readMiBps: +(mib(weightBytes) / readS).toFixed(0),
        sha256MiBps: +(mib(weightBytes) / hashS).toFixed(0),
        checksum,
        sha256: hash.slice(0, 16),
      },
      null,
      2,
    ),
  );
} finally {
  rmSync(dir, { recursive: true, force: true });
}
