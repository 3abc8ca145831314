// Previews of a request's images while they form: after every k-th step the sampler's x0
// prediction is turned into images and sent as `preview` events. Made off the sampling path: the
// loop only hands over the step's model output (the prediction is computed then, before the state
// moves on) and never waits for a preview; at most one preview round per request is in flight, so
// a slow decoder pool skips previews instead of queueing them, and a round still running when the
// final images are decoded is dropped (late). Every preview image is counted by outcome.
import { predictX0, type SamplerState } from '../../shared/diffusion/state.ts';
import { PreviewMethod, type Preview } from '../../shared/gen/ditpipe/v1/sampler.ts';
import type { SchedulerMetrics } from '../../shared/metrics.ts';

export interface PreviewPlan {
  /** A preview after every `every`-th step (never after the last). */
  every: number;
  method: 'decoder' | 'projection';
}

export interface PreviewSink {
  model: string;
  numSteps: number;
  /** Sample index (position in the request) of each image sampled, in the state's order. */
  sampleIndices: ArrayLike<number>;
  /** Elements of one sample's latent. */
  perSample: number;
  metrics: SchedulerMetrics;
  /** Turns sample `i`'s predicted clean latent (a view valid until the promise settles) into a PNG of `width`×`height`. */
  render(latent: Float32Array, sampleIndex: number): Promise<{ png: Uint8Array; width: number; height: number }>;
  emit(preview: Preview): void;
}

export class Previews {
  private busy = false;
  private open = true;

  constructor(
    private readonly plan: PreviewPlan,
    private readonly sink: PreviewSink,
  ) {}

  /** Called with the model output of pending step `step` (0-based), before `advance` consumes it. */
  afterStep(step: number, state: SamplerState, modelOut: Float32Array): void {
    const done = step + 1;
    if (done % this.plan.every !== 0 || done >= this.sink.numSteps) return;
    const { sampleIndices, perSample } = this.sink;
    const count = sampleIndices.length;
    if (this.busy) {
      this.count('skipped', count);
      return;
    }
    const x0 = predictX0(state, modelOut);
    this.busy = true;
    const rounds = Array.from({ length: count }, (_, i) =>
      this.sink.render(x0.subarray(i * perSample, (i + 1) * perSample), sampleIndices[i]).then(
        (img) => {
          if (!this.open) return this.count('late', 1);
          this.sink.emit({
            step: done,
            numSteps: this.sink.numSteps,
            sampleIndex: sampleIndices[i],
            png: img.png,
            width: img.width,
            height: img.height,
            method: this.plan.method === 'projection' ? PreviewMethod.PREVIEW_METHOD_PROJECTION : PreviewMethod.PREVIEW_METHOD_DECODER,
          });
          this.count('sent', 1);
        },
        () => this.count('failed', 1),
      ),
    );
    void Promise.all(rounds).then(() => {
      this.busy = false;
    });
  }

  /** No more previews: the final images are next. */
  close(): void {
    this.open = false;
  }

  private count(outcome: 'sent' | 'skipped' | 'late' | 'failed', n: number): void {
    this.sink.metrics.previews.inc({ model: this.sink.model, method: this.plan.method, outcome }, n);
  }
}
