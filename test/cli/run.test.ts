// The run commands as a user runs them: `ditpipe start` (in-process and on NATS_URL), `ditpipe up`
// with `ditpipe generate` against it, and an ordered Ctrl-C.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { SamplerApi } from '../../shared/client.ts';
import { UnauthenticatedError } from '../../shared/errors.ts';
import { connectNats } from '../../shared/transport/nats.ts';
import { decodePng } from '../../shared/image/png.ts';
import { readFileSync } from 'node:fs';
import { assertNoNatsServersRunning, startNatsServer } from '../helpers/nats.ts';
import { healthStatus } from '../helpers/grpc.ts';
import { testModels } from '../helpers/models.ts';

const BIN = resolve(import.meta.dirname, '../../bin/ditpipe.js');
const dir = mkdtempSync(join(tmpdir(), 'ditpipe-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function run(args: string[], env: Record<string, string> = {}): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 240_000 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

describe('ditpipe start', () => {
  const { ditDir, vaeDir } = testModels();
  const args = (out: string): string[] => [
    'start',
    '--model-dir',
    ditDir,
    '--vae-dir',
    vaeDir,
    '--grpc-port',
    '0',
    '--http-port',
    '0',
    '--metrics-port',
    '-1',
    '--grid-samples',
    '2',
    '--grid-steps',
    '4',
    '--grid-out',
    out,
    '--exit-after-grid',
  ];

  it('runs the pipeline in one process and writes a labelled grid', () => {
    const out = join(dir, 'inproc');
    const r = run(args(out), { NATS_URL: '' });
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('in-process bus');
    // npm start tells where the playground is (port 0 here: whichever port the server got).
    expect(r.out).toMatch(/playground: open http:\/\/127\.0\.0\.1:[1-9]\d*\/ /);
    expect(r.out).toContain(`sample grid: ${join(out, 'grid.png')}`);
    expect(readdirSync(out).filter((f) => f.endsWith('.png'))).toHaveLength(21); // 10 classes × 2 + grid
    const grid = decodePng(readFileSync(join(out, 'grid.png')));
    expect(grid.height).toBeGreaterThan(10 * 32);
  });

  it('uses NATS when NATS_URL is set, with the same images', async () => {
    const nats = await startNatsServer();
    try {
      const out = join(dir, 'nats');
      const r = run(args(out), { NATS_URL: nats.url });
      expect(r.status, r.out).toBe(0);
      expect(r.out).toContain(`transport: NATS at ${nats.url}`);
      for (const f of readdirSync(out).filter((n) => n.endsWith('.png') && n !== 'grid.png')) {
        expect(readFileSync(join(out, f)).equals(readFileSync(join(dir, 'inproc', f))), f).toBe(true);
      }
    } finally {
      await nats.stop();
    }
    assertNoNatsServersRunning();
  });
});

describe('ditpipe up + generate', () => {
  function startUp(extra: string[]): { up: ChildProcess; log: () => string; exited: Promise<number | null> } {
    const { ditDir, vaeDir } = testModels();
    // detached: its own process group, like a shell job, so the test can signal the whole group as a terminal's Ctrl-C does.
    const up = spawn(
      process.execPath,
      [BIN, 'up', '--model-dir', ditDir, '--vae-dir', vaeDir, '--nats-port', '0', '--http-port', '-1', ...extra],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
        detached: true,
      },
    );
    let log = '';
    up.stderr?.on('data', (c: Buffer) => (log += c.toString()));
    const exited = new Promise<number | null>((r) => up.once('exit', (code) => r(code)));
    return { up, log: () => log, exited };
  }

  it('starts a cluster of processes, serves generate, and drains on a terminal Ctrl-C (SIGINT to the whole process group)', async () => {
    // The drain below waits out a 400-step request: the grace is as long as the request's deadline,
    // since a loaded machine (CI runs the other test files beside this one) may take 10 s for it.
    const { up, log, exited } = startUp(['--grpc-port', '0', '--metrics-port', '0', '--denoisers', '2', '--shutdown-grace', '60000']);
    let inFlight: Promise<number> | undefined;
    try {
      await expect.poll(() => log(), { timeout: 120_000, interval: 250 }).toMatch(/\[up\] scheduler gRPC on 127\.0\.0\.1:\d+/);
      // The ready line comes only after every replica serves: a client may send work at once.
      const beforeReady = log().slice(0, log().indexOf('[up] scheduler gRPC on'));
      expect((beforeReady.match(/\[(denoiser|decoder)-\d\].*"msg":"serving /g) ?? []).length).toBe(3);
      // What is printed is what is bound: loopback.
      const address = /\[up\] scheduler gRPC on (\S+),/.exec(log())![1];
      expect(log()).toMatch(/\[scheduler\].*"msg":"Sampler API on 127\.0\.0\.1:\d+ \(plaintext\)"/);
      // The banner lists every process's ports, and they are the ones the processes serve on.
      const banner = [
        ...log().matchAll(/^\[up\] {3}(\S+) +(gRPC|health) 127\.0\.0\.1:(\d+) +metrics http:\/\/127\.0\.0\.1:(\d+)\/metrics$/gm),
      ].map((m) => ({
        name: m[1],
        kind: m[2],
        port: Number(m[3]),
        metrics: Number(m[4]),
      }));
      expect(banner.map((b) => `${b.name} ${b.kind}`)).toEqual([
        'scheduler gRPC',
        'denoiser-0 health',
        'denoiser-1 health',
        'decoder-0 health',
      ]);
      expect(`127.0.0.1:${banner[0].port}`).toBe(address);
      expect(new Set(banner.flatMap((b) => [b.port, b.metrics])).size).toBe(8);
      for (const b of banner.slice(1)) expect(await healthStatus(`127.0.0.1:${b.port}`), b.name).toBe(1);
      // NATS is on with credentials: a client without any is refused, and no seed is ever printed.
      const natsUrl = /\[up\] nats-server on (\S+) /.exec(log())![1];
      const refused = await connectNats({ servers: natsUrl }).catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(UnauthenticatedError);
      expect(log()).not.toMatch(/SU[A-Z2-7]{56}/);
      await expect
        .poll(async () => (await fetch(`http://127.0.0.1:${banner[0].metrics}/metrics`).catch(() => null))?.status, {
          timeout: 30_000,
          interval: 250,
        })
        .toBe(200);
      for (const b of banner.slice(1)) {
        const scrape = async (): Promise<string> =>
          await fetch(`http://127.0.0.1:${b.metrics}/metrics`)
            .then((r) => r.text())
            .catch(() => '');
        await expect
          .poll(scrape, { timeout: 30_000, interval: 250 })
          .toContain(b.name.startsWith('denoiser') ? 'ditpipe_denoiser_' : 'ditpipe_decoder_');
      }
      const out = join(dir, 'gen');
      const g = run([
        'generate',
        '--server',
        address,
        '--class',
        '1,three',
        '--num',
        '2',
        '--steps',
        '5',
        '--sampler',
        'dpmpp',
        '--seed',
        '7',
        '--out',
        out,
      ]);
      expect(g.status, g.out).toBe(0);
      expect(g.out).toMatch(/4 image\(s\) from dit-tiny, seed 7/);
      expect(readdirSync(out).sort()).toEqual(['000-one.png', '001-one.png', '002-three.png', '003-three.png', 'grid.png', 'run.json']);
      expect(existsSync(join(out, 'grid.png'))).toBe(true);

      // A long request in flight when Ctrl-C arrives: the scheduler drains it before anything stops.
      const api = new SamplerApi(address);
      let steps = 0;
      let sent = false;
      inFlight = (async () => {
        let images = 0;
        try {
          for await (const ev of api.generateStream(
            { model: 'dit-tiny', classLabels: [{ index: 1 }, { index: 2 }], numSteps: 400, seed: 3n },
            { timeoutMs: 60_000 },
          )) {
            if (ev.progress && ++steps === 5 && !sent) {
              sent = true;
              process.kill(-up.pid!, 'SIGINT');
            }
            if (ev.image) images++;
          }
        } finally {
          api.close();
        }
        return images;
      })();
      expect(await inFlight).toBe(2);
      expect(steps).toBe(400);
    } finally {
      if (up.exitCode === null) process.kill(-up.pid!, 'SIGINT');
    }
    expect(await exited, log()).toBe(0);
    const order = ['[up] SIGINT', '"name":"scheduler","msg":"stopped"', '"name":"denoiser","msg":"stopped"', '[up] stopped'].map((s) =>
      log().lastIndexOf(s),
    );
    expect(
      order.every((v) => v >= 0),
      log(),
    ).toBe(true);
    expect([...order].sort((a, b) => a - b)).toEqual(order);
    // No process saw the terminal's SIGINT itself, and none lost NATS before it was done.
    expect(log()).not.toMatch(/"signal":"SIGINT"/);
    expect(log()).not.toMatch(/connection disconnected|Uncaught|triggerUncaughtException|unhandled/i);
  });

  it('exits non-zero when a child fails to start', async () => {
    const { log, exited } = startUp(['--grpc-port', '0', '--denoisers', '1', '--simulate', 'fast']);
    expect(await exited, log()).toBe(1);
    expect(log()).toMatch(/\[up\] denoiser-0 failed to start \(exit 1\), no denoiser left/);
    expect(log()).toMatch(/\[up\] stopped; failed: denoiser-0 failed to start/);
  });

  it('exits non-zero when its last replica of a pool dies', async () => {
    const { up, log, exited } = startUp(['--grpc-port', '0', '--denoisers', '1']);
    try {
      await expect.poll(() => log(), { timeout: 120_000, interval: 250 }).toMatch(/\[denoiser-0\].*"msg":"serving /);
      const pid = Number(/\[denoiser-0\] \{[^\n]*"pid":(\d+)/.exec(log())![1]);
      process.kill(pid, 'SIGKILL');
      expect(await exited, log()).toBe(1);
      expect(log()).toMatch(/\[up\] denoiser-0 died \(exit SIGKILL\), no denoiser left/);
    } finally {
      if (up.exitCode === null) process.kill(-up.pid!, 'SIGKILL');
    }
  });
});
