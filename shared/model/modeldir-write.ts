// Writing a model folder (model.onnx + model.json): what the model compilers (ditpipe model
// build, model vae) use. Kept apart from modeldir.ts, which the services read folders with, so a
// denoiser or decoder does not load the ONNX writer.
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Graph } from '../onnx/graph.ts';
import { writeOnnx, type WriteOptions } from '../onnx/write.ts';
import { VERSION } from '../version.ts';
import {
  CACHE_GRAPHS,
  cacheGraphFile,
  GRAPH_REVISION,
  MODEL_JSON,
  MODEL_ONNX,
  modelJsonSchema,
  type CacheGraphName,
  type DitModelJson,
  type ModelDir,
  type VaeModelJson,
} from './modeldir.ts';

/** The model.json fields `writeModelDir` fills in from writing the graph. */
type WrittenFields =
  | 'format'
  | 'version'
  | 'inputs'
  | 'outputs'
  | 'params'
  | 'gflops'
  | 'flopsConvention'
  | 'weightDtype'
  | 'onnx'
  | 'externalData'
  | 'createdBy'
  | 'graphRevision';

/** What a graph builder knows; `writeModelDir` adds what writing the graph tells (a DiT's cache graphs too). */
export type ModelJsonDraft = Omit<DitModelJson, WrittenFields | 'cacheGraphs'> | Omit<VaeModelJson, WrittenFields>;

/** Multiply-accumulates per forward at batch 1, ×1e-9. */
export function graphGflops(graph: Graph): number {
  let macs = 0;
  for (const m of graph.macs.values()) macs += m;
  return macs / 1e9;
}

export interface ModelDirWriteOptions extends Omit<WriteOptions, 'reuse'> {
  /** A DiT's step-cache graphs, built from the same weights as `graph` (see CACHE_GRAPHS). */
  cacheGraphs?: Record<CacheGraphName, Graph>;
}

export function writeModelDir(dir: string, graph: Graph, draft: ModelJsonDraft, opts: ModelDirWriteOptions = {}): ModelDir {
  const { cacheGraphs, ...write } = opts;
  if (cacheGraphs && draft.kind !== 'dit') throw new Error(`step-cache graphs are DiT graphs; this is a ${draft.kind} model`);
  mkdirSync(dir, { recursive: true });
  // Cache graphs from an earlier build point into that build's weights file: never leave them behind.
  for (const name of CACHE_GRAPHS) rmSync(join(dir, cacheGraphFile(name)), { force: true });
  const onnxPath = join(dir, MODEL_ONNX);
  const res = writeOnnx(graph, onnxPath, write);
  const io = (g: Graph): Pick<DitModelJson, 'inputs' | 'outputs'> => ({
    inputs: g.inputs.map(({ name, dtype, shape }) => ({ name, dtype, shape: [...shape] })),
    outputs: g.outputs.map(({ name, dtype, shape }) => ({ name, dtype, shape: [...shape] })),
  });
  // Each cache graph points at model.onnx's external data for the weights it shares (all of them),
  // so large models pay no disk for these graphs; small models embed their own copies.
  const cache = cacheGraphs
    ? Object.fromEntries(
        CACHE_GRAPHS.map((name) => {
          const file = cacheGraphFile(name);
          writeOnnx(cacheGraphs[name], join(dir, file), {
            ...write,
            onProgress: undefined,
            reuse: res.external ?? undefined,
            docString: write.docString && `${write.docString}; step-cache ${name} graph`,
          });
          return [name, { onnx: file, ...io(cacheGraphs[name]), gflops: graphGflops(cacheGraphs[name]) }];
        }),
      )
    : undefined;
  const meta = modelJsonSchema.parse({
    ...draft,
    format: 'ditpipe-model',
    version: 1,
    ...io(graph),
    params: res.params,
    gflops: graphGflops(graph),
    flopsConvention: 'multiply-accumulates',
    weightDtype: opts.weightDtype ?? 'float32',
    onnx: MODEL_ONNX,
    externalData: res.externalData,
    createdBy: `ditpipe ${VERSION}`,
    graphRevision: GRAPH_REVISION,
    ...(cache ? { cacheGraphs: cache } : {}),
  });
  writeFileSync(join(dir, MODEL_JSON), `${JSON.stringify(meta, null, 2)}\n`);
  return { dir, onnxPath, meta };
}
