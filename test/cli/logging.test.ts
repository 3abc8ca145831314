// Logs a person can read: the rate-limited event log (one line at once, a count later), the
// scheduler's failed-request log by code and field, pretty lines on request (--log-format) and
// JSON otherwise.
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createLogger, RateLimitedLog } from '../../shared/log.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

function memoryLogger(): { log: pino.Logger; lines: () => Array<Record<string, unknown>> } {
  let text = '';
  const sink = new Writable({ write: (chunk, _enc, cb) => ((text += chunk.toString()), cb()) });
  return {
    log: pino({ level: 'debug' }, sink),
    lines: () =>
      text
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

describe('RateLimitedLog', () => {
  it('writes the first event of a kind at once and the rest as one count per window', () => {
    vi.useFakeTimers();
    try {
      const { log, lines } = memoryLogger();
      const events = new RateLimitedLog(log, { windowMs: 10_000, maxKeys: 3 });
      for (let i = 0; i < 500; i++) events.event('warn', 'A', { code: 'A' }, 'failed: A');
      events.event('info', 'B', {}, 'failed: B');
      expect(lines().map((l) => l.msg)).toEqual(['failed: A', 'failed: B']);
      vi.advanceTimersByTime(10_001);
      expect(lines().slice(2)).toEqual([
        expect.objectContaining({ msg: 'failed: A (and 499 more like it within 10 s)', repeated: 499, code: 'A' }),
      ]);
      // A new window starts with a line again; more kinds than maxKeys share one.
      events.event('warn', 'A', {}, 'failed: A');
      for (const k of ['C', 'D', 'E', 'F']) events.event('warn', k, {}, `failed: ${k}`);
      expect(
        lines()
          .slice(3)
          .map((l) => l.msg),
      ).toEqual(['failed: A', 'failed: C', 'failed: D', 'failed: E']);
      events.flush();
      expect(lines().at(-1)?.msg).toBe('failed: E (and 1 more like it within 10 s)');
    } finally {
      vi.useRealTimers();
    }
  });
});

describe('the scheduler', () => {
  let p: Pipeline;
  const mem = memoryLogger();
  beforeAll(async () => {
    p = await startPipeline({ transport: { kind: 'inproc' }, log: mem.log });
  });
  afterAll(async () => {
    await p?.stop();
  });

  it('logs failed requests with code and field, a storm of them as a count', async () => {
    for (let i = 0; i < 30; i++) await p.api.generate({ model: DIT_NAME, classLabels: [{ index: 99 }] }).catch(() => undefined);
    await p.api.generate({ model: 'nope', classLabels: [{ index: 1 }] }).catch(() => undefined);
    const failed = mem.lines().filter((l) => String(l.msg).startsWith('request failed'));
    expect(failed).toEqual([
      expect.objectContaining({
        level: 30,
        code: 'INVALID_ARGUMENT',
        field: 'class_labels[0]',
        msg: expect.stringMatching(
          /^request failed: INVALID_ARGUMENT \(class_labels\[0\]\): class_labels\[0\]: class index must be within 0\.\.9/,
        ),
      }),
      expect.objectContaining({ code: 'NOT_FOUND', msg: expect.stringContaining('model "nope" is not served here') }),
    ]);
  });
});

describe('--log-format', () => {
  const capture = (isTTY: boolean): Writable & { isTTY: boolean; text: string } => {
    const w = new Writable({ write: (chunk, _enc, cb) => ((w.text += chunk.toString()), cb()) }) as Writable & {
      isTTY: boolean;
      text: string;
    };
    w.isTTY = isTTY;
    w.text = '';
    return w;
  };
  it('writes pretty lines for a terminal (auto) or when asked, JSON lines otherwise', () => {
    for (const [format, tty, pretty] of [
      ['auto', true, true],
      ['auto', false, false],
      ['pretty', false, true],
      ['json', true, false],
    ] as const) {
      const out = capture(tty);
      createLogger('scheduler', { format, stream: out }).warn({ code: 'UNAVAILABLE' }, 'request failed');
      if (pretty) {
        expect(out.text, `${format} tty=${tty}`).toMatch(/WARN.*\(scheduler\).*request failed/);
        expect(out.text).not.toMatch(/^\{/);
      } else
        expect(JSON.parse(out.text), `${format} tty=${tty}`).toMatchObject({
          level: 40,
          name: 'scheduler',
          msg: 'request failed',
          code: 'UNAVAILABLE',
        });
    }
  });
});
