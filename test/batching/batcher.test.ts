import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { Batcher } from '../../shared/batching.ts';
import { CancelledError, ResourceExhaustedError } from '../../shared/errors.ts';

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
