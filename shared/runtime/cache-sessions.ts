// The DiT's step-cache graphs (CACHE_GRAPHS in shared/model/modeldir.ts), each in its own
// WorkerSession: a full step runs head then tail, a cached step head then skip. Which steps are
// cached is the caller's policy; this only opens the graphs.
import { CACHE_GRAPHS, cacheGraphPath, type CacheGraphName, type DitModelJson, type ModelDir } from '../model/modeldir.ts';
import { WorkerSession, type SessionOptions } from './session.ts';

export type CacheSessions = Record<CacheGraphName, WorkerSession> & {
  /** Closes all three sessions. */
  close(): Promise<void>;
};

/**
 * Opens the head, tail and skip graphs of a DiT model directory. Every file is checked before any
 * worker starts, so a directory without them fails at once with MissingCacheGraphError naming the
 * file; if a session fails to load, the ones already open are closed.
 */
export async function openCacheSessions(model: ModelDir<DitModelJson>, opts: SessionOptions = {}): Promise<CacheSessions> {
  const paths = CACHE_GRAPHS.map((name) => cacheGraphPath(model, name));
  const open: WorkerSession[] = [];
  try {
    for (const path of paths) open.push(await WorkerSession.create(path, opts));
  } catch (err) {
    await Promise.all(open.map((s) => s.close()));
    throw err;
  }
  const [head, tail, skip] = open;
  return {
    head,
    tail,
    skip,
    close: async () => {
      await Promise.all(open.map((s) => s.close()));
    },
  };
}
