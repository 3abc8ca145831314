// Layering held by the static import graph (followed transitively, type-only imports left out,
// since they vanish at run time): what a service process loads, and what the image helpers load.
import { readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = resolve(import.meta.dirname, '../..');

/** Every project file reached from `entry` by value imports (`import … from`, `export … from`). */
function reach(entry: string): Set<string> {
  const seen = new Set<string>();
  const todo = [resolve(ROOT, entry)];
  while (todo.length) {
    const file = todo.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    const src = readFileSync(file, 'utf8');
    for (const m of src.matchAll(/^(?:import|export)\s+(type\s+)?[^;]*?\bfrom\s+'(\.[^']+)'/gms)) {
      if (m[1]) continue;
      todo.push(join(dirname(file), m[2]));
    }
  }
  return new Set([...seen].map((f) => relative(ROOT, f)));
}

describe('import layering', () => {
  it('finds imports at all (the walk is not vacuous)', () => {
    const r = reach('services/denoiser/service.ts');
    expect(r.has('shared/model/modeldir.ts')).toBe(true);
    expect(r.has('shared/onnx/inspect.ts')).toBe(true);
    expect(reach('shared/model/dit.ts').has('shared/onnx/write.ts')).toBe(true);
  });

  it.each(['services/denoiser/service.ts', 'services/decoder/service.ts', 'services/scheduler/service.ts'])(
    '%s loads neither the ONNX writer nor the model compilers',
    (entry) => {
      const r = [...reach(entry)];
      expect(
        r.filter(
          (f) =>
            f === 'shared/onnx/write.ts' ||
            f === 'shared/onnx/graph.ts' ||
            /^shared\/model\/(dit|vae|dit-init|modeldir-write)\.ts$/.test(f),
        ),
      ).toEqual([]);
      expect(r.filter((f) => f.startsWith('cli/'))).toEqual([]);
    },
  );

  it('the image helpers do not load model code', () => {
    for (const f of ['shared/image/png.ts', 'shared/image/grid.ts', 'shared/image/crop.ts', 'shared/image/pixels.ts']) {
      expect(
        [...reach(f)].filter((g) => g.startsWith('shared/model/')),
        f,
      ).toEqual([]);
    }
  });
});
