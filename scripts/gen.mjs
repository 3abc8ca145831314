#!/usr/bin/env node
// npm run gen [-- --check]: every code generator in turn, with the same flags.
//   gen-proto.mjs  proto/ → shared/gen/ (message codecs, service definitions, descriptor set)
//   gen-wasm.mjs   shared/**/*.wat → *.wasm
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
for (const script of ['gen-proto.mjs', 'gen-wasm.mjs']) {
  const r = spawnSync(process.execPath, [join(here, script), ...process.argv.slice(2)], { stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}
