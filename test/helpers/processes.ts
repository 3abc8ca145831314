// Spawns `ditpipe` service processes for tests and reads what they log (pino JSON lines on stderr).
import { spawn, type ChildProcess } from 'node:child_process';
import { resolve } from 'node:path';

const BIN = resolve(import.meta.dirname, '../../bin/ditpipe.js');
const live = new Set<ChildProcess>();

export interface ServiceProcess {
  name: string;
  proc: ChildProcess;
  log(): string;
  /** Resolves with the first JSON log line whose `msg` matches. */
  waitFor(msg: RegExp, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** SIGTERM (or the given signal) and wait for the exit; returns the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** `env` adds to (or, with undefined, removes from) this process's environment. */
export function spawnService(name: string, args: string[], env: Record<string, string | undefined> = {}): ServiceProcess {
  const merged: NodeJS.ProcessEnv = { ...process.env, ...env };
  for (const [k, v] of Object.entries(env)) if (v === undefined) delete merged[k];
  const proc = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: merged });
  live.add(proc);
  let log = '';
  const lines: Array<Record<string, unknown>> = [];
  const waiters: Array<() => void> = [];
  const onData = (chunk: Buffer): void => {
    log += chunk.toString();
    for (const line of chunk.toString().split('\n')) {
      if (!line.startsWith('{')) continue;
      try {
        lines.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        // a partial line; the next chunk completes it only for the raw log
      }
    }
    for (const w of waiters.splice(0)) w();
  };
  proc.stdout?.on('data', onData);
  proc.stderr?.on('data', onData);
  const exited = new Promise<number | null>((res) =>
    proc.once('exit', (code) => {
      live.delete(proc);
      res(code);
    }),
  );
  return {
    name,
    proc,
    log: () => log,
    async waitFor(msg, timeoutMs = 90_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const hit = lines.find((l) => typeof l.msg === 'string' && msg.test(l.msg));
        if (hit) return hit;
        if (proc.exitCode !== null) throw new Error(`${name} exited (code ${proc.exitCode}) before logging ${msg}:\n${log}`);
        if (Date.now() > deadline) throw new Error(`${name} did not log ${msg} within ${timeoutMs} ms:\n${log}`);
        await new Promise<void>((r) => {
          const t = setTimeout(r, 200);
          waiters.push(() => {
            clearTimeout(t);
            r();
          });
        });
      }
    },
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/** Service processes started here that are still running (teardown checks it is 0). */
export function liveServiceProcesses(): number {
  return live.size;
}
