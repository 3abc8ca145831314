// Campaign files: what `ditpipe loadtest run` drives, validated with zod. Every error names the
// field by its path in the file (`phases[1].rate: must be > 0`), so a typo never becomes a silent
// default. Durations are strings with a unit ("500ms", "30s", "2m", "1h") or a number of seconds.
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { DEFAULT_SAMPLER, SAMPLER_NAMES } from '../shared/diffusion/sampler/registry.ts';

const UNITS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 };

/** Milliseconds of a duration string ("250ms", "1.5s", "2m", "1h") or number of seconds; null when unreadable. */
export function parseDuration(v: string | number): number | null {
  if (typeof v === 'number') return Number.isFinite(v) ? v * 1000 : null;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$/.exec(v);
  return m ? Number(m[1]) * UNITS[m[2]] : null;
}

const duration = (opts: { min?: number } = {}) =>
  z.union([z.number(), z.string()]).transform((v, ctx) => {
    const ms = parseDuration(v);
    if (ms === null) {
      ctx.addIssue({
        code: 'custom',
        message: `expected a duration like "500ms", "30s", "2m" or a number of seconds, got ${JSON.stringify(v)}`,
      });
      return z.NEVER;
    }
    if (ms <= (opts.min ?? 0)) {
      ctx.addIssue({ code: 'custom', message: 'must be > 0' });
      return z.NEVER;
    }
    return ms;
  });

const positive = () => z.number('must be a number').positive('must be > 0').finite('must be finite');
const posInt = () => z.number('must be a number').int('must be an integer').min(1, 'must be >= 1');

/** Latency bounds by percentile: keys like p50, p90, p99, p99.9. */
const percentileKey = /^p(\d{1,2}(?:\.\d+)?|100)$/;
const latencyBounds = z
  .record(z.string().regex(percentileKey, 'percentile keys look like p50, p99, p99.9'), duration())
  .refine((r) => Object.keys(r).length > 0, 'give at least one percentile bound, e.g. { p99: 2s }');

const sloSchema = z.strictObject({
  /** End-to-end latency of successful requests, from the intended send time. */
  latency: latencyBounds.optional(),
  /** Time from the intended send time to the first reverse step answered (stream `progress`). */
  timeToFirstStep: latencyBounds.optional(),
  /** Most failed requests allowed, as a fraction of all requests (0..1). */
  errorRate: z.number('must be a number').min(0, 'must be >= 0').max(1, 'must be <= 1').optional(),
  /** Least images per second the phase must deliver. */
  minImagesPerSecond: z.number('must be a number').min(0, 'must be >= 0').optional(),
});
export type SloSpec = z.output<typeof sloSchema>;

const classKey = z.union([z.number().int('must be an integer').min(0, 'must be >= 0'), z.string().min(1, 'must not be empty')]);

const mixSchema = z.strictObject({
  /** Relative share of requests drawn from this entry. */
  weight: positive().default(1),
  /** Model name as ListModels reports it. */
  model: z.string().min(1, 'must not be empty'),
  /** Reverse-diffusion steps per image; unset uses the scheduler's default for the sampler. */
  steps: z.number().int('must be an integer').min(1, 'must be >= 1').max(1000, 'must be <= 1000').optional(),
  sampler: z.enum(SAMPLER_NAMES).default(DEFAULT_SAMPLER),
  /** Classifier-free guidance scale (1 = none); unset uses the scheduler's default. */
  cfg: z.number('must be a number').min(1, 'must be >= 1').finite('must be finite').optional(),
  eta: z.number('must be a number').min(0, 'must be >= 0').max(1, 'must be <= 1').optional(),
  guidanceChannels: z.enum(['three', 'all']).optional(),
  /** Images per request: a count, or a uniform range. */
  images: z
    .union([
      posInt(),
      z.strictObject({ min: posInt(), max: posInt() }).refine((r) => r.max >= r.min, { message: 'max must be >= min', path: ['max'] }),
    ])
    .default(1),
  /**
   * Class of each image: unset = uniform over the model's classes; a list = uniform over the
   * list; a map class → weight. Classes are indices or names (as ListModels lists them).
   */
  classes: z
    .union([
      z.array(classKey).min(1, 'list at least one class'),
      z.record(z.string(), positive()).refine((r) => Object.keys(r).length > 0, 'give at least one class'),
    ])
    .optional(),
  /** Fixed noise seed for every request of this entry; unset lets the scheduler pick. */
  seed: z.number().int('must be an integer').min(0, 'must be >= 0').optional(),
  output: z.enum(['png', 'latent']).default('png'),
});
export type MixEntry = z.output<typeof mixSchema>;

const rampSchema = z.strictObject({ from: z.number('must be a number').min(0, 'must be >= 0').finite('must be finite'), to: positive() });

const phaseSchema = z
  .strictObject({
    name: z.string().min(1, 'must not be empty').optional(),
    /** Time bound of the phase (arrivals stop after it; in-flight requests then finish). */
    duration: duration().optional(),
    /** Request bound of the phase. */
    requests: posInt().optional(),
    /** Open loop: arrivals per second, constant or ramped linearly over the duration. */
    rate: z.union([positive(), rampSchema]).optional(),
    /** Inter-arrival distribution of an open loop. */
    arrivals: z.enum(['poisson', 'uniform']).default('poisson'),
    /** Closed loop: requests kept in flight. */
    concurrency: posInt().optional(),
    /** Open loop: arrivals beyond this many requests in flight are counted as client overload, not sent. */
    maxInFlight: posInt().default(10_000),
    /** SLOs of this phase; fields override the campaign's. */
    slo: sloSchema.optional(),
  })
  .superRefine((p, ctx) => {
    if (p.rate === undefined && p.concurrency === undefined)
      ctx.addIssue({ code: 'custom', message: 'give either rate (open loop) or concurrency (closed loop)' });
    if (p.rate !== undefined && p.concurrency !== undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['concurrency'],
        message: 'a phase is open loop (rate) or closed loop (concurrency), not both',
      });
    if (p.duration === undefined && p.requests === undefined) ctx.addIssue({ code: 'custom', message: 'give duration, requests or both' });
    if (typeof p.rate === 'object' && p.duration === undefined)
      ctx.addIssue({ code: 'custom', path: ['rate'], message: 'a ramped rate needs the phase duration' });
  });

const metricsEndpoint = z.strictObject({
  name: z.string().min(1, 'must not be empty'),
  url: z
    .string()
    .url('must be an http(s) URL')
    .refine((u) => /^https?:/.test(u), 'must be an http(s) URL'),
});

const schema = z.strictObject({
  name: z.string().min(1, 'must not be empty'),
  description: z.string().optional(),
  /** Seed of the request mix (which entry, images, classes each request gets). */
  seed: z.number().int('must be an integer').min(0, 'must be >= 0').default(1),
  target: z.strictObject({
    /** gRPC address of the scheduler, host:port. */
    address: z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'expected host:port (IPv6 in brackets)'),
    /** TLS to the target: true (system CAs) or the CA to verify it with and a client certificate (mutual TLS). */
    tls: z
      .union([
        z.boolean(),
        z.strictObject({ ca: z.string().min(1).optional(), cert: z.string().min(1).optional(), key: z.string().min(1).optional() }),
      ])
      .refine((t) => typeof t === 'boolean' || Boolean(t.cert) === Boolean(t.key), 'cert and key go together')
      .default(false),
    /** File holding the bearer token to send (DITPIPE_TOKEN or --token-file override it). */
    tokenFile: z.string().min(1).optional(),
    /** Deadline of each request. */
    timeout: duration().prefault('60s'),
    /** Hosts besides loopback this campaign may send to (with no --allow-remote needed). */
    allowHosts: z.array(z.string().min(1, 'must not be empty')).default([]),
  }),
  /** Worker threads generating load. */
  workers: z.number().int('must be an integer').min(1, 'must be >= 1').max(64, 'must be <= 64').default(2),
  /** Requests run before the first phase and left out of every figure. */
  warmup: z
    .strictObject({ requests: posInt().optional(), duration: duration().optional(), concurrency: posInt().default(1) })
    .refine((w) => w.requests !== undefined || w.duration !== undefined, 'give requests, duration or both')
    .optional(),
  mix: z.array(mixSchema).min(1, 'give at least one request kind'),
  phases: z.array(phaseSchema).min(1, 'give at least one phase'),
  slo: sloSchema.optional(),
  /** Prometheus endpoints scraped before and after each phase. */
  metrics: z.array(metricsEndpoint).default([]),
  /** Bound of a phase given only by request count. */
  maxPhaseDuration: duration().prefault('10m'),
});

export type Campaign = z.output<typeof schema>;
export type CampaignInput = z.input<typeof schema>;
export type Phase = z.output<typeof phaseSchema>;

export class CampaignError extends Error {
  constructor(
    message: string,
    readonly issues: Array<{ field: string; message: string }> = [],
  ) {
    super(message);
  }
}

/** `phases[1].rate` from ['phases', 1, 'rate']. */
export function fieldPath(path: ReadonlyArray<PropertyKey>): string {
  let s = '';
  for (const p of path) s += typeof p === 'number' ? `[${p}]` : s ? `.${String(p)}` : String(p);
  return s || '(campaign)';
}

/** Validates a parsed campaign; errors list every bad field as `path: message`. */
export function validateCampaign(input: unknown, source = 'campaign'): Campaign {
  const r = schema.safeParse(input);
  if (!r.success) {
    const issues = r.error.issues.map((i) => {
      const base = fieldPath(i.path);
      if (i.code === 'unrecognized_keys') {
        const keys = i.keys.map((k) => `"${k}"`).join(', ');
        return {
          field: i.path.length ? `${base}.${i.keys[0]}` : i.keys[0],
          message: `unknown field${i.keys.length > 1 ? 's' : ''} ${keys}${i.path.length ? ` in ${base}` : ''}`,
        };
      }
      if (i.code === 'invalid_key') return { field: base, message: i.issues[0]?.message ?? i.message };
      const message = i.code === 'invalid_type' && valueAt(input, i.path) === undefined ? 'required' : i.message;
      return { field: base, message };
    });
    throw new CampaignError(`${source}: invalid campaign:\n${issues.map((i) => `  ${i.field}: ${i.message}`).join('\n')}`, issues);
  }
  const c = r.data;
  c.phases.forEach((p, i) => (p.name ??= `phase-${i + 1}`));
  const names = new Set<string>();
  c.phases.forEach((p, i) => {
    if (names.has(p.name!))
      throw new CampaignError(`${source}: invalid campaign:\n  phases[${i}].name: "${p.name}" is used by an earlier phase`, [
        { field: `phases[${i}].name`, message: `"${p.name}" is used by an earlier phase` },
      ]);
    names.add(p.name!);
  });
  return c;
}

function valueAt(v: unknown, path: ReadonlyArray<PropertyKey>): unknown {
  for (const k of path) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<PropertyKey, unknown>)[k];
  }
  return v;
}

export function loadCampaign(file: string): Campaign {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new CampaignError(`${file}: cannot read: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new CampaignError(`${file}: not valid YAML: ${(err as Error).message}`);
  }
  return validateCampaign(doc, file);
}

/** Host part of host:port or of a URL. */
export function hostOf(addressOrUrl: string): string {
  if (/^[a-z]+:\/\//i.test(addressOrUrl)) return new URL(addressOrUrl).hostname.replace(/^\[|\]$/g, '');
  const m = /^\[([^\]]+)\]:\d+$/.exec(addressOrUrl) ?? /^([^:]+):\d+$/.exec(addressOrUrl);
  return m ? m[1] : addressOrUrl;
}

export function isLoopback(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, '');
  if (h === 'localhost' || h.endsWith('.localhost')) return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h === '0:0:0:0:0:0:0:1' || /^::ffff:127\./.test(h);
  return false;
}

/** Every host the campaign sends to that is neither loopback nor listed; empty = allowed. */
export function remoteHosts(c: Campaign): string[] {
  const allowed = new Set(c.target.allowHosts.map((h) => h.toLowerCase()));
  const hosts = [c.target.address, ...c.metrics.map((m) => m.url)].map(hostOf);
  return [...new Set(hosts.filter((h) => !isLoopback(h) && !allowed.has(h.toLowerCase())))];
}
