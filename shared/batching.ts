// Continuous batching for one model: jobs queue up while a forward pass runs; the next pass takes
// the oldest jobs up to a row budget. A pass starts when the budget is full, or when the oldest
// waiting job has waited `maxWaitMs` (so a lone request is never held longer than that).
import { CancelledError, ResourceExhaustedError } from './errors.ts';

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
  enqueuedAt: number;
  signal: AbortSignal | undefined;
  resolve: (r: Batched<R>) => void;
  reject: (e: unknown) => void;
}

export class Batcher<J, R> {
  private readonly queue: Array<Entry<J, R>> = [];
  private running = false;
  private timer: NodeJS.Timeout | null = null;
  private idle: Array<() => void> = [];
  private queued = 0;
  private lastPassEnd = -Infinity;

  /** `run` receives the jobs of one pass and returns their results in the same order. */
  constructor(
    private readonly run: (jobs: J[], rows: number) => Promise<R[]>,
    private readonly opts: BatchOptions,
  ) {}

  /** Rows waiting for a pass. */
  get queuedRows(): number {
    return this.queued;
  }

  submit(job: J, rows: number, signal?: AbortSignal): Promise<Batched<R>> {
    const unit = this.opts.unit ?? 'rows';
    if (rows > this.opts.maxRows) {
      return Promise.reject(
        new ResourceExhaustedError(`a job of ${rows} ${unit} exceeds this replica's batch budget of ${this.opts.maxRows} ${unit}`),
      );
    }
    if (signal?.aborted) return Promise.reject(new CancelledError('cancelled before it was queued'));
    return new Promise((resolve, reject) => {
      this.queue.push({ job, rows, enqueuedAt: performance.now(), signal, resolve, reject });
      this.queued += rows;
      this.schedule();
    });
  }

  /** Resolves once nothing is queued or running. */
  whenIdle(): Promise<void> {
    if (!this.running && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  private schedule(): void {
    if (this.running || this.queue.length === 0) {
      if (!this.running && this.queue.length === 0) this.notifyIdle();
      return;
    }
    // The wait counts from the later of the oldest job's arrival and the end of the last pass: the
    // steps that pass just answered come back within a few milliseconds, and starting at once with
    // only the jobs that queued during the pass would split the requests into two groups that take
    // turns, each filling half a batch.
    const waited = performance.now() - Math.max(this.queue[0].enqueuedAt, this.lastPassEnd);
    if (this.queued >= this.opts.maxRows || waited >= this.opts.maxWaitMs) {
      this.startPass();
    } else if (!this.timer) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.schedule();
      }, this.opts.maxWaitMs - waited);
    }
  }

  private startPass(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const batch: Array<Entry<J, R>> = [];
    let rows = 0;
    while (this.queue.length > 0 && rows + this.queue[0].rows <= this.opts.maxRows) {
      const e = this.queue.shift() as Entry<J, R>;
      this.queued -= e.rows;
      if (e.signal?.aborted) {
        e.reject(new CancelledError('cancelled while queued'));
        continue;
      }
      batch.push(e);
      rows += e.rows;
    }
    if (batch.length === 0) {
      this.schedule();
      return;
    }
    this.running = true;
    const startedAt = performance.now();
    this.run(
      batch.map((e) => e.job),
      rows,
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
        this.schedule();
      });
  }

  private notifyIdle(): void {
    const waiters = this.idle;
    this.idle = [];
    for (const w of waiters) w();
  }
}
