// `ditpipe` command line: each area registers its own subcommands here.
import { Command } from 'commander';
import { VERSION } from '../shared/version.ts';

const program = new Command('ditpipe')
  .description('Class-conditional DiT image generation as a distributed pipeline (scheduler, denoiser, decoder over NATS).')
  .version(`ditpipe ${VERSION}`, '-V, --version', 'print the ditpipe version')
  .showHelpAfterError()
  .exitOverride();

// Subcommand modules export a `command` or several `commands`; keep this list sorted.
const modules: Array<() => Promise<{ command?: Command; commands?: Command[] }>> = [
  () => import('./generate.ts'),
  () => import('./loadtest.ts'),
  () => import('./model.ts'),
  () => import('./sample.ts'),
  () => import('./serve.ts'),
  () => import('./start.ts'),
  () => import('./up.ts'),
];

for (const load of modules) {
  const m = await load();
  for (const c of m.commands ?? (m.command ? [m.command] : [])) program.addCommand(c);
}

try {
  await program.parseAsync(process.argv);
} catch (err) {
  // commander throws for --help/--version (exitCode 0) and usage errors (already printed).
  const code = (err as { exitCode?: number }).exitCode;
  if (typeof code === 'number') process.exit(code);
  console.error(`ditpipe: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
}
