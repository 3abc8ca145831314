// Report outputs: the JSON file (ghz-compatible summary fields at the top level and per phase),
// the HTML file, and a short text summary for the terminal.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { renderHtml } from './html.ts';
import { inUnit, objectiveText, redeliveredText } from './format.ts';
import type { Report } from './runner.ts';

export function writeReport(r: Report, paths: { json?: string; html?: string }): void {
  if (paths.json) {
    mkdirSync(dirname(paths.json), { recursive: true });
    writeFileSync(paths.json, `${JSON.stringify(r, null, 2)}\n`);
  }
  if (paths.html) {
    mkdirSync(dirname(paths.html), { recursive: true });
    writeFileSync(paths.html, renderHtml(r));
  }
}

const f = (v: number | null | undefined, d = 1): string => (v === null || v === undefined ? '-' : v.toFixed(d));

export function textSummary(r: Report): string {
  const lines = [
    `campaign ${r.campaign.name} → ${r.target}: ${r.count} requests, ${r.errors} errors, ${r.images} images, ${f(r.rps, 2)} req/s; tool CPU ${f(r.tool_cpu.cpuPercentOfOneCore)}% of one core`,
  ];
  for (const p of r.phases) {
    const served = p.server && p.server.endpoints.length > 0;
    lines.push(
      `  ${p.name}${p.interrupted ? ' (interrupted)' : ''}: ${p.count} req (${p.errors} err) in ${f(p.wallMs / 1000, 2)}s, ${f(p.imagesPerSecond, 2)} images/s, latency p50 ${f(p.latencyMs?.p50)}ms p99 ${f(p.latencyMs?.p99)}ms, first step p99 ${f(p.timeToFirstStepMs?.p99)}ms` +
        (served
          ? `, ${f(p.server!.stepsPerSecond)} steps/s, ${f(p.server!.samplingTflopsPerSecond, 4)} Tflops/s, batch rows ${f(p.server!.denoiserMeanBatchRows, 2)}, redelivered ${redeliveredText(p.server!.redelivered)}`
          : ''),
    );
    if (p.cancelledByStop > 0)
      lines.push(`    ${p.cancelledByStop} request(s) in flight cancelled by the stop: counted nowhere (not server errors)`);
    for (const e of p.server?.scrapeErrors ?? []) lines.push(`    metrics scrape failed: ${e}`);
    for (const o of p.slo.objectives) {
      const verdict = p.slo.met === null ? 'not judged (interrupted)' : o.met ? 'met' : 'MISSED';
      lines.push(`    SLO ${objectiveText(o)}: actual ${o.actual === null ? '-' : inUnit(o.actual, o.unit)} → ${verdict}`);
    }
  }
  lines.push(r.outcome === 'interrupted' ? 'run interrupted: SLOs not judged' : r.outcome === 'met' ? 'all SLOs met' : 'SLO MISSED');
  return lines.join('\n');
}
