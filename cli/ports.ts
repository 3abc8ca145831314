// Ports `ditpipe up` hands its processes, chosen before they start so the banner can list them.
import { createServer, type Server } from 'node:net';

/** `n` distinct TCP ports free on every interface right now (the OS picks them; all held at once, then released). */
export async function freePorts(n: number): Promise<number[]> {
  const servers: Server[] = [];
  try {
    const ports: number[] = [];
    for (let i = 0; i < n; i++) {
      const srv = createServer();
      servers.push(srv);
      ports.push(
        await new Promise<number>((resolve, reject) => {
          srv.once('error', reject);
          srv.listen(0, () => {
            const addr = srv.address();
            resolve(typeof addr === 'object' && addr ? addr.port : 0);
          });
        }),
      );
    }
    return ports;
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => (s.listening ? s.close(() => resolve()) : resolve()))));
  }
}

/** `count` ports from a `--…-port` value: -1 → all off (-1), 0 → free ports from `free`, N → N, N+1, … */
export function portRange(first: number, count: number, free: () => number): number[] {
  return Array.from({ length: count }, (_, i) => (first < 0 ? -1 : first === 0 ? free() : first + i));
}
