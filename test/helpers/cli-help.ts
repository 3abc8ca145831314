// The CLI as its --help describes it: commands, options, their environment variables, defaults
// and choices, read from the help text of the command tree `ditpipe` runs (so a test built on it
// breaks when a flag or command is renamed). Used by the k8s manifest test and the docs test.
import { execFile } from 'node:child_process';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { buildProgram } from '../../cli/program.ts';

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, '../..');

export interface CliOption {
  long: string;
  takesValue: boolean;
  env?: string;
  default?: string;
  choices?: string[];
}

export interface CliSpec {
  /** Words after `ditpipe`, e.g. ["model", "build", "dit"]. */
  path: string[];
  positionals: number;
  options: Map<string, CliOption>;
  byEnv: Map<string, CliOption>;
  /** Subcommand names, when the command has any. */
  commands: string[];
}

export function parseHelp(text: string): CliSpec {
  const usage = /^Usage: ditpipe ?(.*)$/m.exec(text);
  if (!usage) throw new Error(`no Usage line in:\n${text}`);
  const words = usage[1].split(/\s+/).filter(Boolean);
  const cut = words.findIndex((w) => w.startsWith('['));
  const path = cut < 0 ? words.filter((w) => !w.startsWith('<')) : words.slice(0, cut);
  const positionals = words.filter((w) => /^[<[][a-z]/.test(w) && w !== '[options]' && w !== '[command]').length;
  const section = text.split(/^Options:$/m)[1]?.split(/^\S.*:$/m)[0] ?? '';
  const entries: string[] = [];
  for (const line of section.split('\n')) {
    if (/^ {2}-/.test(line)) entries.push(line.trim());
    else if (line.trim() && entries.length) entries[entries.length - 1] += ` ${line.trim()}`;
  }
  const options = new Map<string, CliOption>();
  const byEnv = new Map<string, CliOption>();
  for (const e of entries) {
    const flag = /^(?:-\w, )?--([a-z0-9-]+)( [<[])?/.exec(e);
    if (!flag) continue;
    // commander appends "(choices: …, default: …, env: …)" as the entry's last parenthesis.
    const tail = /\(([^()]*)\)$/.exec(e)?.[1] ?? '';
    const opt: CliOption = { long: `--${flag[1]}`, takesValue: Boolean(flag[2]) };
    const env = /\benv: ([A-Z][A-Z0-9_]*)/.exec(tail);
    if (env) opt.env = env[1];
    const def = /\bdefault: ("[^"]*"|[^,]+)/.exec(tail);
    if (def) opt.default = def[1].replace(/^"|"$/g, '');
    const choices = /\bchoices: ((?:"[^"]*"(?:, )?)+)/.exec(tail);
    if (choices) opt.choices = [...choices[1].matchAll(/"([^"]*)"/g)].map((m) => m[1]);
    options.set(opt.long, opt);
    if (opt.env) byEnv.set(opt.env, opt);
  }
  const commandSection = text.split(/^Commands:$/m)[1] ?? '';
  const commands = [...commandSection.matchAll(/^ {2}([a-z][a-z0-9-]*)/gm)].map((m) => m[1]).filter((c) => c !== 'help');
  return { path, positionals, options, byEnv, commands };
}

let program: ReturnType<typeof buildProgram> | undefined;

/**
 * The spec of the command `args` start with (the leading words that are not flags): the text
 * `ditpipe <words> --help` prints, from the same command tree, read in this process. Throws for a
 * word that is not a subcommand where the command has subcommands, as ditpipe does.
 */
export async function helpSpec(args: string[]): Promise<CliSpec> {
  program ??= buildProgram();
  let cmd = await program;
  for (const w of args) {
    if (w.startsWith('-')) break;
    const sub = cmd.commands.find((c) => c.name() === w || c.aliases().includes(w));
    if (sub) cmd = sub;
    else if (cmd.commands.length > 0)
      throw new Error(`ditpipe ${args.join(' ')}: unknown command '${w}' (commands: ${cmd.commands.map((c) => c.name()).join(', ')})`);
    else break;
  }
  return parseHelp(cmd.helpInformation());
}

/** `ditpipe <args> --help` as a process prints it (for the checks that want the binary itself). */
export async function helpText(args: string[]): Promise<string> {
  return (await run(process.execPath, [join(ROOT, 'bin/ditpipe.js'), ...args, '--help'], { cwd: ROOT, timeout: 60_000 })).stdout;
}
