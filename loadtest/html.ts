// The HTML report: one self-contained file (inline CSS, charts drawn here as inline SVG, no
// scripts and no network fetches) that opens anywhere, including from an email attachment.
import { duration, inUnit, num, redeliveredText } from './format.ts';
import type { PhaseReport, Report } from './runner.ts';

const esc = (s: string): string => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

/** Series colours by meaning: failures are red, never another series' colour. */
export const SERIES_COLORS = {
  p50: '#1f77b4',
  p99: '#ff7f0e',
  ok: '#1f77b4',
  images: '#9467bd',
  errors: '#d62728',
  bars: '#1f77b4',
} as const;

/** Round tick values covering [lo, hi], about `n` of them, the first at or below lo and the last at or above hi. */
export function niceTicks(lo: number, hi: number, n = 5): number[] {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out: number[] = [];
  const first = Math.floor(lo / step + 1e-9) * step;
  for (let v = first; v < hi + step * (1 - 1e-9); v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

interface Series {
  name: string;
  color: string;
  points: Array<[number, number | null]>;
}

/** How an axis writes its ticks. */
type Ticks = (v: number) => string;

const W = 760;
const H = 270;
// The legend sits above the phase labels, both above the plot, clear of the tick labels.
const M = { l: 64, r: 16, t: 40, b: 40 };

function frame(
  id: string,
  title: string,
  axes: { x: string; y: string; fx: Ticks; fy: Ticks },
  xs: number[],
  ys: number[],
  body: (x: (v: number) => number, y: (v: number) => number) => string,
  legend: Array<{ name: string; color: string }> = [],
): string {
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs);
  const y1 = Math.max(...ys, 0) * 1.05 || 1;
  // x runs from a round tick to the last value (no empty stretch after the data); y up to a round tick.
  const xEnd = x1 > x0 ? x1 : x0 + 1;
  const xt = niceTicks(x0, xEnd, 8).filter((v, i) => i === 0 || v <= xEnd * (1 + 1e-9));
  const yt = niceTicks(0, y1, 5);
  const xMin = xt[0];
  const xMax = Math.max(xEnd, xt[xt.length - 1]);
  const yMax = yt[yt.length - 1];
  const x = (v: number): number => M.l + ((v - xMin) / (xMax - xMin || 1)) * (W - M.l - M.r);
  const y = (v: number): number => H - M.b - (v / yMax) * (H - M.t - M.b);
  const grid = [
    ...yt.map(
      (v) =>
        `<line x1="${M.l}" x2="${W - M.r}" y1="${y(v)}" y2="${y(v)}" class="grid"/><text class="tick" x="${M.l - 6}" y="${y(v) + 4}" text-anchor="end">${esc(axes.fy(v))}</text>`,
    ),
    ...xt.map(
      (v) =>
        `<line x1="${x(v)}" x2="${x(v)}" y1="${H - M.b}" y2="${H - M.b + 4}" class="axis"/><text class="tick" x="${x(v)}" y="${H - M.b + 18}" text-anchor="middle">${esc(axes.fx(v))}</text>`,
    ),
  ].join('');
  const leg = legend
    .map(
      (s, i) =>
        `<rect x="${M.l + 10 + i * 120}" y="6" width="10" height="10" fill="${s.color}"/><text class="legend" x="${M.l + 24 + i * 120}" y="15">${esc(s.name)}</text>`,
    )
    .join('');
  return `<figure><figcaption>${esc(title)}</figcaption><svg class="chart" data-chart="${esc(id)}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${esc(title)}" xmlns="http://www.w3.org/2000/svg">
<line x1="${M.l}" x2="${W - M.r}" y1="${H - M.b}" y2="${H - M.b}" class="axis"/><line x1="${M.l}" x2="${M.l}" y1="${M.t}" y2="${H - M.b}" class="axis"/>${grid}${body(x, y)}${leg}
<text x="${(M.l + W - M.r) / 2}" y="${H - 6}" text-anchor="middle">${esc(axes.x)}</text><text transform="translate(14 ${(M.t + H - M.b) / 2}) rotate(-90)" text-anchor="middle">${esc(axes.y)}</text></svg></figure>`;
}

const seconds: Ticks = (v) => (v === 0 ? '0' : `${num(v)} s`);
const plain: Ticks = (v) => num(v);
const durationTick: Ticks = (v) => (v === 0 ? '0' : duration(v));

function lineChart(id: string, title: string, yLabel: string, fy: Ticks, series: Series[], phases: PhaseReport[]): string {
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.flatMap((p) => (p[1] === null ? [] : [p[1]])));
  if (!xs.length) return `<p class="empty" data-chart="${esc(id)}">${esc(title)}: no data</p>`;
  return frame(
    id,
    title,
    { x: 'time since the first phase started', y: yLabel, fx: seconds, fy },
    [0, ...xs],
    ys.length ? ys : [1],
    (x, y) => {
      const bounds = phases
        .map((p) => {
          const t = p.startOffsetMs / 1000;
          return `<line x1="${x(t)}" x2="${x(t)}" y1="${M.t}" y2="${H - M.b}" class="phase"/><text x="${x(t) + 3}" y="${M.t - 6}" class="phase-label">${esc(p.name)}</text>`;
        })
        .join('');
      const paths = series
        .map((s) => {
          let d = '';
          let pen = false;
          for (const [t, v] of s.points) {
            if (v === null) {
              pen = false;
              continue;
            }
            d += `${pen ? 'L' : 'M'}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
            pen = true;
          }
          const dots = s.points
            .filter((p): p is [number, number] => p[1] !== null)
            .map(
              ([t, v]) =>
                `<circle cx="${x(t).toFixed(1)}" cy="${y(v).toFixed(1)}" r="2" fill="${s.color}"><title>${esc(s.name)} at ${num(t)} s: ${esc(fy(v))}</title></circle>`,
            )
            .join('');
          return `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="1.5" class="series" data-series="${esc(s.name)}"/>${dots}`;
        })
        .join('');
      return bounds + paths;
    },
    series,
  );
}

function histogramChart(p: PhaseReport, index: number): string {
  const bins = p.latencyHistogram;
  const id = `latency-histogram-${index}`;
  if (!bins.length) return `<p class="empty" data-chart="${id}">Latency histogram of ${esc(p.name)}: no successful requests</p>`;
  const xs = [bins[0].from, bins[bins.length - 1].to];
  const ys = bins.map((b) => b.count);
  return frame(
    id,
    `Latency histogram — ${p.name}`,
    { x: 'latency of successful requests', y: 'requests', fx: durationTick, fy: plain },
    xs,
    ys,
    (x, y) =>
      bins
        .map(
          (b) =>
            `<rect class="bar" x="${x(b.from).toFixed(1)}" y="${y(b.count).toFixed(1)}" width="${Math.max(1, x(b.to) - x(b.from) - 1).toFixed(1)}" height="${(y(0) - y(b.count)).toFixed(1)}" fill="${SERIES_COLORS.bars}"><title>${esc(duration(b.from))}–${esc(duration(b.to))}: ${b.count}</title></rect>`,
        )
        .join(''),
  );
}

const fmt = num;
const ms = (ns: number): string => `${fmt(ns / 1e6)} ms`;
const opt = (v: number | null | undefined, unit = ''): string => (v === null || v === undefined ? '–' : `${fmt(v)}${unit}`);

function phaseTable(phases: PhaseReport[]): string {
  const rows = phases
    .map(
      (
        p,
      ) => `<tr><td>${esc(p.name)}</td><td>${p.loop === 'open' ? `open ${esc(typeof p.offered.rate === 'object' ? `${p.offered.rate.from}→${p.offered.rate.to}/s` : `${p.offered.rate}/s`)} ${esc(p.offered.arrivals ?? '')}` : `closed ×${p.offered.concurrency}`}</td>
<td>${p.count}</td><td>${p.errors}</td><td>${fmt(p.rps)}</td><td>${fmt(p.imagesPerSecond)}</td><td>${opt(p.latencyMs?.p50, ' ms')}</td><td>${opt(p.latencyMs?.p99, ' ms')}</td><td>${opt(p.timeToFirstStepMs?.p99, ' ms')}</td>
<td>${opt(p.server?.samplingTflopsPerSecond)}</td><td>${opt(p.server?.denoiserMeanBatchRows)}</td>${verdictCell(p.slo.objectives.length ? p.slo.met : undefined)}</tr>`,
    )
    .join('');
  return `<table><thead><tr><th>phase</th><th>load</th><th>requests</th><th>errors</th><th>req/s</th><th>images/s</th><th>p50</th><th>p99</th><th>first step p99</th><th>Tflops/s</th><th>batch rows</th><th>SLO</th></tr></thead><tbody>${rows}</tbody></table>`;
}

/** A verdict cell: met (green), missed (red), not judged (an interrupted phase, grey), or none. */
function verdictCell(met: boolean | null | undefined): string {
  if (met === undefined) return '<td>–</td>';
  return met === null ? '<td class="unjudged">not judged</td>' : `<td class="${met ? 'met' : 'missed'}">${met ? 'met' : 'missed'}</td>`;
}

function sloTable(p: PhaseReport): string {
  if (!p.slo.objectives.length) return '';
  const rows = p.slo.objectives
    .map(
      (o) =>
        `<tr><td>${esc(o.objective)}</td><td>${esc(`${o.comparison === '<=' ? '≤' : '≥'} ${inUnit(o.bound, o.unit)}`)}</td><td>${o.actual === null ? '–' : esc(inUnit(o.actual, o.unit))}</td><td>${o.attainment === undefined ? '–' : opt(o.attainment === null ? null : o.attainment * 100, '%')}</td>${verdictCell(p.slo.met === null ? null : o.met)}</tr>`,
    )
    .join('');
  return `<table class="slo"><thead><tr><th>objective</th><th>bound</th><th>actual</th><th>within bound</th><th></th></tr></thead><tbody>${rows}</tbody></table>`;
}

function scrapeErrors(p: PhaseReport): string {
  const errs = p.server?.scrapeErrors ?? [];
  if (!errs.length) return '';
  const note = p.server!.endpoints.length
    ? 'server figures cover only the endpoints that answered'
    : 'no endpoint answered: no server figures';
  return `<div class="warn scrape-errors"><b>Metrics scrapes failed</b> (${esc(note)}):<ul>${errs.map((e) => `<li>${esc(e)}</li>`).join('')}</ul></div>`;
}

export function renderHtml(r: Report): string {
  // Buckets are drawn at their midpoints.
  const width = (p: PhaseReport): number =>
    p.timeseries.length > 1 ? p.timeseries[1].t - p.timeseries[0].t : Math.max(1, p.wallMs / 1000);
  const lat: Series[] = [
    {
      name: 'p50',
      color: SERIES_COLORS.p50,
      points: r.phases.flatMap((p) => p.timeseries.map((t): [number, number | null] => [t.t + width(p) / 2, t.p50])),
    },
    {
      name: 'p99',
      color: SERIES_COLORS.p99,
      points: r.phases.flatMap((p) => p.timeseries.map((t): [number, number | null] => [t.t + width(p) / 2, t.p99])),
    },
  ];
  const thr: Series[] = [
    {
      name: 'ok requests/s',
      color: SERIES_COLORS.ok,
      points: r.phases.flatMap((p) => p.timeseries.map((t): [number, number | null] => [t.t + width(p) / 2, t.ok / width(p)])),
    },
    {
      name: 'images/s',
      color: SERIES_COLORS.images,
      points: r.phases.flatMap((p) => p.timeseries.map((t): [number, number | null] => [t.t + width(p) / 2, t.images / width(p)])),
    },
    {
      name: 'errors/s',
      color: SERIES_COLORS.errors,
      points: r.phases.flatMap((p) => p.timeseries.map((t): [number, number | null] => [t.t + width(p) / 2, t.errors / width(p)])),
    },
  ];
  const verdict =
    r.outcome === 'interrupted'
      ? '<span class="unjudged">interrupted — SLOs not judged</span>'
      : `<span class="${r.outcome === 'met' ? 'met' : 'missed'}">SLO ${r.outcome === 'met' ? 'met' : 'missed'}</span>`;
  const status = Object.entries(r.statusCodeDistribution)
    .map(([k, v]) => `${esc(k)}: ${v}`)
    .join(', ');
  const errors = Object.entries(r.errorDistribution)
    .slice(0, 20)
    .map(([k, v]) => `<li>${v} × ${esc(k)}</li>`)
    .join('');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ditpipe load test — ${esc(r.campaign.name)}</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 12px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.met{color:#176a17;font-weight:600}.missed{color:#b00;font-weight:600}.unjudged{color:#666;font-weight:600}
.warn{background:#fff4e5;border-left:4px solid #e08a00;padding:4px 10px;margin:8px 0}.warn ul{margin:4px 0}
svg.chart text{font-size:11px;fill:#444}svg.chart .grid{stroke:#eee}svg.chart .axis{stroke:#888}svg.chart .phase{stroke:#999;stroke-dasharray:4 3}svg.chart .phase-label{fill:#777}
figure{margin:12px 0}figcaption{font-weight:600;margin-bottom:4px}.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:6px}.summary div{background:#f6f6f6;padding:6px 8px}
</style></head><body>
<h1>Load test: ${esc(r.campaign.name)} ${verdict}</h1>
${r.campaign.description ? `<p>${esc(r.campaign.description)}</p>` : ''}
<p>Target ${esc(r.target)} · started ${esc(r.date)} · ${r.workers} generator threads${r.interrupted ? ' · <b>interrupted (Ctrl-C)</b>: requests it cancelled are not counted as errors' : ''}</p>
<div class="summary">
<div>requests<br><b>${r.count}</b></div><div>errors<br><b>${r.errors}</b></div><div>images<br><b>${r.images}</b></div><div>req/s<br><b>${fmt(r.rps)}</b></div>
<div>average<br><b>${ms(r.average)}</b></div><div>fastest<br><b>${ms(r.fastest)}</b></div><div>slowest<br><b>${ms(r.slowest)}</b></div>
<div>tool CPU<br><b>${fmt(r.tool_cpu.cpuPercentOfOneCore)}% of a core</b></div>
</div>
<p>Status codes: ${status || '–'}</p>${errors ? `<details><summary>Errors</summary><ul>${errors}</ul></details>` : ''}
<h2>Phases</h2>${phaseTable(r.phases)}
<h2>Latency over time</h2>${lineChart('latency-over-time', 'Latency of successful requests by completion time', 'latency', durationTick, lat, r.phases)}
<h2>Throughput over time</h2>${lineChart('throughput-over-time', 'Completions per second', 'per second', plain, thr, r.phases)}
${r.phases
  .map(
    (
      p,
      i,
    ) => `<section class="phase" data-phase="${esc(p.name)}"><h2>Phase ${esc(p.name)}${p.interrupted ? ' <span class="unjudged">(interrupted)</span>' : ''}</h2>${p.cancelledByStop ? `<p>${p.cancelledByStop} request(s) in flight were cancelled by the stop; they are in no figure.</p>` : ''}${scrapeErrors(p)}${sloTable(p)}${histogramChart(p, i)}
<p>Time to admission p50/p99: ${opt(p.timeToAcceptedMs?.p50, ' ms')} / ${opt(p.timeToAcceptedMs?.p99, ' ms')} · first step p50/p99: ${opt(p.timeToFirstStepMs?.p50, ' ms')} / ${opt(p.timeToFirstStepMs?.p99, ' ms')} · send lag p99: ${opt(p.sendLagMs?.p99, ' ms')}</p>
${p.server?.endpoints.length ? `<p>Server: ${fmt(p.server.stepsPerSecond)} steps/s · ${fmt(p.server.samplingTflopsPerSecond)} sampling Tflops/s · ${opt(p.server.gflopsPerImage)} Gflops/image · mean batch rows ${opt(p.server.denoiserMeanBatchRows)} · forward mean ${opt(p.server.denoiserForwardMs.mean, ' ms')} · busy replicas ${fmt(p.server.denoiserBusyReplicas)} · decode mean/p99 ${opt(p.server.decodeMs.mean, ' ms')} / ${opt(p.server.decodeMs.p99, ' ms')} · redelivered ${esc(redeliveredText(p.server.redelivered))}</p>` : ''}</section>`,
  )
  .join('\n')}
</body></html>
`;
}
