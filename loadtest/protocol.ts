// Messages between the load-test coordinator (main thread) and its generator workers. Times are
// epoch milliseconds with fractions (performance.timeOrigin + performance.now()), comparable across threads.
import type { MixEntry } from './campaign.ts';

export interface WorkerInit {
  __module: string;
  index: number;
  address: string;
  tls: false | { ca?: string; cert?: string; key?: string };
  /** Bearer token sent with every request. */
  token?: string;
  timeoutMs: number;
  mix: MixEntry[];
  /** Class counts per model, for mix entries without a class list. */
  numClasses: Record<string, number>;
  seed: number;
}

export interface PhasePlan {
  id: number;
  startMs: number;
  /** Arrivals (or closed-loop sends) stop at startMs + durationMs. */
  durationMs: number;
  /** This worker's share of the request bound. */
  requests: number;
  open?: { from: number; to: number; arrivals: 'poisson' | 'uniform'; maxInFlight: number; offset: number; workers: number };
  closed?: { concurrency: number };
}

export type ToWorker = { type: 'phase'; plan: PhasePlan } | { type: 'stop' } | { type: 'exit' };

export interface RequestResult {
  /** Intended send time (open loop: the schedule's; closed loop: the actual send). */
  intended: number;
  sent: number;
  end: number;
  /** Milliseconds from intended to the `accepted` event (admission), when it came. */
  accepted?: number;
  /** Milliseconds from intended to the first `progress` event (first reverse step answered). */
  firstStep?: number;
  /**
   * gRPC status name, e.g. OK, UNAVAILABLE; CLIENT_OVERLOAD for arrivals never sent; INTERRUPTED
   * for requests in flight when the run was stopped (Ctrl-C), which the tool cancelled itself.
   */
  code: string;
  error?: string;
  images: number;
  mix: number;
}

export type FromWorker =
  | { type: 'ready' }
  | { type: 'results'; phase: number; results: RequestResult[]; inFlight: number }
  | { type: 'phaseDone'; phase: number }
  | { type: 'fatal'; message: string };
