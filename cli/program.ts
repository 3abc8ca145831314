// The `ditpipe` command tree: each area registers its own subcommands here. cli/main.ts parses
// the process's arguments with it; tests read its help in-process.
import { Command } from 'commander';
import { VERSION } from '../shared/version.ts';

// Subcommand modules export a `command` or several `commands`; keep this list sorted.
const modules: Array<() => Promise<{ command?: Command; commands?: Command[] }>> = [
  () => import('./generate.ts'),
  () => import('./loadtest.ts'),
  () => import('./model.ts'),
  () => import('./nats-config.ts'),
  () => import('./sample.ts'),
  () => import('./serve.ts'),
  () => import('./start.ts'),
  () => import('./up.ts'),
];

export async function buildProgram(): Promise<Command> {
  const program = new Command('ditpipe')
    .description('Class-conditional DiT image generation as a distributed pipeline (scheduler, denoiser, decoder over NATS).')
    .version(`ditpipe ${VERSION}`, '-V, --version', 'print the ditpipe version')
    .showHelpAfterError()
    .exitOverride();
  for (const load of modules) {
    const m = await load();
    for (const c of m.commands ?? (m.command ? [m.command] : [])) program.addCommand(c);
  }
  return program;
}
