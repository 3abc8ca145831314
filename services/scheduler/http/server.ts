// The scheduler's HTTP front end, on Node's own http(s) server, mounted on the same Scheduler
// object as the gRPC API: an OpenAI-compatible images API (POST /v1/images/generations, plain or
// as server-sent events with previews; GET /v1/models), the playground page at `/` and the JSON
// its cluster panel reads. Requests become GenerateRequests and go through Scheduler.generate(),
// so validation, admission and cancellation are the gRPC API's own; a client that disconnects
// aborts the request's signal, which stops step dispatch at the next step.
//
//   const http = await startHttpApi(scheduler, compileHttpConfig({ port: 8080 }), { tls, authorize });
//   ... await http.stop(10_000);
import { setMaxListeners } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { NotFoundError, PayloadTooLargeError, toDitpipeError } from '../../../shared/errors.ts';
import { servedImageSize } from '../../../shared/image/crop.ts';
import type { GenerateEvent } from '../../../shared/gen/ditpipe/v1/sampler.ts';
import type { Scheduler } from '../scheduler.ts';
import { ClusterView } from './cluster.ts';
import type { HttpAuthorize, HttpConfig, HttpTlsOptions } from './config.ts';
import { badRequest, httpError } from './errors.ts';
import {
  completedImageEvent,
  imagesResponse,
  modelObject,
  parseImagesRequest,
  partialImageEvent,
  timingsJson,
  toGenerateRequest,
} from './openai.ts';
import { settledWithin } from '../../../shared/wait.ts';

export interface HttpApiOptions {
  /** Serve HTTPS with these PEM credentials instead of plain HTTP. */
  tls?: HttpTlsOptions;
  /** Caller authentication for the API routes (see HttpAuthorize). */
  authorize?: HttpAuthorize;
  /** Where server errors (5xx other than unavailability) are logged. */
  log?: Logger;
  /** The gRPC address of the same scheduler, shown by the playground in its request snippets (read when asked: the gRPC server may listen later). */
  grpcAddress?: string | (() => string | undefined);
}

export interface RunningHttpApi {
  port: number;
  /** Base URL as bound, e.g. http://127.0.0.1:8080 (loopback shown for a wildcard bind). */
  url: string;
  server: Server;
  /** Lets requests in flight finish within graceMs (health answers 503 meanwhile), then closes every connection. */
  stop(graceMs?: number): Promise<void>;
}

const PLAYGROUND_DIR = join(import.meta.dirname, 'playground');
const STATIC: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/playground.js': { file: 'playground.js', type: 'text/javascript; charset=utf-8' },
  '/playground.css': { file: 'playground.css', type: 'text/css; charset=utf-8' },
};
// The page loads nothing from elsewhere, and the browser is told to refuse if it ever tried.
const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  connection: 'keep-alive',
  'x-accel-buffering': 'no',
};

function json(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers }).end(text);
}

async function readJson(req: IncomingMessage, limit: number): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    // Past the limit the rest is read and dropped (up to a bound), so the client reads the 413
    // instead of a connection reset while it is still sending.
    if (size > limit * 16) break;
    if (size <= limit) chunks.push(chunk);
  }
  if (size > limit) throw new PayloadTooLargeError(`request body is larger than ${limit} bytes`, { size, limit });
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') throw badRequest('body: expected a JSON object', null);
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw badRequest(`body: not valid JSON (${(err as Error).message})`, null);
  }
}

/** Aborted when the client goes away before the answer is complete, or the deadline passes. */
function requestSignal(
  res: ServerResponse,
  timeoutMs: number | undefined,
): { signal: AbortSignal; deadline: number | undefined; dispose: () => void } {
  const ac = new AbortController();
  setMaxListeners(0, ac.signal); // every step and decode call of the request listens on it
  const onClose = (): void => {
    if (!res.writableFinished) ac.abort(new Error('the client disconnected'));
  };
  res.on('close', onClose);
  const deadline = timeoutMs === undefined ? undefined : Date.now() + timeoutMs;
  const timer = timeoutMs === undefined ? undefined : setTimeout(() => ac.abort(new Error('deadline exceeded')), timeoutMs);
  return {
    signal: ac.signal,
    deadline,
    dispose: () => {
      clearTimeout(timer);
      res.removeListener('close', onClose);
    },
  };
}

export async function startHttpApi(scheduler: Scheduler, config: HttpConfig, opts: HttpApiOptions = {}): Promise<RunningHttpApi> {
  const files = new Map(
    Object.entries(STATIC).map(([path, s]) => [path, { body: readFileSync(join(PLAYGROUND_DIR, s.file)), type: s.type }]),
  );
  const cluster = new ClusterView(scheduler, config.clusterCacheMs, opts.grpcAddress);
  const started = Math.floor(Date.now() / 1000);
  const inFlight = new Set<Promise<void>>();
  let stopping = false;

  const sendError = (res: ServerResponse, err: unknown): void => {
    const e = httpError(err, { retryAfterS: config.retryAfterS });
    if (e.status >= 500 && e.status !== 503 && e.status !== 504)
      opts.log?.error({ err: toDitpipeError(err).message, status: e.status }, 'HTTP request failed');
    if (res.destroyed) return; // the client is gone (its disconnect is what cancelled the request)
    if (res.headersSent) {
      // A stream already started: the error travels as an event, as OpenAI's streams send it.
      if (!res.writableEnded) res.end(`event: error\ndata: ${JSON.stringify({ type: 'error', ...e.body })}\n\n`);
      return;
    }
    json(res, e.status, e.body, e.headers);
  };

  async function checkSize(size: string | null | undefined, modelName: string): Promise<void> {
    if (size == null || size === 'auto' || modelName === '') return;
    const model = await scheduler.catalog.get(modelName);
    const { info } = await scheduler.catalog.decoderFor(model);
    const served = servedImageSize(model.denoiser.config?.inputSize ?? 0, info);
    const side = `${served.width}x${served.height}`;
    if (size !== side) {
      throw badRequest(`size: model "${model.name}" makes ${side} images; ask for "${side}" or "auto", got "${size}"`, 'size');
    }
  }

  async function generate(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const parsed = parseImagesRequest(await readJson(req, config.maxBodyBytes));
    const { request, stream, timeoutMs } = toGenerateRequest(parsed, scheduler.config);
    await checkSize(parsed.size, request.model);
    const { signal, deadline, dispose } = requestSignal(res, timeoutMs);
    try {
      if (!stream) {
        json(res, 200, imagesResponse(await scheduler.generate(request, { signal, deadline })));
        return;
      }
      let keepAlive: NodeJS.Timeout | undefined;
      const partials = new Map<number, number>();
      const send = (type: string, data: Record<string, unknown>): void => {
        if (res.writableEnded || res.destroyed) return;
        if (!res.headersSent) {
          // Headers wait for the first event, so a request the scheduler refuses gets a plain HTTP error status.
          res.writeHead(200, SSE_HEADERS);
          keepAlive = setInterval(() => res.write(': keep-alive\n\n'), config.keepAliveMs);
        }
        res.write(`event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`);
      };
      const onEvent = (e: GenerateEvent): void => {
        if (e.accepted) {
          const a = e.accepted;
          send('ditpipe.accepted', {
            request_id: a.requestId,
            model: a.model,
            seed: String(a.seed),
            n: a.numImages,
            num_steps: a.numSteps,
            queue_ms: a.queueMs,
            cached_images: a.cachedImages,
          });
        } else if (e.progress) {
          send('ditpipe.progress', { step: e.progress.step, num_steps: e.progress.numSteps });
        } else if (e.preview) {
          const k = partials.get(e.preview.sampleIndex) ?? 0;
          partials.set(e.preview.sampleIndex, k + 1);
          const { type, ...rest } = partialImageEvent(e.preview, k);
          send(type as string, rest);
        } else if (e.image?.image) {
          const { type, ...rest } = completedImageEvent(e.image.image, e.image.timings);
          send(type as string, rest);
        } else if (e.completed) {
          send('ditpipe.completed', {
            n: e.completed.numImages,
            sampling_gflops: e.completed.samplingGflops,
            timings: timingsJson(e.completed.timings),
          });
        }
      };
      try {
        await scheduler.generate(request, { signal, deadline, onEvent });
        res.end();
      } finally {
        clearInterval(keepAlive);
      }
    } finally {
      dispose();
    }
  }

  async function route(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    const method = req.method ?? 'GET';
    const allow = (methods: string): boolean => {
      if (methods.split(', ').includes(method)) return true;
      json(
        res,
        405,
        {
          error: {
            message: `${method} is not allowed on ${path}; use ${methods}`,
            type: 'invalid_request_error',
            param: null,
            code: 'method_not_allowed',
          },
        },
        { allow: methods },
      );
      return false;
    };
    const page = files.get(path);
    if (page) {
      if (!allow('GET, HEAD')) return;
      res.writeHead(200, {
        'content-type': page.type,
        'content-length': page.body.length,
        'content-security-policy': CSP,
        'x-content-type-options': 'nosniff',
        'cache-control': 'no-cache',
      });
      res.end(method === 'HEAD' ? undefined : page.body);
      return;
    }
    if (path === '/healthz') {
      if (allow('GET')) json(res, stopping ? 503 : 200, { status: stopping ? 'NOT_SERVING' : 'SERVING' });
      return;
    }
    await opts.authorize?.(req);
    if (path === '/v1/images/generations') {
      if (allow('POST')) await generate(req, res);
    } else if (path === '/v1/models') {
      if (allow('GET')) json(res, 200, { object: 'list', data: (await scheduler.catalog.list()).map((m) => modelObject(m, started)) });
    } else if (path.startsWith('/v1/models/')) {
      if (!allow('GET')) return;
      const id = decodeURIComponent(path.slice('/v1/models/'.length));
      const m = (await scheduler.catalog.list()).find((x) => x.name === id);
      if (!m) throw new NotFoundError(`model "${id}" is not served here (or no denoiser answers for it); see GET /v1/models`);
      json(res, 200, modelObject(m, started));
    } else if (path === '/ditpipe/cluster') {
      if (allow('GET')) json(res, 200, await cluster.snapshot(), { 'cache-control': 'no-store' });
    } else {
      throw new NotFoundError(`no route ${method} ${path}: try POST /v1/images/generations, GET /v1/models, or the playground at /`);
    }
  }

  const handler = (req: IncomingMessage, res: ServerResponse): void => {
    const done = route(req, res)
      .catch((err: unknown) => sendError(res, err))
      .finally(() => inFlight.delete(done));
    inFlight.add(done);
  };
  const server: Server = opts.tls
    ? createHttpsServer(
        {
          key: opts.tls.key,
          cert: opts.tls.cert,
          ca: opts.tls.ca,
          requestCert: opts.tls.requestCert ?? false,
          rejectUnauthorized: opts.tls.requestCert ?? false,
        },
        handler,
      )
    : createHttpServer(handler);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, () => {
      server.removeListener('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const shown =
    config.host === '0.0.0.0' || config.host === '::' ? '127.0.0.1' : config.host.includes(':') ? `[${config.host}]` : config.host;
  let stopped: Promise<void> | null = null;
  return {
    port,
    url: `${opts.tls ? 'https' : 'http'}://${shown}:${port}`,
    server,
    stop(graceMs = 10_000) {
      stopped ??= (async () => {
        // Like gRPC: still listening while requests drain (new ones get the scheduler's refusal), then closed.
        stopping = true;
        await settledWithin(Promise.allSettled([...inFlight]), graceMs);
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeAllConnections();
        await closed;
      })();
      return stopped;
    },
  };
}
