// `ditpipe` command line (the command tree is in cli/program.ts).
import { buildProgram } from './program.ts';

const program = await buildProgram();
try {
  await program.parseAsync(process.argv);
} catch (err) {
  // commander throws for --help/--version (exitCode 0) and usage errors (already printed).
  const code = (err as { exitCode?: number }).exitCode;
  if (typeof code === 'number') process.exit(code);
  console.error(`ditpipe: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
}
