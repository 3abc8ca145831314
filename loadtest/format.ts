// How figures are written in the console summary and the HTML report: always with their unit.
import type { SloObjective } from './runner.ts';

/** Up to three significant digits, no trailing zeros; thousands as plain digits. */
export const num = (v: number): string =>
  Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1).replace(/\.0$/, '') : Number(v.toPrecision(3)).toString();

/** A duration in milliseconds: "850 ms", "1.25 s", "2.5 min". */
export function duration(ms: number): string {
  if (Math.abs(ms) >= 120_000) return `${num(ms / 60_000)} min`;
  if (Math.abs(ms) >= 1000) return `${num(ms / 1000)} s`;
  return `${num(ms)} ms`;
}

/** A value in an objective's unit: "2000 ms", "1%", "2.5 images/s". */
export function inUnit(v: number, unit: SloObjective['unit']): string {
  if (unit === 'ms') return `${num(v)} ms`;
  if (unit === 'fraction') return `${num(v * 100)}%`;
  return `${num(v)} images/s`;
}

/** "latency p99 ≤ 2000 ms". */
export function objectiveText(o: SloObjective): string {
  return `${o.objective} ${o.comparison === '<=' ? '≤' : '≥'} ${inUnit(o.bound, o.unit)}`;
}

/** Redelivered work by service as one number, with the split when there was any: "0", "4 (denoiser 3, decoder 1)". */
export function redeliveredText(r: Record<string, number>): string {
  const entries = Object.entries(r).filter(([, n]) => n > 0);
  const total = entries.reduce((a, [, n]) => a + n, 0);
  return entries.length ? `${num(total)} (${entries.map(([k, n]) => `${k || 'unlabelled'} ${num(n)}`).join(', ')})` : '0';
}
