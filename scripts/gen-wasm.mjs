#!/usr/bin/env node
// Compiles each WebAssembly text file under shared/ (*.wat) to the binary next to it (*.wasm) with
// wabt (npm run gen), or checks the committed binaries are up to date (npm run gen -- --check).
// The binaries are committed so that running ditpipe needs no compiler.
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import initWabt from 'wabt';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');
const wabt = await initWabt();
const sources = readdirSync(join(root, 'shared'), { recursive: true })
  .filter((f) => f.endsWith('.wat'))
  .map((f) => join(root, 'shared', f))
  .sort();
let stale = 0;
for (const src of sources) {
  const out = src.replace(/\.wat$/, '.wasm');
  let binary;
  try {
    const module = wabt.parseWat(relative(root, src), readFileSync(src, 'utf8'), { simd: true });
    module.validate();
    binary = Buffer.from(module.toBinary({}).buffer);
    module.destroy();
  } catch (err) {
    console.error(`gen-wasm: ${relative(root, src)}: ${err.message}`);
    process.exit(1);
  }
  const current = existsSync(out) ? readFileSync(out) : null;
  if (current && current.equals(binary)) continue;
  if (check) {
    console.error(`gen-wasm: ${relative(root, out)} is out of date with ${relative(root, src)}; run npm run gen`);
    stale++;
  } else {
    writeFileSync(out, binary);
    console.log(`gen-wasm: wrote ${relative(root, out)} (${binary.length} bytes)`);
  }
}
if (stale > 0) process.exit(1);
if (check) console.log(`gen-wasm: ${sources.length} WebAssembly binaries up to date`);
