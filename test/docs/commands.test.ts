// The command lines the docs show must work as written, so a renamed flag or command breaks the
// build rather than the reader: every row of the README's "Running it" table and every
// `ditpipe …` command in README.md, docs/*.md and the model card is checked against
// `ditpipe <command> --help` (the command exists, each flag exists, each value is among the
// flag's choices), the ones that can run here in seconds run for real, and the README's claim
// that every service flag has an environment variable is checked against --help too.
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { helpSpec, helpText, parseHelp } from '../helpers/cli-help.ts';
import { testModels, variantModels } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, '../..');
const README = readFileSync(join(ROOT, 'README.md'), 'utf8');
const tmp = mkdtempSync(join(tmpdir(), 'ditpipe-docs-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const unescape = (s: string): string => s.replace(/\\\|/g, '|');
/** Inline code spans, paired within a paragraph (markdown never lets a span cross a blank line). */
const spans = (text: string): string[] =>
  text
    .split(/\n[ \t]*\n/)
    .flatMap((para) => [...para.matchAll(/`([^`]+)`/g)])
    .map((m) => unescape(m[1]).replace(/\s+/g, ' ').trim());
/** Fenced code blocks, also those indented inside a list item. */
const FENCE = /^[ \t]*```[A-Za-z]*\n([\s\S]*?)^[ \t]*```/gm;

/** "ditpipe model build dit|vae" → one command line per alternative of a command word. */
function expand(line: string): string[] {
  const words = line.split(' ');
  const alt = words.findIndex((w) => w.includes('|'));
  if (alt < 0 || words.slice(0, alt).some((w) => w.startsWith('-'))) return [line];
  return words[alt].split('|').map((w) => [...words.slice(0, alt), w, ...words.slice(alt + 1)].join(' '));
}

interface TableRow {
  /** Command lines of the first column (`ditpipe …` or `npm …`), alternatives (`dit|vae`) expanded. */
  commands: string[];
  /** Flags the second column names, for the row's first ditpipe command. */
  flags: string[];
  text: string;
}

/** The "Running it" table of the README. */
function runningTable(): TableRow[] {
  const section = README.split(/^## Running it$/m)[1].split(/^## /m)[0];
  const rows = section.split('\n').filter((l) => l.startsWith('| ') && !l.startsWith('| command'));
  return rows.map((line) => {
    const cells = line.split(/(?<!\\)\|/).slice(1, -1);
    const commands = spans(cells[0]).flatMap((c) => expand(c.startsWith('ditpipe ') || c.startsWith('npm ') ? c : `ditpipe ${c}`));
    const flags = spans(cells[1]).filter((s) => s.startsWith('--'));
    return { commands, flags, text: line };
  });
}

/** `ditpipe …` (or `node bin/ditpipe.js …`) commands anywhere in a markdown file: inline code and code-block lines. */
function commandsIn(file: string): string[] {
  const text = readFileSync(join(ROOT, file), 'utf8');
  const out: string[] = [];
  const blocks = [...text.matchAll(FENCE)].map((m) => m[1]);
  for (const b of blocks) for (const line of b.split('\n')) out.push(line.replace(/\s+#.*$/, '').trim());
  const prose = text.replace(FENCE, '');
  out.push(...spans(prose));
  return out
    .map((c) => c.replace(/^node bin\/ditpipe\.js /, 'ditpipe '))
    .filter((c) => /^ditpipe( |$)/.test(c) && !c.includes('<'))
    .flatMap(expand);
}

/** Prose paragraphs whose backticks do not pair up: their code spans cannot be read (nor checked). */
function unpairedParagraphs(file: string): string[] {
  const prose = readFileSync(join(ROOT, file), 'utf8').replace(FENCE, '');
  return prose.split(/\n[ \t]*\n/).filter((para) => (para.match(/`/g) ?? []).length % 2 === 1);
}

/** What --help says about one documented command line; problems as messages. */
async function check(line: string, extraFlags: string[] = []): Promise<string[]> {
  const tokens = line.split(' ').slice(1);
  const problems: string[] = [];
  let spec;
  try {
    spec = await helpSpec(tokens);
  } catch (err) {
    return [`${line}: ${(err as Error).message}`];
  }
  const words = tokens.slice(
    0,
    tokens.findIndex((t) => t.startsWith('-')) < 0 ? tokens.length : tokens.findIndex((t) => t.startsWith('-')),
  );
  if (words.slice(0, spec.path.length).join(' ') !== spec.path.join(' '))
    problems.push(`${line}: --help describes "ditpipe ${spec.path.join(' ')}"`);
  const positionals = words.slice(spec.path.length).filter((w) => w !== '…');
  if (positionals.length > spec.positionals) {
    problems.push(
      `${line}: "${positionals.join(' ')}" is not a command of ditpipe ${spec.path.join(' ')} (commands: ${spec.commands.join(', ') || 'none'})`,
    );
  }
  const flagTokens = [
    ...tokens.slice(words.length),
    ...extraFlags.flatMap((f) => f.split(' ').flatMap((p, i) => (i === 0 ? p.split('/') : [p]))),
  ];
  for (let i = 0; i < flagTokens.length; i++) {
    const t = flagTokens[i];
    if (!t.startsWith('--')) continue;
    const opt = spec.options.get(t);
    if (!opt) {
      problems.push(`${line}: ditpipe ${spec.path.join(' ')} has no ${t} (it has ${[...spec.options.keys()].join(' ')})`);
      continue;
    }
    const value = flagTokens[i + 1];
    if (!opt.takesValue || value === undefined || value.startsWith('--')) continue;
    i++;
    const placeholder = /^[A-Z][A-Z_]*$|…|^host:port$/.test(value);
    if (opt.choices && !placeholder) {
      for (const v of value.split('|'))
        if (!opt.choices.includes(v)) problems.push(`${line}: ${t} ${v} is not one of ${opt.choices.join(', ')}`);
    }
  }
  return problems;
}

describe("the README's command table", () => {
  const rows = runningTable();

  it('has its rows (the parser reads the table it checks)', () => {
    expect(rows.length).toBeGreaterThanOrEqual(10);
    expect(rows.flatMap((r) => r.commands)).toEqual(
      expect.arrayContaining([
        'npm start',
        'ditpipe start',
        'ditpipe model build dit',
        'ditpipe model build vae',
        'ditpipe model info',
        'npm run bench',
      ]),
    );
  });

  it('names only commands, flags and values that --help knows', async () => {
    const problems: string[] = [];
    for (const r of rows) {
      const ditpipe = r.commands.filter((c) => c.startsWith('ditpipe '));
      for (const [i, c] of ditpipe.entries()) problems.push(...(await check(c, i === 0 ? r.flags : [])));
    }
    expect(problems).toEqual([]);
  });

  it('names npm scripts that exist and do what the table says', () => {
    const scripts = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
    const npm = rows.flatMap((r) => r.commands.filter((c) => c.startsWith('npm ')));
    for (const c of npm) {
      const name = c === 'npm start' ? 'start' : c.replace(/^npm run /, '');
      expect(scripts[name], c).toBeDefined();
    }
    expect(scripts.start).toBe('node bin/ditpipe.js start'); // "`npm start` (= `ditpipe start`)"
  });
});

describe('ditpipe commands in the docs', () => {
  it.each(['README.md', 'docs/loadtest.md', 'docs/kubernetes.md', 'docs/model-dir.md', 'models/fashion-mnist/README.md'])(
    '%s names only commands and flags --help knows',
    async (file) => {
      expect(unpairedParagraphs(file), `${file}: a stray backtick`).toEqual([]);
      const commands = commandsIn(file);
      expect(commands.length, file).toBeGreaterThan(0);
      const problems: string[] = [];
      for (const c of commands) problems.push(...(await check(c)));
      expect(problems).toEqual([]);
    },
  );
});

describe('environment variables', () => {
  const services = ['scheduler', 'denoiser', 'decoder', 'start'];

  it('every flag of the service commands has one (README: "Every flag of the service commands has an environment variable")', async () => {
    expect(README).toMatch(
      /Every flag of the service commands \(`scheduler`, `denoiser`, `decoder`, `start`\) has an\s+environment variable/,
    );
    const missing: string[] = [];
    for (const s of services) {
      const spec = await helpSpec([s]);
      for (const o of spec.options.values()) if (o.long !== '--help' && !o.env) missing.push(`${s} ${o.long}`);
    }
    expect(missing).toEqual([]);
  });

  it("every variable the README names is read by a command (a flag's variable, or one its --help says it reads)", async () => {
    const named = [...new Set([...README.matchAll(/\b((?:NATS|DITPIPE)_[A-Z0-9_]+)\b/g)].map((m) => m[1]))];
    expect(named.length).toBeGreaterThan(10);
    const read = new Set<string>();
    for (const s of [...services, 'generate']) {
      for (const e of (await helpSpec([s])).byEnv.keys()) read.add(e);
      // Read outside a flag (a token list beside the tokens file, a token beside --token-file), said in --help.
      for (const m of (await helpText([s])).matchAll(/\b((?:NATS|DITPIPE)_[A-Z0-9_]+) may\b/g)) read.add(m[1]);
    }
    expect(named.filter((n) => !read.has(n))).toEqual([]);
  });
});

describe('README command lines, run for real', () => {
  let pipeline: Pipeline;
  beforeAll(async () => {
    // A served model with the Fashion-MNIST class names, so `--class Sandal,3` means what it says.
    pipeline = await startPipeline({
      transport: { kind: 'inproc' },
      models: { ditDir: variantModels().namedDitDir, vaeDir: testModels().vaeDir },
    });
  });
  afterAll(async () => {
    await pipeline?.stop();
  });

  const row = (command: string): string => {
    const c = runningTable()
      .flatMap((r) => r.commands)
      .find((x) => x.startsWith(command));
    if (!c) throw new Error(`no "${command}" row in the README table`);
    return c;
  };
  const ditpipe = (line: string) =>
    run(process.execPath, [join(ROOT, 'bin/ditpipe.js'), ...line.split(' ').slice(1)], { cwd: ROOT, timeout: 120_000 });

  it('generate, as the table writes it', async () => {
    const out = join(tmp, 'generate');
    const line = row('ditpipe generate')
      .replace('host:port', pipeline.address)
      .replace(/--out DIR$/, `--out ${out}`);
    const r = await ditpipe(line);
    expect(r.stdout).toContain('8 image(s) from dit-tiny-named, seed 1, 50 steps, cfg 4');
    expect(readdirSync(out).filter((f) => f.endsWith('-Sandal.png'))).toHaveLength(4);
    expect(existsSync(join(out, 'run.json'))).toBe(true);
  });

  it('sample, as the table writes it', async () => {
    const out = join(tmp, 'run.safetensors');
    const line = row('ditpipe sample')
      .replace('--model-dir DIR', `--model-dir ${testModels().ditDir}`)
      .replace('--out run.safetensors', `--out ${out}`);
    const r = await ditpipe(line);
    expect(r.stdout).toMatch(/2 sample\(s\) \[4, 8, 8\], 250 ddpm steps/);
    expect(existsSync(out)).toBe(true);
  });

  it('--help of the binary is the help these checks read in-process', async () => {
    for (const args of [[], ['generate'], ['model', 'build', 'vae']]) {
      const bin = parseHelp(await helpText(args));
      const inproc = await helpSpec(args);
      expect([bin.path, [...bin.options.keys()], bin.commands], args.join(' ')).toEqual([
        inproc.path,
        [...inproc.options.keys()],
        inproc.commands,
      ]);
    }
  });

  it('model info and --version', async () => {
    const info = await ditpipe(`ditpipe model info ${testModels().ditDir}`);
    expect(info.stdout).toContain('kind:     dit');
    const v = await ditpipe('ditpipe --version');
    expect(v.stdout).toMatch(/^ditpipe \d+\.\d+\.\d+/);
  });
});
