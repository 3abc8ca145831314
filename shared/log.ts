// Logging: pino, as JSON lines (for log collectors) or pretty-printed by pino-pretty (for a person
// at a terminal), and a rate-limited event log that turns a flood of like events (a client sending
// bad requests in a loop, a replica failing every step) into a line now and a count later.
//
//   const log = createLogger('scheduler', { level: 'info', format: 'auto' });  // pretty on a TTY
//   const events = new RateLimitedLog(log, { windowMs: 10_000 });
//   events.event('warn', 'UNAVAILABLE|', { code: 'UNAVAILABLE' }, 'request failed: UNAVAILABLE');
import { pino, type Logger } from 'pino';
import pretty from 'pino-pretty';

export type { Logger } from 'pino';

export const LOG_FORMATS = ['auto', 'pretty', 'json'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

export interface LoggerOptions {
  level?: string;
  /** auto: pretty when the log stream (stderr) is a terminal, JSON otherwise. */
  format?: LogFormat;
  /** File descriptor logs go to (default 2, stderr). */
  fd?: number;
  /** A stream to write to instead of `fd` (tests); its `isTTY` decides `auto`. */
  stream?: NodeJS.WritableStream & { isTTY?: boolean };
}

/** Whether `format` comes out pretty for a stream whose TTY-ness is `isTTY`. */
export function prettyFor(format: LogFormat, isTTY: boolean): boolean {
  return format === 'pretty' || (format === 'auto' && isTTY);
}

export function createLogger(name: string, opts: LoggerOptions = {}): Logger {
  const fd = opts.fd ?? 2;
  const isTTY = opts.stream
    ? Boolean(opts.stream.isTTY)
    : fd === 2
      ? Boolean(process.stderr.isTTY)
      : fd === 1
        ? Boolean(process.stdout.isTTY)
        : false;
  const level = opts.level ?? 'info';
  if (prettyFor(opts.format ?? 'auto', isTTY)) {
    // Synchronous, so lines come out in order and nothing is lost when the process exits right after.
    const destination = opts.stream ?? fd;
    return pino(
      { name, level },
      pretty({ destination, sync: true, colorize: isTTY, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' }),
    );
  }
  return pino({ name, level }, opts.stream ?? pino.destination({ fd, sync: true }));
}

/** A logger that drops everything (library code logs through one when its caller gave none). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

type Level = 'debug' | 'info' | 'warn' | 'error';

interface Window {
  level: Level;
  msg: string;
  fields: Record<string, unknown>;
  suppressed: number;
  ends: number;
}

export interface RateLimitedLogOptions {
  /** Per key, the first event of a window is logged at once and the rest counted (default 10 000 ms). */
  windowMs?: number;
  /** Distinct keys tracked per window; events of further keys share one "other" key (default 32). */
  maxKeys?: number;
}

/**
 * Logs at most one line per key per window plus one summary line counting the rest, so a person
 * can read the log of a service under a storm of failures, and a log collector is not flooded.
 */
export class RateLimitedLog {
  private readonly windows = new Map<string, Window>();
  private timer: NodeJS.Timeout | null = null;
  private readonly windowMs: number;
  private readonly maxKeys: number;

  constructor(
    readonly log: Logger,
    opts: RateLimitedLogOptions = {},
  ) {
    this.windowMs = opts.windowMs ?? 10_000;
    this.maxKeys = opts.maxKeys ?? 32;
  }

  /** One event. Events with the same key are alike: only the first of a window is written out. */
  event(level: Level, key: string, fields: Record<string, unknown>, msg: string): void {
    let k = key;
    if (!this.windows.has(k) && this.windows.size >= this.maxKeys) k = '(other)';
    const w = this.windows.get(k);
    if (w) {
      w.suppressed++;
      return;
    }
    this.log[level](fields, msg);
    this.windows.set(k, { level, msg, fields, suppressed: 0, ends: Date.now() + this.windowMs });
    this.arm();
  }

  /** Writes the pending counts now (on shutdown) and forgets every window. */
  flush(): void {
    for (const w of this.windows.values()) this.summarise(w);
    this.windows.clear();
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private arm(): void {
    if (this.timer) return;
    this.timer = setTimeout(() => this.tick(), this.windowMs).unref();
  }

  private tick(): void {
    this.timer = null;
    const now = Date.now();
    for (const [k, w] of this.windows) {
      if (w.ends > now) continue;
      this.summarise(w);
      this.windows.delete(k);
    }
    if (this.windows.size > 0) this.arm();
  }

  private summarise(w: Window): void {
    if (w.suppressed === 0) return;
    this.log[w.level](
      { ...w.fields, repeated: w.suppressed, windowMs: this.windowMs },
      `${w.msg} (and ${w.suppressed} more like it within ${Math.round(this.windowMs / 1000)} s)`,
    );
  }
}
