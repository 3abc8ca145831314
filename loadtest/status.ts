// The live status line on stderr: one line redrawn in place on a terminal, plain periodic lines
// otherwise (logs and CI keep a readable history).
import type { Recorder } from './stats.ts';

export interface StatusSource {
  rec: Recorder;
  inFlight: number;
  startMs: number;
}

const fmtMs = (v: number | null): string => (v === null ? '-' : v >= 10_000 ? `${(v / 1000).toFixed(1)}s` : `${Math.round(v)}ms`);

export class StatusLine {
  private timer: NodeJS.Timeout | null = null;
  private readonly tty: boolean;
  private drawn = false;

  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly intervalMs = (out as { isTTY?: boolean }).isTTY ? 250 : 5_000,
  ) {
    this.tty = Boolean((out as { isTTY?: boolean }).isTTY);
  }

  start(label: string, source: () => StatusSource): void {
    this.stop();
    const draw = (): void => {
      const line = `[${label}] ${format(source())}`;
      if (this.tty) {
        const cols = (this.out as { columns?: number }).columns ?? 120;
        this.out.write(`\r\x1b[K${line.slice(0, cols - 1)}`);
        this.drawn = true;
      } else this.out.write(`${line}\n`);
    };
    this.timer = setInterval(draw, this.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    if (this.drawn) this.out.write('\r\x1b[K');
    this.drawn = false;
  }
}

/** "elapsed 12.3s  rate 4.9/s  in flight 3  p50 120ms  p99 340ms  errors 0  images 40" over the last 5 s for the rate. */
export function format(s: StatusSource): string {
  const t = performance.timeOrigin + performance.now();
  const elapsed = Math.max(0, t - s.startMs);
  const rs = s.rec.results;
  let recent = 0;
  for (let i = rs.length - 1; i >= 0 && rs[i].end > t - 5_000; i--) recent++;
  const window = Math.min(5_000, Math.max(elapsed, 1));
  return [
    `elapsed ${(elapsed / 1000).toFixed(1)}s`,
    `rate ${((recent * 1000) / window).toFixed(1)}/s`,
    `in flight ${s.inFlight}`,
    `p50 ${fmtMs(s.rec.latencyMs(50))}`,
    `p99 ${fmtMs(s.rec.latencyMs(99))}`,
    `errors ${s.rec.errors}`,
    `done ${s.rec.count}`,
    `images ${s.rec.images}`,
  ].join('  ');
}
