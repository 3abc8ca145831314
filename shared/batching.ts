// Continuous batching for one model: jobs queue up while a forward pass runs; the next pass takes
// the oldest jobs up to a row budget (jobs with a key — e.g. a latent size — share a pass only with
// jobs of the same key). Jobs come from `submit()` (direct gRPC calls) and, once a work source is
// attached, from the model's work queue: the batcher pulls when it can start a pass, as much as
// fits its budget, so a busy replica takes nothing more and a free one takes what is waiting.
//
// When a pass starts: when the budget is full; or when the oldest waiting job has waited
// `maxWaitMs` (counted from the later of its arrival and the end of the last pass, so the steps a
// pass just answered can come back and join the next one instead of splitting the requests into
// two cohorts that take turns); or, with a work source, as soon as the queue is empty and the
// rows at hand are at least those of the last pass (nothing else is coming: a lone request never
// waits for company).
import { CancelledError, ResourceExhaustedError } from './errors.ts';
import type { WorkSource } from './transport/types.ts';

export interface BatchOptions {
  /** Most rows one forward pass takes. A job larger than this is refused. */
  maxRows: number;
  /** Longest time the oldest job waits for company before its pass starts. */
  maxWaitMs: number;
  /** What a row is, for error messages ("rows", "images"). */
  unit?: string;
}

export interface Batched<R> {
  result: R;
  /** Time the job waited before its pass started. */
  queueMs: number;
  /** Rows of the pass that served it. */
  batchRows: number;
}

interface Entry<J, R> {
  job: J;
  rows: number;
  key: string;
  enqueuedAt: number;
  signal: AbortSignal | undefined;
  resolve: (r: Batched<R>) => void;
  reject: (e: unknown) => void;
}

/** How long an idle replica's pull waits for work before it asks again. */
const IDLE_PULL_MS = 1_000;

export class Batcher<J, R> {
  private queue: Array<Entry<J, R>> = [];
  private running = false;
  private timer: NodeJS.Timeout | null = null;
  private idle: Array<() => void> = [];
  private passEnded: Array<() => void> = [];
  private queued = 0;
  private lastPassEnd = -Infinity;
  private lastPassRows = 0;
  private lastPassJobs = 0;
  private source: WorkSource | null = null;
  /** A take() of the source is in progress. */
  private taking = false;
  /** Messages the source said are still waiting (-1 before it said anything). */
  private pending = -1;
  private pulling: Promise<void> | null = null;

  /** `run` receives the jobs of one pass and returns their results in the same order. */
  constructor(
    private readonly run: (jobs: J[], rows: number, key: string) => Promise<R[]>,
    private readonly opts: BatchOptions,
  ) {}

  /** Rows waiting for a pass. */
  get queuedRows(): number {
    return this.queued;
  }

  submit(job: J, rows: number, signal?: AbortSignal, key = ''): Promise<Batched<R>> {
    const unit = this.opts.unit ?? 'rows';
    if (rows > this.opts.maxRows) {
      return Promise.reject(
        new ResourceExhaustedError(`a job of ${rows} ${unit} exceeds this replica's batch budget of ${this.opts.maxRows} ${unit}`),
      );
    }
    if (signal?.aborted) return Promise.reject(new CancelledError('cancelled before it was queued'));
    return new Promise((resolve, reject) => {
      this.queue.push({ job, rows, key, enqueuedAt: performance.now(), signal, resolve, reject });
      this.queued += rows;
      this.schedule();
    });
  }

  /**
   * Takes work from `source` from now on: whenever no pass runs and the budget has room, it
   * takes what the queue holds (or waits for the next message), and each call it takes reaches
   * submit() through the service's handler.
   */
  attach(source: WorkSource): void {
    if (this.source) throw new Error('a work source is already attached');
    this.source = source;
    this.pulling = this.pullLoop();
  }

  private async pullLoop(): Promise<void> {
    const source = this.source as WorkSource;
    while (!source.closed) {
      if (this.running || this.queued >= this.opts.maxRows) {
        await new Promise<void>((resolve) => this.passEnded.push(resolve));
        continue;
      }
      // Right after a pass, its jobs' next steps are on their way back: wait (up to maxWait) for as
      // many in one pull. Otherwise an idle replica waits for the next job, and a busy one for what
      // its oldest job may still wait. A lone job coming back has no company to wait for: its pull
      // is an idle one (it ends when the job arrives), so a round trip longer than maxWait does not
      // make the pull lapse and the job wait in the queue for the next one.
      const now = performance.now();
      const cohort = now - this.lastPassEnd < this.opts.maxWaitMs ? this.lastPassJobs - this.queue.length : 0;
      const company = cohort > 0 && cohort + this.queue.length > 1;
      const waitMs = company
        ? Math.max(0, this.lastPassEnd + this.opts.maxWaitMs - now)
        : this.queue.length === 0
          ? IDLE_PULL_MS
          : Math.max(0, this.startAt() - now);
      this.taking = true;
      try {
        this.pending = await source.take(() => this.opts.maxRows - this.queued, waitMs, Math.max(1, cohort));
      } catch {
        this.pending = -1; // the source reports its own errors; try again after a pause
        await new Promise((r) => setTimeout(r, 100));
      } finally {
        this.taking = false;
      }
      this.schedule();
    }
  }

  /** Resolves once nothing is queued or running and the work source (if any) has stopped taking. */
  async whenIdle(): Promise<void> {
    if (this.source?.closed) await this.pulling;
    if (!this.running && this.queue.length === 0) return;
    await new Promise<void>((resolve) => this.idle.push(resolve));
  }

  /** When the oldest job's wait for company ends. */
  private startAt(): number {
    if (this.queue.length === 0) return Number.POSITIVE_INFINITY;
    return Math.max(this.queue[0].enqueuedAt, this.lastPassEnd) + this.opts.maxWaitMs;
  }

  private schedule(): void {
    if (this.running || this.queue.length === 0) {
      if (!this.running && this.queue.length === 0) this.notifyIdle();
      return;
    }
    const now = performance.now();
    const at = this.startAt();
    const nothingComing =
      this.source !== null &&
      !this.taking &&
      this.pending === 0 &&
      (this.queued >= this.lastPassRows || now - this.lastPassEnd >= this.opts.maxWaitMs);
    if (this.queued >= this.opts.maxRows || now >= at || nothingComing) {
      this.startPass();
    } else if (!this.timer) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.schedule();
      }, at - now);
    }
  }

  private startPass(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const batch: Array<Entry<J, R>> = [];
    const rest: Array<Entry<J, R>> = [];
    let rows = 0;
    let key: string | undefined;
    let full = false;
    for (const e of this.queue) {
      if (full || (key !== undefined && e.key !== key)) {
        rest.push(e);
        continue;
      }
      if (e.signal?.aborted) {
        this.queued -= e.rows;
        e.reject(new CancelledError('cancelled while queued'));
        continue;
      }
      if (rows + e.rows > this.opts.maxRows) {
        full = true;
        rest.push(e);
        continue;
      }
      key ??= e.key;
      this.queued -= e.rows;
      batch.push(e);
      rows += e.rows;
    }
    this.queue = rest;
    if (batch.length === 0) {
      this.schedule();
      return;
    }
    this.running = true;
    const startedAt = performance.now();
    this.run(
      batch.map((e) => e.job),
      rows,
      key ?? '',
    )
      .then(
        (results) => {
          batch.forEach((e, i) => e.resolve({ result: results[i], queueMs: startedAt - e.enqueuedAt, batchRows: rows }));
        },
        (err: unknown) => {
          for (const e of batch) e.reject(err);
        },
      )
      .finally(() => {
        this.running = false;
        this.lastPassEnd = performance.now();
        this.lastPassRows = rows;
        this.lastPassJobs = batch.length;
        const waiters = this.passEnded;
        this.passEnded = [];
        for (const w of waiters) w();
        this.schedule();
      });
  }

  private notifyIdle(): void {
    const waiters = this.idle;
    this.idle = [];
    for (const w of waiters) w();
  }
}
