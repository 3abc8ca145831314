// The playground page in headless Chromium (Debian package chromium, driven by playwright-core)
// against the real pipeline: it lists the model's classes, streams a request whose previews update
// the image tiles, ends with non-blank final images and a gallery entry whose curl request gives the
// same image, shows the cluster panel, and cancels a long request so that the scheduler stops
// sending steps. No console errors, and nothing is fetched from anywhere but the scheduler.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodePng } from '../../shared/image/png.ts';
import { DIT_NAME } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

const CHROMIUM = '/usr/bin/chromium';

let p: Pipeline;
let base: string;
let context: BrowserContext;
let page: Page;
let profile: string;
const problems: string[] = [];
const foreign: string[] = [];

async function metric(name: string, series = name, match = ''): Promise<number> {
  const text = await p.schedulerMetrics.registry.getSingleMetricAsString(name);
  return text
    .split('\n')
    .filter((l) => l.split(/[{ ]/)[0] === series && l.includes(match))
    .reduce((s, l) => s + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
}

/** Spread of the pixel values of a PNG: 0 for a blank (single-colour) tile. */
function spread(png: Buffer): number {
  const img = decodePng(png);
  let min = 255;
  let max = 0;
  for (const v of img.data) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return max - min;
}

beforeAll(async () => {
  expect(existsSync(CHROMIUM), 'headless Chromium (Debian package chromium) is needed for this test').toBe(true);
  p = await startPipeline({ transport: { kind: 'inproc' }, http: {} });
  base = p.http!.url;
  profile = mkdtempSync(join(tmpdir(), 'ditpipe-chromium-'));
  const { chromium } = await import('playwright-core');
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 1000 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => m.type() === 'error' && problems.push(m.text()));
  page.on('pageerror', (e) => problems.push(e.message));
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(`${base}/`) && !u.startsWith('data:')) foreign.push(u);
  });
});
afterAll(async () => {
  await context?.close();
  await p?.stop();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

describe('playground', () => {
  it('generates with previews that update, shows non-blank final tiles, a gallery entry with working requests, and the cluster panel', async () => {
    await page.goto(`${base}/`);
    await expect.poll(() => page.textContent('#status'), { timeout: 20_000 }).toBe('Ready.');
    expect(await page.$$eval('#model option', (os) => os.map((o) => (o as HTMLOptionElement).value))).toEqual([DIT_NAME]);
    expect(await page.$$eval('#class option', (os) => os.map((o) => (o as HTMLOptionElement).value))).toContain('five');
    await page.selectOption('#class', 'five');
    await page.selectOption('#sampler', 'ddim');
    await page.fill('#steps', '60');
    await page.fill('#cfg', '4');
    await page.fill('#seed', '11');
    await page.fill('#count', '3');
    await page.fill('#every', '3');
    // Record every picture each tile shows, to see the previews change.
    await page.evaluate(() => {
      const seen: Record<string, string[]> = {};
      (window as unknown as { seen: typeof seen }).seen = seen;
      new MutationObserver((records) => {
        for (const r of records) {
          const img = r.target as HTMLImageElement;
          const i = (img.closest('.tile') as HTMLElement).dataset.index!;
          (seen[i] ??= []).push(img.src);
        }
      }).observe(document.getElementById('tiles')!, { subtree: true, attributes: true, attributeFilter: ['src'] });
    });
    await page.click('#generate');
    await page.waitForFunction(() => document.querySelectorAll('#tiles .tile.final').length === 3, undefined, { timeout: 60_000 });
    await expect.poll(() => page.textContent('#status'), { timeout: 10_000 }).toMatch(/^Done: 3 image\(s\)/);

    const seen = await page.evaluate(() => (window as unknown as { seen: Record<string, string[]> }).seen);
    const previews = await page.$$eval('#tiles .tile', (ts) => ts.map((t) => Number((t as HTMLElement).dataset.previews)));
    expect(
      previews.reduce((a, b) => a + b, 0),
      'preview events reached the page',
    ).toBeGreaterThan(0);
    // The tiles changed picture: previews (each a new x0 prediction), then the final image.
    for (const [i, srcs] of Object.entries(seen)) {
      expect(new Set(srcs).size, `tile ${i}`).toBe(srcs.length);
      expect(srcs.length, `tile ${i}`).toBe(previews[Number(i)] + 1);
    }
    expect(
      Math.max(...Object.values(seen).map((s) => s.length)),
      'some tile showed at least two previews before its final image',
    ).toBeGreaterThanOrEqual(3);

    // A screenshot of each final tile is an image, not a blank square.
    const tiles = page.locator('#tiles .tile img');
    expect(await tiles.count()).toBe(3);
    for (let i = 0; i < 3; i++) expect(spread(await tiles.nth(i).screenshot()), `tile ${i}`).toBeGreaterThan(40);

    // The gallery keeps the result with its settings; its curl request reproduces the first image.
    const entry = page.locator('#gallery .entry').first();
    expect(await entry.locator('.settings').textContent()).toContain('five · ddim 60 steps · cfg 4 · seed 11 · 3 image(s)');
    const snippets = await entry.locator('pre').allTextContents();
    expect(snippets).toHaveLength(3);
    expect(snippets[1]).toBe(
      `ditpipe generate --server ${p.address} --model '${DIT_NAME}' --class 'five' --num 3 --steps 60 --sampler ddim --cfg 4 --seed 11 --out out/generate`,
    );
    expect(snippets[2]).toContain(`${p.address} ditpipe.v1.Sampler/Generate`);
    const grpcJson = JSON.parse(/-d '(.*)'/.exec(snippets[2])![1]) as { class_labels: unknown[]; sampler: string; seed: string };
    expect(grpcJson).toMatchObject({ sampler: 'SAMPLER_KIND_DDIM', seed: '11' });
    expect(grpcJson.class_labels).toHaveLength(3);
    const curlBody = /-d '(.*)'/.exec(snippets[0])![1];
    const res = await fetch(`${base}/v1/images/generations`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: curlBody,
    });
    const j = (await res.json()) as { data: Array<{ b64_json: string }> };
    const first = await page.$eval('#tiles .tile[data-index="0"] img', (img) => (img as HTMLImageElement).src);
    expect(`data:image/png;base64,${j.data[0].b64_json}`).toBe(first);

    // The cluster panel, from /ditpipe/cluster.
    await expect.poll(() => page.textContent('#c-replicas'), { timeout: 10_000 }).toBe('1');
    expect(await page.textContent('#c-decoders')).toBe('1');
    await expect.poll(() => page.textContent('#c-tflops'), { timeout: 10_000 }).toMatch(/^\d/);
    expect(await page.textContent('#c-queue')).toMatch(/^\d+ \/ 256 · \d+ steps waiting for a denoiser$/);
    expect(await page.textContent('#c-source')).toMatch(/own metrics registry/);
    // 6 final decodes (the page's 3 and the curl request's 3) and the previews' (the panel refreshes every 2 s).
    await expect.poll(() => page.textContent('#c-decodes'), { timeout: 10_000 }).toMatch(/^6 \/ [1-9]\d*$/);

    expect(problems).toEqual([]);
    expect(foreign).toEqual([]);
  });

  it('cancels a running request: the stream closes and the scheduler stops dispatching steps', async () => {
    const cancelledBefore = await metric('ditpipe_request_seconds', 'ditpipe_request_seconds_count', 'outcome="CANCELLED"');
    await page.fill('#steps', '1000');
    await page.fill('#cfg', '1');
    await page.fill('#count', '1');
    await page.fill('#every', '0');
    await page.click('#generate');
    await expect.poll(() => page.textContent('#status'), { timeout: 20_000 }).toMatch(/^Step \d+ of 1000/);
    expect(await page.isEnabled('#cancel')).toBe(true);
    await page.click('#cancel');
    await expect.poll(() => page.textContent('#status'), { timeout: 10_000 }).toMatch(/^Cancelled/);
    await expect.poll(() => metric('ditpipe_samples_in_flight'), { timeout: 10_000 }).toBe(0);
    const after = await metric('ditpipe_steps_dispatched_total');
    await new Promise((r) => setTimeout(r, 300));
    expect(await metric('ditpipe_steps_dispatched_total')).toBe(after);
    expect(await metric('ditpipe_request_seconds', 'ditpipe_request_seconds_count', 'outcome="CANCELLED"')).toBe(cancelledBefore + 1);
    expect(await page.isEnabled('#generate')).toBe(true);
    expect(await page.locator('#gallery .entry').count()).toBe(1); // a cancelled request leaves no gallery entry
    expect(problems).toEqual([]);
    expect(foreign).toEqual([]);
  });
});
