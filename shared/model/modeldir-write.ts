// Writing a model folder (model.onnx + model.json): what the model compilers (ditpipe model
// build, model vae) use. Kept apart from modeldir.ts, which the services read folders with, so a
// denoiser or decoder does not load the ONNX writer.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Graph } from '../onnx/graph.ts';
import { writeOnnx, type WriteOptions } from '../onnx/write.ts';
import { VERSION } from '../version.ts';
import {
  GRAPH_REVISION,
  MODEL_JSON,
  MODEL_ONNX,
  modelJsonSchema,
  type DitModelJson,
  type ModelDir,
  type VaeModelJson,
} from './modeldir.ts';

/** What a graph builder knows; `writeModelDir` adds what writing the graph tells. */
export type ModelJsonDraft =
  | Omit<
      DitModelJson,
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
      | 'graphRevision'
    >
  | Omit<
      VaeModelJson,
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
      | 'graphRevision'
    >;

/** Multiply-accumulates per forward at batch 1, ×1e-9. */
export function graphGflops(graph: Graph): number {
  let macs = 0;
  for (const m of graph.macs.values()) macs += m;
  return macs / 1e9;
}

export function writeModelDir(dir: string, graph: Graph, draft: ModelJsonDraft, opts: WriteOptions = {}): ModelDir {
  mkdirSync(dir, { recursive: true });
  const onnxPath = join(dir, MODEL_ONNX);
  const res = writeOnnx(graph, onnxPath, opts);
  const meta = modelJsonSchema.parse({
    ...draft,
    format: 'ditpipe-model',
    version: 1,
    inputs: graph.inputs.map(({ name, dtype, shape }) => ({ name, dtype, shape: [...shape] })),
    outputs: graph.outputs.map(({ name, dtype, shape }) => ({ name, dtype, shape: [...shape] })),
    params: res.params,
    gflops: graphGflops(graph),
    flopsConvention: 'multiply-accumulates',
    weightDtype: opts.weightDtype ?? 'float32',
    onnx: MODEL_ONNX,
    externalData: res.externalData,
    createdBy: `ditpipe ${VERSION}`,
    graphRevision: GRAPH_REVISION,
  });
  writeFileSync(join(dir, MODEL_JSON), `${JSON.stringify(meta, null, 2)}\n`);
  return { dir, onnxPath, meta };
}
