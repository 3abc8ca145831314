#!/usr/bin/env node
// npm run proto:breaking: `buf breaking` (rules in buf.yaml) on proto/ against the protos of the
// previous commit, so a change that breaks wire or generated-code compatibility fails npm test.
//
// What "previous" means:
//   - proto/ or buf.yaml differ from HEAD (uncommitted work): against HEAD;
//   - otherwise (a clean checkout, as in CI): against HEAD's first parent, i.e. the commit under
//     test against the one before it (for a merge, the branch it was merged into).
//   - No such commit (a repository of one commit, or a shallow clone of depth 1): nothing to compare
//     against; the check says so and passes, since nothing can be broken relative to nothing.
// A deliberate break is let through by a line `Proto-Breaking: <why>` in the commit message of
// HEAD (or, for uncommitted work, DITPIPE_PROTO_BREAKING='<why>'); buf's findings are still printed.
// The baseline's files come from `git archive`, so it works the same in a worktree or a fresh clone.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const buf = join(here, '..', 'node_modules/.bin/buf');
const cwd = process.cwd();

let tmp = null;
function done(code) {
  if (tmp) rmSync(tmp, { recursive: true, force: true });
  process.exit(code);
}

function fail(message) {
  console.error(`proto-breaking: ${message}`);
  done(1);
}

function git(args, opts = {}) {
  return spawnSync('git', args, { cwd, encoding: 'utf8', ...opts });
}

if (!existsSync(buf)) fail(`buf (npm @bufbuild/buf) not found at ${buf}; install the dev dependencies`);
const top = git(['rev-parse', '--show-toplevel']);
if (top.status !== 0) fail(`not in a git repository (${cwd}): ${top.stderr.trim()}`);
const root = top.stdout.trim();
const PATHS = ['buf.yaml', 'proto'];

const dirty =
  git(['diff', '--quiet', 'HEAD', '--', ...PATHS], { cwd: root }).status !== 0 ||
  git(['ls-files', '--others', '--exclude-standard', '--', 'proto'], { cwd: root }).stdout.trim() !== '';
const base = dirty ? 'HEAD' : 'HEAD^1';
const baseSha = git(['rev-parse', '--verify', '--quiet', `${base}^{commit}`], { cwd: root });
if (baseSha.status !== 0) {
  console.log(`proto-breaking: no ${base} to compare against (single commit or shallow clone): nothing to check`);
  done(0);
}
const sha = baseSha.stdout.trim();
const hasProtos = PATHS.every((p) => git(['cat-file', '-e', `${sha}:${p}`], { cwd: root }).status === 0);
if (!hasProtos) {
  console.log(`proto-breaking: ${sha.slice(0, 12)} has no buf module (${PATHS.join(', ')}): nothing to check`);
  done(0);
}

tmp = mkdtempSync(join(tmpdir(), 'ditpipe-proto-base-'));
const archive = spawnSync('sh', ['-c', `git archive "${sha}" -- ${PATHS.join(' ')} | tar -x -C "${tmp}"`], { cwd: root, encoding: 'utf8' });
if (archive.status !== 0) fail(`git archive ${sha}: ${archive.stderr.trim()}`);
const r = spawnSync(buf, ['breaking', '--against', tmp], { cwd: root, encoding: 'utf8' });
if (r.error) fail(`buf breaking: ${r.error.message}`);
const findings = `${r.stdout}${r.stderr}`.trim();
const what = `proto/ ${dirty ? '(working tree)' : '(HEAD)'} against ${dirty ? 'HEAD' : 'HEAD^1'} ${sha.slice(0, 12)}`;
if (r.status === 0) {
  console.log(`proto-breaking: ${what}: no breaking change`);
  done(0);
}
const allowed = dirty
  ? process.env.DITPIPE_PROTO_BREAKING?.trim()
  : /^Proto-Breaking:\s*(.+)$/m.exec(git(['log', '-1', '--format=%B', 'HEAD'], { cwd: root }).stdout)?.[1]?.trim();
if (findings) console.error(findings);
if (allowed) {
  console.log(`proto-breaking: ${what}: breaking changes above let through (Proto-Breaking: ${allowed})`);
  done(0);
}
fail(
  `${what}: breaking changes (buf breaking, rules in buf.yaml). If the break is meant, say why in a ` +
    `'Proto-Breaking: <why>' line of the commit message (DITPIPE_PROTO_BREAKING=<why> for uncommitted work).`,
);
