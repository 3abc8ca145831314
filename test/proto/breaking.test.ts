// scripts/proto-breaking.mjs (npm run proto:breaking) on throwaway git repositories with a small
// buf module: a compatible change passes, a removed field fails naming it, a commit that says
// `Proto-Breaking:` is let through, uncommitted work is checked against HEAD, and a repository of
// one commit has nothing to compare against.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

const SCRIPT = join(import.meta.dirname, '../../scripts/proto-breaking.mjs');
const BUF_YAML = 'version: v2\nmodules:\n  - path: proto\nbreaking:\n  use:\n    - FILE\n';
const proto = (fields: string): string => `syntax = "proto3";\npackage demo.v1;\nmessage Thing {\n${fields}}\n`;

let dirs: string[] = [];
afterEach(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  dirs = [];
});

function git(dir: string, ...args: string[]): void {
  const r = spawnSync('git', ['-c', 'user.name=t', '-c', 'user.email=t@example.invalid', '-c', 'commit.gpgsign=false', ...args], {
    cwd: dir,
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`git ${args.join(' ')}: ${r.stderr}`);
}

function repo(): string {
  const dir = mkdtempSync(join(tmpdir(), 'ditpipe-breaking-test-'));
  dirs.push(dir);
  git(dir, 'init', '-q');
  writeFileSync(join(dir, 'buf.yaml'), BUF_YAML);
  mkdirSync(join(dir, 'proto/demo/v1'), { recursive: true });
  return dir;
}

function commit(dir: string, fields: string, message = 'change'): void {
  writeFileSync(join(dir, 'proto/demo/v1/thing.proto'), proto(fields));
  git(dir, 'add', '-A');
  git(dir, 'commit', '-q', '-m', message);
}

function check(dir: string, env: Record<string, string> = {}): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [SCRIPT], { cwd: dir, encoding: 'utf8', env: { ...process.env, ...env }, timeout: 60_000 });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

describe('proto:breaking', () => {
  it('has nothing to compare in a repository of one commit', () => {
    const dir = repo();
    commit(dir, '  string name = 1;\n');
    const r = check(dir);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/no HEAD\^1 to compare against/);
  });

  it('passes a compatible change and fails a removed field, naming it', () => {
    const dir = repo();
    commit(dir, '  string name = 1;\n  int32 size = 2;\n');
    commit(dir, '  string name = 1;\n  int32 size = 2;\n  bool big = 3;\n');
    const ok = check(dir);
    expect(ok.code, ok.out).toBe(0);
    expect(ok.out).toMatch(/no breaking change/);

    commit(dir, '  string name = 1;\n  bool big = 3;\n');
    const bad = check(dir);
    expect(bad.code, bad.out).toBe(1);
    expect(bad.out).toMatch(/"size"/);
    expect(bad.out).toMatch(/Proto-Breaking/);
  });

  it('lets a break through when the commit says why', () => {
    const dir = repo();
    commit(dir, '  string name = 1;\n  int32 size = 2;\n');
    commit(dir, '  string name = 1;\n', 'Drop size\n\nProto-Breaking: size was never read by any client');
    const r = check(dir);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/let through \(Proto-Breaking: size was never read/);
  });

  it('checks uncommitted work against HEAD', () => {
    const dir = repo();
    commit(dir, '  string name = 1;\n  int32 size = 2;\n');
    writeFileSync(join(dir, 'proto/demo/v1/thing.proto'), proto('  string name = 1;\n  string size = 2;\n'));
    const bad = check(dir);
    expect(bad.code, bad.out).toBe(1);
    expect(bad.out).toMatch(/\(working tree\) against HEAD/);
    expect(bad.out).toMatch(/size/);
    const allowed = check(dir, { DITPIPE_PROTO_BREAKING: 'local experiment' });
    expect(allowed.code, allowed.out).toBe(0);
  });
});
