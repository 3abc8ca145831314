import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { Batcher } from '../../shared/batching.ts';
import { CancelledError, ResourceExhaustedError } from '../../shared/errors.ts';
import type { WorkSource } from '../../shared/transport/types.ts';

function recorder(passMs: number, maxWaitMs = 5): { batcher: Batcher<string, string>; passes: string[][] } {
  const passes: string[][] = [];
  const batcher = new Batcher<string, string>(
    async (jobs) => {
      passes.push(jobs);
      await sleep(passMs);
      return jobs.map((j) => `${j}!`);
    },
    { maxRows: 4, maxWaitMs },
  );
  return { batcher, passes };
}

describe('Batcher', () => {
  it('answers each job with its own result and the pass size', async () => {
    const { batcher } = recorder(1);
    const [a, b] = await Promise.all([batcher.submit('a', 1), batcher.submit('b', 2)]);
    expect(a).toMatchObject({ result: 'a!', batchRows: 3 });
    expect(b.result).toBe('b!');
    expect(a.queueMs).toBeGreaterThanOrEqual(0);
  });

  it('starts a pass as soon as the row budget is full, and never exceeds it', async () => {
    const { batcher, passes } = recorder(1);
    await Promise.all(['a', 'b', 'c', 'd', 'e'].map((j) => batcher.submit(j, 2)));
    expect(passes.map((p) => p.length)).toEqual([2, 2, 1]);
  });

  it('refuses a job larger than the budget, and a cancelled one', async () => {
    const { batcher, passes } = recorder(1);
    await expect(batcher.submit('big', 5)).rejects.toBeInstanceOf(ResourceExhaustedError);
    const ac = new AbortController();
    const p = batcher.submit('x', 1, ac.signal);
    ac.abort();
    await expect(p).rejects.toBeInstanceOf(CancelledError);
    expect(passes).toEqual([]);
    await batcher.whenIdle();
  });

  it('keeps two interleaved requests in the same passes (steps that come back just after a pass join the next one)', async () => {
    // Margins are wide (25 ms window, 40 ms passes) so a loaded test machine does not blur them.
    const { batcher, passes } = recorder(40, 25);
    // Two "requests" stepping in a loop; each resubmits 1-3 ms after its answer. B arrives while
    // A's first pass runs, so without the fix the two would alternate in passes of one.
    const loop = async (name: string, delay: number): Promise<void> => {
      await sleep(delay);
      for (let step = 0; step < 6; step++) {
        await batcher.submit(name, 1);
        await sleep(1 + (name === 'b' ? 2 : 0));
      }
    };
    await Promise.all([loop('a', 0), loop('b', 30)]);
    const shared = passes.filter((p) => p.length === 2).length;
    expect(shared).toBeGreaterThanOrEqual(4);
    expect(passes.length).toBeLessThanOrEqual(8);
  });
});

/**
 * A work source that plays a work queue: `add` queues a job (rows each); take() hands over what
 * fits the room (as a replica's pull does), waiting up to waitMs for a job when none is queued,
 * and records each take and whether a pass was running then.
 */
class FakeQueue implements WorkSource {
  readonly queued: Array<{ job: string; rows: number }> = [];
  readonly takes: Array<{ room: number; waitMs: number; duringPass: boolean }> = [];
  readonly results = new Map<string, Promise<unknown>>();
  /** Passes running right now (the test's pass function keeps it). */
  running = 0;
  private done = false;
  private arrived: (() => void) | null = null;
  batcher!: Batcher<string, string>;

  get closed(): boolean {
    return this.done;
  }

  async take(room: () => number, waitMs: number): Promise<number> {
    this.takes.push({ room: room(), waitMs, duringPass: this.running > 0 });
    if (this.queued.length === 0 && waitMs > 0) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, waitMs);
        this.arrived = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.arrived = null;
    }
    while (this.queued.length > 0 && room() > 0) {
      const { job, rows } = this.queued.shift() as { job: string; rows: number };
      this.results.set(job, this.batcher.submit(job, rows));
    }
    return this.queued.length;
  }

  add(job: string, rows: number): void {
    this.queued.push({ job, rows });
    this.arrived?.();
  }

  close(): void {
    this.done = true;
    this.arrived?.();
  }
}

describe('Batcher with a work source', () => {
  function pulled(passMs: number, maxWaitMs: number, maxRows = 4): { passes: string[][]; q: FakeQueue } {
    const passes: string[][] = [];
    const q = new FakeQueue();
    q.batcher = new Batcher<string, string>(
      async (jobs) => {
        passes.push(jobs);
        q.running++;
        await sleep(passMs);
        q.running--;
        return jobs.map((j) => `${j}!`);
      },
      { maxRows, maxWaitMs },
    );
    q.batcher.attach(q);
    return { passes, q };
  }
  it('takes work only when it can start a pass, no more than the room its budget leaves', async () => {
    const { passes, q } = pulled(30, 5);
    for (let i = 0; i < 7; i++) q.add(`j${i}`, 2);
    await expect.poll(() => passes.length, { timeout: 5_000 }).toBe(4);
    await Promise.all([...q.results.values()]);
    expect(passes.map((p) => p.length)).toEqual([2, 2, 2, 1]);
    // Never asked for work while a pass ran, and never for more room than 4 rows.
    expect(q.takes.filter((t) => t.duringPass)).toEqual([]);
    expect(Math.max(...q.takes.map((t) => t.room))).toBeLessThanOrEqual(4);
    q.close();
  });

  it('starts a lone job at once when the queue is empty: an idle replica does not wait for company', async () => {
    // A wait for company of 10 s would show; the job must be served long before.
    const { passes, q } = pulled(1, 10_000);
    await sleep(20);
    q.add('alone', 2);
    await expect.poll(() => passes.length, { timeout: 2_000 }).toBe(1);
    expect((await q.results.get('alone')) as { queueMs: number }).toMatchObject({ result: 'alone!' });
    q.close();
  });

  it('after a pass, waits (up to maxWait) for the rows of that pass to come back before starting with fewer', async () => {
    const { passes, q } = pulled(20, 300, 8);
    q.add('a1', 2);
    q.add('b1', 2);
    await expect.poll(() => passes.length, { timeout: 2_000 }).toBe(1);
    await Promise.all([q.results.get('a1'), q.results.get('b1')]);
    // Step 2 of "a" comes back at once, "b" 60 ms later: they still share the next pass.
    q.add('a2', 2);
    await sleep(60);
    q.add('b2', 2);
    await expect.poll(() => passes.length, { timeout: 2_000 }).toBe(2);
    expect(passes[1]).toEqual(['a2', 'b2']);
    q.close();
  });

  it('a lone job that comes back later than maxWait is still awaited by one pull, which does not lapse first', async () => {
    const { passes, q } = pulled(5, 2);
    q.add('a1', 2);
    await expect.poll(() => passes.length, { timeout: 2_000 }).toBe(1);
    await q.results.get('a1');
    const before = q.takes.length;
    // Its next step takes 30 ms to come back (a round trip through the scheduler), past maxWait.
    await sleep(30);
    q.add('a2', 2);
    await expect.poll(() => passes.length, { timeout: 2_000 }).toBe(2);
    // One take waited for it: an idle one, not a 2 ms wait for company that lapsed and left the
    // job in the queue until the next pull.
    const after = q.takes.slice(before, before + 1);
    expect(after).toHaveLength(1);
    expect(after[0].waitMs).toBeGreaterThan(100);
    expect(q.takes.length - before).toBeLessThanOrEqual(2);
    q.close();
  });

  it('gives jobs with different keys separate passes (the decoder batches latents of one size)', async () => {
    const passes: Array<{ key: string; jobs: string[] }> = [];
    const batcher = new Batcher<string, string>(
      async (jobs, _rows, key) => {
        passes.push({ key, jobs });
        await sleep(1);
        return jobs;
      },
      { maxRows: 8, maxWaitMs: 5 },
    );
    await Promise.all([
      batcher.submit('a', 1, undefined, '8x8'),
      batcher.submit('b', 1, undefined, '16x16'),
      batcher.submit('c', 1, undefined, '8x8'),
    ]);
    expect(passes).toEqual([
      { key: '8x8', jobs: ['a', 'c'] },
      { key: '16x16', jobs: ['b'] },
    ]);
  });
});
