#!/usr/bin/env node
// Regenerates shared/gen/ from proto/ (npm run gen), or checks it is up to date (npm run gen -- --check).
//
// Steps: `buf lint`, then `buf generate` with the local ts-proto plugin (options in buf.gen.yaml),
// then `buf build` into shared/gen/descriptor.binpb (the FileDescriptorSet that gRPC server
// reflection serves, see shared/transport/grpc.ts). Everything is generated into a temporary
// folder first; a normal run then replaces shared/gen/ as a whole (so outputs of deleted protos
// disappear), --check compares the two trees byte for byte and exits 1 on any difference.
// buf comes from the @bufbuild/buf npm package (its binary ships inside), so no system install.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const GEN_DIR = 'shared/gen';
const check = process.argv.includes('--check');

const buf = join(root, 'node_modules/.bin/buf');
const plugin = join(root, 'node_modules/.bin/protoc-gen-ts_proto');
for (const [what, path] of [
  ['buf (npm @bufbuild/buf)', buf],
  ['protoc-gen-ts_proto (npm ts-proto)', plugin],
]) {
  if (!existsSync(path)) fail(`${what} not found at ${path}; install the dev dependencies`);
}

function fail(message) {
  console.error(`gen-proto: ${message}`);
  process.exit(1);
}

function run(args) {
  const r = spawnSync(buf, args, { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.error) fail(`buf ${args[0]}: ${r.error.message}`);
  if (r.status !== 0) fail(`buf ${args.join(' ')} exited with ${r.status}`);
}

/** Relative paths of all files under dir, sorted. */
function listFiles(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath ?? e.path, e.name)))
    .sort();
}

const README = `# Generated code — do not edit

Everything in this folder is generated from \`proto/\` by \`npm run gen\` (scripts/gen-proto.mjs):
TypeScript message codecs, grpc-js service definitions and ts-proto generic definitions (used by
the NATS binding in shared/transport/), and \`descriptor.binpb\`, the FileDescriptorSet served by
gRPC reflection. CI runs \`npm run gen -- --check\` and fails when this folder is out of date.
`;

const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-gen-'));
try {
  run(['lint']);
  // --output is prepended to the plugin's `out` (shared/gen), so the tree lands in tmp/shared/gen.
  run(['generate', '--template', 'buf.gen.yaml', '--output', tmp]);
  const fresh = join(tmp, GEN_DIR);
  run(['build', '--output', join(fresh, 'descriptor.binpb')]);
  writeFileSync(join(fresh, 'README.md'), README);

  const target = join(root, GEN_DIR);
  if (check) {
    const a = listFiles(fresh);
    const b = listFiles(target);
    const problems = [];
    for (const f of a) if (!b.includes(f)) problems.push(`missing: ${GEN_DIR}/${f}`);
    for (const f of b) if (!a.includes(f)) problems.push(`stale (no longer generated): ${GEN_DIR}/${f}`);
    for (const f of a) {
      if (b.includes(f) && !readFileSync(join(fresh, f)).equals(readFileSync(join(target, f)))) {
        problems.push(`differs: ${GEN_DIR}/${f}`);
      }
    }
    if (problems.length > 0) {
      fail(`generated code is out of date (run \`npm run gen\`):\n  ${problems.join('\n  ')}`);
    }
    console.log(`gen-proto: ${GEN_DIR} is up to date (${a.length} files)`);
  } else {
    rmSync(target, { recursive: true, force: true });
    cpSync(fresh, target, { recursive: true });
    console.log(`gen-proto: wrote ${listFiles(target).length} files to ${GEN_DIR}`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
